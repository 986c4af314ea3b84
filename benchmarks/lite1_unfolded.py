"""Is `pretrained-small-batch`'s unsteady fine-tuning on a new task the fold's doing?

The `standardize` transfer folds BatchNorm's (x − μ)/s into the conv before each site, which divides each
output channel's weights by its s. The function is unchanged, but Adam moves every weight by about the
learning rate whatever its size, so a channel whose weights shrank takes far larger relative steps than it
did in the original network. This builds the same function with the conv weights as they were and
(x − μ)/s applied by frozen buffers just before each norm, and fine-tunes both exactly as
``lite1_batch2.py`` does (same seeds, head, batches and learning rate).

    python benchmarks/lite1_unfolded.py --write     # about 12 minutes on 2 CPU cores

The unfolded network is a diagnostic built here, not something normswap produces; its numbers are
rendered into the batch2-lite1 section.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import normswap  # noqa: E402
from _common import save_json  # noqa: E402
from batch2_finetune import accuracy  # noqa: E402
from lite1_batch2 import SECTION, digits_for_lite1, finetune, record, render_recorded  # noqa: E402
from lite1_photos import build_original  # noqa: E402

RESULT = "lite1_batch2_unfolded.json"


class Standardize(nn.Module):
    """(x − μ)/s per channel, from frozen buffers: what `standardize` folds into the conv, kept apart."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("inv_std", (var.detach() + eps).rsqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(view)) * self.inv_std.view(view)


def unfolded(original: nn.Module, conversion: normswap.Conversion) -> tuple[nn.Module, int]:
    """The converted model with every standardized producer's weights restored and (x − μ)/s moved into
    a ``Standardize`` before the site's new norm; the number of sites so changed."""
    model = copy.deepcopy(conversion.model)
    before = dict(original.named_modules())
    changed = 0
    for entry in conversion.plan.entries:
        site = entry.site
        if entry.action != "convert" or entry.options.get("transfer") != "standardize" or not site.producer:
            continue
        producer, was = model.get_submodule(site.producer), before[site.producer]
        if producer.bias is None or was.bias is not None:
            continue  # the site fell back to the statistics transfer: its producer was not folded
        with torch.no_grad():
            producer.weight.copy_(was.weight)
            producer.bias.zero_()
        bn = before[site.path]
        parent, _, name = site.path.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, name, nn.Sequential(Standardize(bn.running_mean, bn.running_var, bn.eps),
                                            getattr(holder, name)))
        changed += 1
    return model, changed


def run_seed(original: nn.Module, seed: int, lr: float, held_out: int) -> dict[str, Any]:
    data = digits_for_lite1(seed, held_out)
    conversion = normswap.convert(original, "pretrained-small-batch", data["x_train"][:2], validate=False,
                                  batch_size=2)
    twin, changed = unfolded(original, conversion)
    with torch.no_grad():
        probe = data["x_test"][:16]
        gap = float((conversion.model.eval()(probe) - twin.eval()(probe)).abs().max())
    row: dict[str, Any] = {"seed": seed, "sites_unfolded": changed, "max_abs_logit_gap": gap}
    for name, start in (("folded", conversion.model), ("unfolded", twin)):
        model, _, wall_s = finetune(start, data, lr, seed)
        row[name] = accuracy(model, data["x_test"], data["y_test"])
        row[f"{name}_wall_s"] = round(wall_s, 1)
    print(f"seed {seed}: {changed} sites, logit gap {gap:.1e}: folded {100 * row['folded']:.1f} %, "
          f"unfolded {100 * row['unfolded']:.1f} %", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="re-render the batch2-lite1 section of BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    original = build_original()
    result = record("lite1_batch2_unfolded", args)
    for seed in args.seeds:  # saved after each seed, so an interrupted run keeps what it measured
        result["runs"].append(run_seed(original, seed, args.lr, args.held_out))
        save_json(RESULT, result)
    render_recorded(SECTION, args.write)


if __name__ == "__main__":
    main()

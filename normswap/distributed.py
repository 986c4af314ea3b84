"""The collectives that keep every ``torchrun`` rank's calibration and recovery the same.

Outside an initialized process group (or with one process) each is the identity, so single-process
code pays nothing. Inside one, every rank must make the same calls in the same order: calibration and
recovery are collective operations there, run on every rank, each with its own shard of the data.
Work that one rank does alone (export on rank 0, say) goes inside :func:`on_this_rank_only`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist

_THIS_RANK_ONLY: ContextVar[bool] = ContextVar("normswap_this_rank_only", default=False)


@contextmanager
def on_this_rank_only() -> Iterator[None]:
    """Calibration and recovery inside this block ignore the process group: no collective calls, no
    DistributedDataParallel, this rank's data alone. For work one rank does while the others do not
    (they would otherwise wait for it forever)."""
    token = _THIS_RANK_ONLY.set(True)
    try:
        yield
    finally:
        _THIS_RANK_ONLY.reset(token)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group or inside :func:`on_this_rank_only`."""
    if dist.is_available() and dist.is_initialized() and not _THIS_RANK_ONLY.get():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed() -> bool:
    return world()[1] > 1


def _device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (float64), on ``values``' device."""
    if not distributed():
        return values.double()
    shared = values.detach().to(_device(), torch.float64)
    dist.all_reduce(shared)
    return shared.to(values.device)


def total(count: int) -> int:
    """A count summed over all ranks."""
    return int(sum_over_ranks(torch.tensor([float(count)], dtype=torch.float64)).item())


def mean_over_ranks(value: float, weight: float) -> float:
    """The ``weight``-weighted mean over ranks of each rank's ``value`` (e.g. an error averaged over its
    own samples, weighted by how many it had): every rank gets the same number to decide by."""
    if not distributed():
        return value
    both = sum_over_ranks(torch.tensor([value * weight, float(weight)], dtype=torch.float64))
    return float(both[0] / both[1].clamp_min(1e-12))


def average_gradients(params: list[torch.Tensor]) -> None:
    """Each parameter's gradient replaced by its mean over the ranks (missing gradients count as zero),
    so that ranks holding the same weights take the same optimiser step."""
    if not distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    mean = sum_over_ranks(torch.cat([g.reshape(-1) for g in grads])) / world()[1]
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = mean[offset: offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def gathered(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank; ``[value]`` alone."""
    if not distributed():
        return [value]
    values: list[Any] = [None] * world()[1]
    dist.all_gather_object(values, value)
    return values

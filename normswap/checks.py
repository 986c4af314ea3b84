"""Measurements on models that tests, reports and benchmarks share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .cloning import clone_model


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


def batch_dependence(model: nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """How much sample 0's train-mode output moves when the rest of its batch changes, relative to its
    size: 0 for a model whose samples are independent (what BatchNorm breaks). Runs on a copy, so
    running statistics of the caller's model are not touched, with the random generator reseeded
    before each pass so dropout masks match."""
    if x.shape[0] < 2:
        raise ValueError("batch_dependence needs a batch of at least 2 samples")
    probe = clone_model(model).train()
    generator = torch.Generator().manual_seed(seed)
    other = x.clone()
    scale = float(x.std()) if x.numel() > 1 else 1.0
    scale = scale if scale > 0 and scale == scale else 1.0  # constant or tiny inputs: unit noise
    other[1:] = torch.randn(other[1:].shape, generator=generator).to(x) * scale + float(x.mean())
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        # The same dropout / drop-path masks in both passes: random noise is not batch dependence.
        torch.manual_seed(seed)
        first = first_tensor(probe(x))[0].double()
        torch.manual_seed(seed)
        second = first_tensor(probe(other))[0].double()
    return float((first - second).norm() / first.norm().clamp_min(1e-12))


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

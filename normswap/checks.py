"""Measurements on models that tests, reports and benchmarks share."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


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


def output_drift(original: nn.Module, converted: nn.Module, inputs: Sequence[Any]) -> dict[str, float]:
    """Eval-mode difference of the two models' outputs on the same inputs: relative L2, mean per-sample
    cosine similarity, max absolute error, and top-1 agreement for N×K outputs."""
    a, b = (_eval_output(m, inputs) for m in (original, converted))
    a, b = (
        a.double().flatten(1) if a.ndim > 1 else a.double()[None],
        b.double().flatten(1) if b.ndim > 1 else b.double()[None],
    )
    rel = float((a - b).norm() / a.norm().clamp_min(1e-12))
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())
    drift = {"relative_l2": rel, "cosine": cos, "max_abs": float((a - b).abs().max())}
    if a.shape[1] > 1:
        drift["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).double().mean())
    return drift


def _eval_output(model: nn.Module, inputs: Sequence[Any]) -> torch.Tensor:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return first_tensor(model(*inputs))
    finally:
        for m, mode in modes:
            m.training = mode


def batch_dependence(model: nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """How much sample 0's train-mode output moves when the rest of its batch changes, relative to its
    size: 0 for a model whose samples are independent (what BatchNorm breaks). Runs on a copy, so
    running statistics of the caller's model are not touched."""
    if x.shape[0] < 2:
        raise ValueError("batch_dependence needs a batch of at least 2 samples")
    probe = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(seed)
    other = x.clone()
    scale = float(x.std()) if x.numel() > 1 else 1.0
    scale = scale if scale > 0 and scale == scale else 1.0  # constant or tiny inputs: unit noise
    other[1:] = torch.randn(other[1:].shape, generator=generator).to(x) * scale + float(x.mean())
    with torch.no_grad():
        first = first_tensor(probe(x))[0].double()
        second = first_tensor(probe(other))[0].double()
    return float((first - second).norm() / first.norm().clamp_min(1e-12))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameter elements, buffer elements)."""
    return (sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers()))

"""Recovery by distillation: fine-tune the converted model against the original.

The loss is the KL divergence between the original's and the converted model's softmax (temperature
T, scaled by T²) for classifier outputs, mean squared error for other outputs, plus an optional
per-site feature loss (relative squared error of each converted site's activation against the
original's). The default optimiser is AdamW at 1e-4 with cosine decay and gradient clipping:
pretrained networks are wrecked by the learning rates used to train from scratch. Under ``torchrun``
the converted model is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU) and each rank
draws its own samples; rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import InputSet, load_inputs
from .drift import output_leaves
from .errors import DataError, PlanError
from .types import Plan

CHECKPOINT = "recover-checkpoint.pt"


@dataclass(frozen=True)
class RecoveryResult:
    steps: int
    seconds: float
    first_loss: float
    final_loss: float
    lr: float
    world_size: int
    resumed_from: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _distillation_loss(teacher: Any, student: Any, temperature: float) -> torch.Tensor:
    losses = []
    for (_, t), (_, s) in zip(output_leaves(teacher), output_leaves(student), strict=True):
        if t.ndim == 2 and t.shape[1] > 1:
            log_p = F.log_softmax(t.float() / temperature, dim=1)
            log_q = F.log_softmax(s.float() / temperature, dim=1)
            losses.append(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2)
        else:
            losses.append(F.mse_loss(s.float(), t.float()))
    return torch.stack(losses).sum()


@contextmanager
def _feature_hooks(
    original: nn.Module, converted: nn.Module, paths: list[str], store: dict[str, list[torch.Tensor]]
) -> Iterator[None]:
    originals, converteds = dict(original.named_modules()), dict(converted.named_modules())
    handles = []
    for path in paths:
        if path in originals and path in converteds:
            handles.append(
                originals[path].register_forward_hook(
                    lambda _m, _a, out, p=path: store.setdefault("t:" + p, []).append(out.detach()) and None
                )
            )
            handles.append(
                converteds[path].register_forward_hook(
                    lambda _m, _a, out, p=path: store.setdefault("s:" + p, []).append(out) and None
                )
            )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _feature_loss(store: dict[str, list[torch.Tensor]]) -> torch.Tensor | None:
    terms = []
    for key, students in store.items():
        if key.startswith("s:"):
            for s, t in zip(students, store.get("t:" + key[2:], []), strict=False):
                terms.append((s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-8))
    return torch.stack(terms).mean() if terms else None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def recover(
    original: nn.Module,
    converted: nn.Module,
    data: Any,
    *,
    steps: int = 200,
    lr: float = 1e-4,
    batch_size: int = 32,
    temperature: float = 1.0,
    feature_weight: float = 0.0,
    plan: Plan | None = None,
    weight_decay: float = 0.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    seed: int = 0,
) -> RecoveryResult:
    """Fine-tune ``converted`` (in place) to reproduce ``original`` on ``data`` for ``steps`` steps.

    ``data``: a tensor, image folder or tensor file (see :func:`normswap.load_inputs`). With
    ``checkpoint_dir`` the run saves its state every ``checkpoint_every`` steps and resumes from it.
    The converted model is left in the mode it came in; the original is not changed.
    """
    if steps < 1:
        raise PlanError(f"recovery needs at least one step, got {steps}.")
    inputs = data if isinstance(data, InputSet) else load_inputs(original, data, batch_size=batch_size)
    if inputs.source == "synthetic":
        raise DataError("recovery needs data: give real samples (a tensor, an image folder or a tensor file).")
    pool = torch.cat([b[0] for b in inputs.batches])
    rank, world = _world()
    student: nn.Module = converted
    if world > 1:
        student = nn.parallel.DistributedDataParallel(converted)
    params = [p for p in converted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / steps, 1))))
    start = _resume(checkpoint_dir, converted, optimizer, schedule)
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    for _ in range(start):  # the same sample stream as an uninterrupted run
        torch.randint(0, pool.shape[0], (min(batch_size, pool.shape[0]),), generator=generator)
    feature_paths = [e.site.path for e in plan.conversions] if plan is not None and feature_weight > 0 else []
    was_training = converted.training
    original_modes = [(m, m.training) for m in original.modules()]
    original.eval()
    converted.train()
    first = final = float("nan")
    began = time.perf_counter()
    try:
        with _progress(progress and rank == 0, steps, start) as advance:
            for step in range(start, steps):
                index = torch.randint(0, pool.shape[0], (min(batch_size, pool.shape[0]),), generator=generator)
                batch = pool[index]
                store: dict[str, list[torch.Tensor]] = {}
                with _feature_hooks(original, converted, feature_paths, store):
                    with torch.no_grad():
                        teacher = original(batch)
                    loss = _distillation_loss(teacher, student(batch), temperature)
                    features = _feature_loss(store) if feature_paths else None
                if features is not None:
                    loss = loss + feature_weight * features
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                value = float(loss.detach())
                first = value if step == start else first
                final = value
                advance(value)
                if checkpoint_dir is not None and rank == 0 and (step + 1) % checkpoint_every == 0:
                    _save(checkpoint_dir, converted, optimizer, schedule, step + 1)
    finally:
        converted.train(was_training)
        for m, mode in original_modes:
            m.training = mode
    return RecoveryResult(steps, time.perf_counter() - began, first, final, lr, world, start)


def _resume(directory: str | Path | None, model: nn.Module, optimizer: Any, schedule: Any) -> int:
    if directory is None or not (Path(directory) / CHECKPOINT).is_file():
        return 0
    state = torch.load(Path(directory) / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["step"])


def _save(directory: str | Path, model: nn.Module, optimizer: Any, schedule: Any, step: int) -> None:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.{os.getpid()}.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
        },
        tmp,
    )
    os.replace(tmp, folder / CHECKPOINT)


@contextmanager
def _progress(enabled: bool, total: int, start: int) -> Iterator[Any]:
    if not enabled:
        yield lambda _loss: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("recovering", total=total, completed=start)
        yield lambda loss: bar.update(task, advance=1, description=f"recovering (loss {loss:.4g})")

"""Recovery by distillation: fine-tune the converted model against the original.

The loss is the KL divergence between the original's and the converted model's softmax (temperature
T, scaled by T²) for classifier outputs, mean squared error for other outputs, plus an optional
per-site feature loss (relative squared error of each converted site's activation against the
original's). The default optimiser is AdamW with cosine decay (after an optional linear warm-up)
and gradient clipping, at 1e-4 or at the ``[recovery] lr`` of the recipe the plan came from:
pretrained networks are wrecked by the learning rates used to train from scratch, and one that
starts close to the original wants less still: on EfficientNet-Lite1 from ``pretrained-small-batch`` at
its former images eps 10, 1e-5 and 3e-5 took held-out agreement from 68 % to 76-79 % over about 600 GPU
steps and 1e-4 to 67 %; at eps 100, which starts within a view or two of the original, 40 steps at 1e-5
moved it away (KL 0.001 to 0.004) where 3e-6 did not, so that recipe says 3e-6. Under ``torchrun`` the
converted model is wrapped in
DistributedDataParallel (gloo on CPU, NCCL on GPU) and each rank draws its own samples; rank 0 writes
checkpoints and shows progress.

With ``holdout`` the run is judged on samples it does not train on, every ``eval_every`` steps and
at the start, and the best state is what it returns: distillation on a few samples can memorise them
(on Lite1 a learning rate of 1e-4 took held-out agreement from 51 % to 35 %), and only data it did
not see can tell. Under ``torchrun`` a judgement averages every rank's held-back samples (weighted by
their number), so all ranks keep the same state even when each holds back its own.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch, InputSet, call_model, held_back, load_inputs
from .distributed import gathered
from .distributed import world as world_of_ranks
from .drift import output_error, output_leaves
from .errors import DataError, PlanError
from .progress import progress_bar
from .types import Plan, Report

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
    # Where the learning rate came from: "argument", "recipe <name>" or "default".
    lr_source: str = "argument"
    warmup_steps: int = 0
    # With a holdout: its output error against the original (KL for logits, else relative L2) by
    # step, step 0 being the model as it came, and the step whose state was kept.
    holdout_error: tuple[tuple[int, float], ...] = ()
    kept_step: int | None = None
    held_back: int = 0
    # What made the views, when ``augment`` did (its repr), so the report says how it was trained.
    augment: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "holdout_error": [list(e) for e in self.holdout_error]}

    def recorded_in(self, report: Report) -> Report:
        """``report`` with this run under ``calibration["recovery"]``, where the reports show it."""
        return dataclasses.replace(report, calibration=dict(report.calibration or {}) | {"recovery": self.to_dict()},
                                   timings=dict(report.timings) | {"recover_s": self.seconds})


DEFAULT_LR = 1e-4


def _learning_rate(lr: float | None, plan: Plan | None) -> tuple[float, str]:
    """The learning rate recovery uses and where it came from: the caller's, else the plan's recipe's,
    else :data:`DEFAULT_LR`."""
    if lr is not None:
        if not lr > 0:  # also refuses NaN
            raise PlanError(f"recovery's learning rate must be positive, got {lr}.")
        return lr, "argument"
    if plan is not None and plan.recovery.lr is not None:
        return plan.recovery.lr, f"recipe {plan.recipe}"
    return DEFAULT_LR, "default"


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


def recover(
    original: nn.Module,
    converted: nn.Module,
    data: Any,
    *,
    steps: int = 200,
    lr: float | None = None,
    batch_size: int = 32,
    temperature: float = 1.0,
    feature_weight: float = 0.0,
    plan: Plan | None = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    seed: int = 0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    callback: Callable[[int, float], None] | None = None,
    holdout: Any = None,
    eval_every: int = 20,
) -> RecoveryResult:
    """Fine-tune ``converted`` (in place) to reproduce ``original`` on ``data`` for ``steps`` steps.

    ``data``: anything :func:`normswap.load_inputs` takes (a tensor, a list or DataLoader of batches,
    dicts of keyword inputs, an image folder, a tensor file: docs/data-inputs.md), held in memory and
    sampled from, every input of a sample together. Batches go to the converted model's device.
    ``augment(batch, generator)`` transforms each batch before both models see it (the same views for
    teacher and student, e.g. :class:`ImageAugment`): with few samples, matching the original on ever
    new views is what keeps recovery from memorising them.
    ``lr``: the peak learning rate; unset, the ``[recovery] lr`` of the recipe ``plan`` came from, else
    1e-4. ``warmup_steps`` raises it linearly over the first steps, then cosine decay runs over the rest.
    ``callback(step, loss)`` runs after every step (evaluate, log, stop by raising). With
    ``checkpoint_dir`` the run saves its state every ``checkpoint_every`` steps, random states of
    every rank included, and resumes from it: bit for bit the run it would have been, Dropout and
    augmentations drawing from Python's, numpy's or torch's generators included.
    ``holdout`` (a fraction of ``data``, held back from training, or other data) is judged every
    ``eval_every`` steps and the model ends in the best state seen, the start included.
    The converted model is left in the mode it came in; the original is not changed.
    """
    if steps < 1:
        raise PlanError(f"recovery needs at least one step, got {steps}.")
    lr, lr_source = _learning_rate(lr, plan)
    inputs = data if isinstance(data, InputSet) else load_inputs(original, data, batch_size=batch_size)
    if inputs.source == "synthetic":
        raise DataError("recovery needs data: give real samples (a tensor, an image folder, a tensor file or a "
                        "DataLoader).")
    if eval_every < 1:
        raise PlanError(f"eval_every must be at least 1, got {eval_every}.")
    if not 0 <= warmup_steps < steps:
        raise PlanError(f"warmup_steps must be at least 0 and below steps ({steps}), got {warmup_steps}.")
    inputs, judge = held_back(original, inputs, holdout, batch_size)
    pool = inputs.joined()
    rank, world = world_of_ranks()
    student: nn.Module = converted
    if world > 1:
        student = nn.parallel.DistributedDataParallel(converted)
    params = [p for p in converted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, warmup_steps))
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    device = next((p.device for p in converted.parameters()), pool[0].device)
    feature_paths = [e.site.path for e in plan.conversions] if plan is not None and feature_weight > 0 else []
    was_training = converted.training
    original_modes = [(m, m.training) for m in original.modules()]
    original.eval()
    converted.train()
    first = final = float("nan")
    began = time.perf_counter()
    try:
        best = _Best(original, converted, judge) if judge is not inputs else None
        start, restored = _resume(checkpoint_dir, converted, optimizer, schedule, best, generator, rank, world)
        if best is not None and start == 0:
            best.judge(0)
        for _ in range(0 if restored else start):  # a checkpoint without random states: replay the draws
            _draw(pool, batch_size, generator, augment)
        with progress_bar(progress and rank == 0, steps, "recovering", start) as advance:
            for step in range(start, steps):
                batch = _draw(pool, batch_size, generator, augment, device)
                store: dict[str, list[torch.Tensor]] = {}
                with _feature_hooks(original, converted, feature_paths, store):
                    with torch.no_grad():
                        teacher = call_model(original, batch)
                    loss = _distillation_loss(teacher, call_model(student, batch), temperature)
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
                advance(f"loss {value:.4g}")
                if best is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                    best.judge(step + 1)
                if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0:
                    states = gathered(random_states(generator))  # every rank's, collected on every rank
                    if rank == 0:
                        _save(checkpoint_dir, converted, optimizer, schedule, step + 1, best, states)
                if callback is not None:  # after the checkpoint, so a callback that stops loses nothing
                    callback(step + 1, value)
        if best is not None:
            best.restore()
    finally:
        converted.train(was_training)
        for m, mode in original_modes:
            m.training = mode
    result = RecoveryResult(steps, time.perf_counter() - began, first, final, lr, world, start, lr_source=lr_source,
                            warmup_steps=warmup_steps, augment=repr(augment) if augment is not None else "")
    if best is None:
        return result
    return dataclasses.replace(result, holdout_error=tuple(best.errors), kept_step=best.step,
                               held_back=judge.num_samples)


def _schedule(steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then cosine decay to zero.

    Adam's first update moves every weight by about the whole learning rate whatever its gradient: a
    jolt to a pretrained network (two steps at 3e-5 on batches of 4 took Lite1's agreement on its own
    calibration views from 90 % to 72 %), which a warm-up spreads out. On Lite1 it mattered only at a
    rate too high for the run (40 CPU steps at 3e-5: held-out KL 0.119 without, 0.095 with 4 warm-up
    steps; at 1e-5 0.078 and 0.079) and not at all over 600 GPU steps (BENCHMARKS.md), so it is off
    unless asked for."""

    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / (warmup_steps + 1)
        return 0.5 * (1 + math.cos(math.pi * min((i - warmup_steps) / (steps - warmup_steps), 1)))

    return factor


class _Best:
    """The converted model's best state on the held-back data so far, and every judgement."""

    def __init__(self, original: nn.Module, converted: nn.Module, judge: InputSet) -> None:
        self.converted = converted
        self.batches = list(judge.batches)
        with torch.no_grad():
            self.references = [call_model(original, batch) for batch in self.batches]
        self.errors: list[tuple[int, float]] = []
        self.step: int | None = None
        self.error = math.inf
        self.state: dict[str, torch.Tensor] = {}

    def judge(self, step: int) -> None:
        was_training = self.converted.training
        self.converted.eval()
        with torch.no_grad():  # under torchrun over every rank's held-back samples: all decide alike
            error = output_error(self.converted, self.batches, self.references)
        self.converted.train(was_training)
        self.errors.append((step, error))
        if error < self.error:
            self.step, self.error = step, error
            self.state = {k: v.detach().clone() for k, v in self.converted.state_dict().items()}

    def restore(self) -> None:
        if self.state and self.step != self.errors[-1][0]:
            self.converted.load_state_dict(self.state)

    def to_state(self) -> dict[str, Any]:
        return {"errors": self.errors, "step": self.step, "error": self.error, "state": self.state}

    def load(self, saved: dict[str, Any]) -> None:
        self.errors = [(int(s), float(e)) for s, e in saved["errors"]]
        self.step, self.error, self.state = saved["step"], float(saved["error"]), saved["state"]


def _draw(
    pool: Batch,
    batch_size: int,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    device: torch.device | None = None,
) -> Batch:
    """A batch sampled from ``pool`` (every input alike), ``augment`` applied to its first input."""
    size = int(pool[0].shape[0])
    index = torch.randint(0, size, (min(batch_size, size),), generator=generator)
    first, *rest = (t[index] for t in pool)
    if augment is None:
        return Batch((t.to(device) if device is not None else t for t in (first, *rest)), pool.names)
    if device is None:  # replaying the stream on resume: the draws matter, not the views
        augment(first, generator)
        return Batch((first, *rest), pool.names)
    return Batch((augment(first.to(device), generator), *(t.to(device) for t in rest)), pool.names)


@dataclass(frozen=True)
class ImageAugment:
    """Views of an image batch (N, C, H, W) for distillation: a random resized crop per sample
    (``scale`` of the area, aspect in ``ratio``, resized back to ``size`` or the input's side),
    a random horizontal flip, a contrast factor drawn log-uniformly from ``contrast`` (applied around
    each sample's per-channel mean, so it means the same in any normalised input space), and with
    probability ``mix`` a mixup with another sample of the batch (weight drawn from Beta(1, 1)).
    Mixed images are off the data distribution on purpose: the original still answers them, and
    matching those answers teaches the converted model the original's function rather than its
    outputs on a few photos (Beyer et al., "Knowledge distillation: a good teacher is patient and
    consistent", 2022). Contrast matters to a converted model whose norms are per sample: its
    activations' energy, and so what those norms do, follows the image's contrast, which a few
    calibration photos may not span (on Lite1, ``contrast=(0.2, 1)`` lowered held-out KL a little but
    did not raise top-1 agreement; BENCHMARKS.md). Random numbers come from the generator, on the CPU."""

    size: int | None = None
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mix: float = 0.5
    contrast: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        low, high = self.contrast
        if not 0 < low <= high:
            raise PlanError(f"ImageAugment(contrast={self.contrast}): give (low, high) with 0 < low <= high, "
                            f"e.g. (0.25, 1.0); (1.0, 1.0) leaves contrast alone.")

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = batch.shape
        side = (self.size, self.size) if self.size else (h, w)
        area = torch.empty(n).uniform_(*self.scale, generator=generator) * h * w
        log_ratio = torch.empty(n).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=generator)
        ratio = log_ratio.exp()
        crop_w = (area * ratio).sqrt().round().clamp(1, w).long()
        crop_h = (area / ratio).sqrt().round().clamp(1, h).long()
        top = (torch.rand(n, generator=generator) * (h - crop_h + 1)).long()
        left = (torch.rand(n, generator=generator) * (w - crop_w + 1)).long()
        flips = torch.rand(n, generator=generator) < (0.5 if self.flip else 0.0)
        views = []
        for i in range(n):
            t, l_, ch, cw = int(top[i]), int(left[i]), int(crop_h[i]), int(crop_w[i])
            view = F.interpolate(batch[i : i + 1, :, t : t + ch, l_ : l_ + cw], size=side, mode="bilinear",
                                 antialias=True, align_corners=False)
            views.append(view.flip(-1) if flips[i] else view)
        out = self._contrasted(torch.cat(views), generator)
        mixed = torch.rand(n, generator=generator) < self.mix
        partner = torch.randperm(n, generator=generator)
        weight = torch.rand(n, generator=generator).where(mixed, torch.ones(n)).to(out.device, out.dtype)
        return weight.view(n, 1, 1, 1) * out + (1 - weight.view(n, 1, 1, 1)) * out[partner.to(out.device)]

    def _contrasted(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.contrast == (1.0, 1.0):  # draws nothing: runs without contrast replay as before
            return views
        low, high = (math.log(c) for c in self.contrast)
        factor = torch.empty(len(views)).uniform_(low, high, generator=generator).exp()
        factor = factor.to(views.device, views.dtype).view(-1, 1, 1, 1)
        mean = views.mean(dim=(-2, -1), keepdim=True)
        return mean + factor * (views - mean)


def random_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step may draw from: Python's, numpy's, torch's (CPU and each CUDA
    device) and recovery's own sampling generator, in a form ``torch.load(weights_only=True)`` reads."""
    import random

    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                              "sampler": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    import numpy as np

    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states["numpy"] = {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return states


def restore_random_states(states: dict[str, Any], generator: torch.Generator) -> None:
    """Set every random state :func:`random_states` recorded."""
    import random

    random.setstate(_as_tuples(states["python"]))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["sampler"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        saved = states["numpy"]
        np.random.set_state((saved["kind"], saved["key"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["gauss"]))


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the tuples it gave; a checkpoint may hand them back as lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _resume(directory: str | Path | None, model: nn.Module, optimizer: Any, schedule: Any,
            best: _Best | None, generator: torch.Generator, rank: int, world: int) -> tuple[int, bool]:
    """(the step to go on from, whether the random states were restored)."""
    if directory is None or not (Path(directory) / CHECKPOINT).is_file():
        return 0, False
    state = torch.load(Path(directory) / CHECKPOINT, map_location="cpu", weights_only=True)
    if best is not None and "best" not in state:  # checked before anything is loaded: nothing half-resumed
        raise PlanError(f"{Path(directory) / CHECKPOINT} was saved by a run without holdout; resume it "
                        f"without holdout, or start afresh in another checkpoint directory.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if best is not None:
        best.load(state["best"])
    # Each rank's own states; a run resumed on another number of ranks draws anew (not bit-exact).
    states = state.get("random_states", [])
    if len(states) == world:
        restore_random_states(states[rank], generator)
    return int(state["step"]), len(states) == world


def _save(directory: str | Path, model: nn.Module, optimizer: Any, schedule: Any, step: int,
          best: _Best | None, states: list[dict[str, Any]]) -> None:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.{os.getpid()}.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "random_states": states,
            **({"best": best.to_state()} if best is not None else {}),
        },
        tmp,
    )
    os.replace(tmp, folder / CHECKPOINT)

"""Calibration: refit each converted norm layer's affine against the original network.

Sites are fitted in execution order inside the converted model's own forward pass, so each site sees
the converted network's upstream activations (already calibrated ones included) and errors do not
compound. Its target is the original network's pre-activation BatchNorm output at the same path, on
the same batch. The fit is per channel and streamed (sums, not activations), so one pass over the
calibration data fits every site; a second sweep refines the fits with calibrated upstream layers.
Each site's fit is the best for that site, yet downstream nonlinearities can turn better layers into
a worse network (GroupNorm(32) on EfficientNet-Lite1 does), so after every sweep the converted
model's output error is measured and a sweep that made it worse is undone: the calibrated model is
never worse than the uncalibrated one on the data it is judged on. That is the calibration data
unless ``holdout`` holds some back: a fit can memorise a few samples (on 11 photos every fit of the
Lite1 benchmark raised agreement on them and lowered it on other photos), and only data the fit did
not see can tell.
Cost: ``sweeps`` × (one original + two converted forwards) + one original and one converted forward
over the data, whatever the site count.

``fit="reconstruct"`` goes further (BRECQ-style block reconstruction, from post-training quantization):
site by site in execution order, the converted layer's affine *and* the conv/linear that feeds it
(when the plan says it feeds only this site) are fitted by a few Adam steps to reproduce the original
site's output, on the converted network's own upstream activations. Cost: the fit takes one original
and one converted forward over the data (more only when the stored targets exceed a memory budget)
plus the local steps; the never-worse check adds one original and two converted forwards.

Without data, :func:`synthesize_inputs` makes inputs whose per-layer batch statistics match the
original's BatchNorm running statistics (DeepInversion / ZeroQ style), before those statistics are
gone, and calibration runs on them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .data import InputSet, call_model, held_back, load_inputs, model_input_size
from .distributed import average_gradients, distributed, sum_over_ranks, total, world
from .drift import output_error
from .errors import DataError, PlanError, unknown_name
from .layers import AnnealedGroupNorm, GroupRMSNorm, group_rms_norm
from .progress import progress_bar
from .tracing import model_state_guard
from .transfer import NormState, state_after, statistics_aware_affine
from .types import Plan

FITS = ("least-squares", "moments", "blend", "statistics", "reconstruct")
DATA_FREE = "data-free"
DATA_FREE_SOURCE = "data-free (synthesised from BatchNorm running statistics)"


def calibratable(module: nn.Module) -> bool:
    """GroupNorm (layernorm-chw included), GroupRMSNorm (rmsnorm-chw), InstanceNorm and channel
    LayerNorm, timm's norm+act too."""
    if isinstance(module, (nn.GroupNorm, GroupRMSNorm, _InstanceNorm)):
        return True
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The converted layer's output before its affine (and activation), or None if it is not a norm
    normswap can calibrate."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, GroupRMSNorm):
        return group_rms_norm(x, module.num_groups, module.eps)
    if isinstance(module, _InstanceNorm):
        return F.instance_norm(x, eps=module.eps)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        if x.ndim == 2:
            return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return F.layer_norm(x.movedim(1, -1), module.normalized_shape, None, None, module.eps).movedim(-1, 1)
    return None


def _finish(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """timm norm+act modules apply drop and activation after the affine."""
    for name in ("drop", "act"):
        part = getattr(module, name, None)
        if isinstance(part, nn.Module):
            y = part(y)
    return y


def _channels_last_view(t: torch.Tensor) -> torch.Tensor:
    """N×C×… as (samples·positions)×C, for per-channel sums."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]).double()


@dataclass
class _Moments:
    """Per-channel running sums of the normalized input n and the target t."""

    n: torch.Tensor | None = None
    t: torch.Tensor | None = None
    nn_: torch.Tensor | None = None
    tt: torch.Tensor | None = None
    nt: torch.Tensor | None = None
    count: int = 0

    def add(self, n: torch.Tensor, t: torch.Tensor) -> None:
        a, b = _channels_last_view(n), _channels_last_view(t)
        sums = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0))
        if self.n is None:
            self.n, self.t, self.nn_, self.tt, self.nt = sums
        else:
            self.n, self.t, self.nn_, self.tt, self.nt = (
                x + y for x, y in zip((self.n, self.t, self.nn_, self.tt, self.nt), sums, strict=True)
            )
        self.count += a.shape[0]

    def packed(self, channels: int, device: torch.device) -> torch.Tensor:
        """The sums and the count as one vector (zeros where this rank saw nothing)."""
        if self.n is None:
            return torch.zeros(5 * channels + 1, dtype=torch.float64, device=device)
        sums = (self.n, self.t, self.nn_, self.tt, self.nt)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        return torch.cat([x.to(device, torch.float64) for x in sums] + [count])

    @classmethod
    def unpacked(cls, vector: torch.Tensor, channels: int) -> _Moments:
        n, t, nn_, tt, nt = vector[: 5 * channels].view(5, channels)
        return cls(n, t, nn_, tt, nt, int(vector[-1].item()))

    def over_ranks(self, channels: int, device: torch.device) -> _Moments:
        """Every rank's sums added up (itself outside torchrun)."""
        if not distributed():
            return self
        return _Moments.unpacked(sum_over_ranks(self.packed(channels, device)), channels)

    def residual(self) -> float:
        """Sum of squared errors of the per-channel least-squares fit: what a group count is judged by."""
        assert self.n is not None and self.t is not None and self.nn_ is not None
        assert self.tt is not None and self.nt is not None
        k = float(self.count)
        var_n = (self.nn_ / k - (self.n / k) ** 2).clamp_min(0)
        var_t = (self.tt / k - (self.t / k) ** 2).clamp_min(0)
        cov = self.nt / k - (self.n / k) * (self.t / k)
        explained = torch.where(var_n > 1e-10, cov**2 / var_n.clamp_min(1e-10), torch.zeros_like(var_n))
        return float(k * (var_t - explained).clamp_min(0).sum())

    def error_of(self, gamma: torch.Tensor, beta: torch.Tensor) -> float:
        """Sum of squared errors of y = gamma·n + beta against t, from the sums."""
        assert self.n is not None and self.t is not None and self.nn_ is not None
        assert self.tt is not None and self.nt is not None
        g, b, k = gamma.double(), beta.double(), float(self.count)
        sse = self.tt - 2 * g * self.nt - 2 * b * self.t + g * g * self.nn_ + 2 * g * b * self.n + b * b * k
        return float(sse.clamp_min(0).sum())

    def fit(self, kind: str, fallback_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (gamma, beta) mapping n onto t.

        least-squares: gamma = cov(n, t) / var(n); moments: gamma = sign(cov)·std(t)/std(n), matching
        the target's mean and variance; blend: their average. beta = mean(t) − gamma·mean(n).
        Channels whose normalized input is constant keep the transferred gamma."""
        assert self.n is not None and self.t is not None and self.nn_ is not None
        assert self.tt is not None and self.nt is not None
        k = float(self.count)
        mean_n, mean_t = self.n / k, self.t / k
        var_n = (self.nn_ / k - mean_n**2).clamp_min(0)
        var_t = (self.tt / k - mean_t**2).clamp_min(0)
        cov = self.nt / k - mean_n * mean_t
        usable = var_n > 1e-10
        safe = torch.where(usable, var_n, torch.ones_like(var_n))
        least_squares = cov / safe
        moments = torch.sign(cov) * (var_t / safe).sqrt()
        gamma = {"least-squares": least_squares, "moments": moments, "blend": (least_squares + moments) / 2}[kind]
        gamma = torch.where(usable, gamma, fallback_weight.double())
        beta = mean_t - gamma * mean_n
        return gamma, beta


@dataclass(frozen=True)
class CalibrationResult:
    """What calibration did: JSON-friendly, it goes into the conversion report."""

    source: str
    fit: str
    sweeps: int
    samples: int
    calibrated: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    synthesis: dict[str, Any] = field(default_factory=dict)
    # The converted model's output error against the original on the calibration data (KL for
    # classifier logits, else relative L2) before calibration and after each sweep; ``kept_sweeps``
    # is how many sweeps were kept (0: calibration made it worse and was undone). ``judged_on`` says
    # which data that error was measured on: the calibration data itself, or held-back samples.
    output_error: tuple[float, ...] = ()
    kept_sweeps: int = 0
    judged_on: str = "calibration data"
    held_back: int = 0
    # With ``groups="search"``: the group count each GroupNorm site ended with, by path.
    groups: dict[str, int] = field(default_factory=dict)
    # With ``fit="reconstruct"``: each site's error (mean squared error over the target's mean square) on
    # the calibration data before and after its fit, by path, and the parameters each fit moved.
    site_error: dict[str, tuple[float, float]] = field(default_factory=dict)
    fitted: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "fit": self.fit,
            "sweeps": self.sweeps,
            "samples": self.samples,
            "calibrated": list(self.calibrated),
            "skipped": [list(s) for s in self.skipped],
            "synthesis": dict(self.synthesis),
            "output_error": list(self.output_error),
            "kept_sweeps": self.kept_sweeps,
            "judged_on": self.judged_on,
            "held_back": self.held_back,
            "groups": dict(self.groups),
            "site_error": {k: list(v) for k, v in self.site_error.items()},
            "fitted": {k: list(v) for k, v in self.fitted.items()},
        }

    def updated_plan(self, plan: Plan) -> Plan:
        """``plan`` with the group counts calibration chose, so that it replays onto a fresh model
        (then ``load_state_dict``) to exactly the calibrated model."""
        if not self.groups:
            return plan
        entries = tuple(
            dataclasses.replace(
                e,
                options={**e.options, "groups": self.groups[e.site.path], "channels_per_group": None},
                reason=f"{e.reason}; groups={self.groups[e.site.path]} chosen by calibration",
            )
            if e.site.path in self.groups and e.target == "groupnorm"
            else e
            for e in plan.entries
        )
        return dataclasses.replace(plan, entries=entries)


@dataclass(frozen=True)
class _Site:
    path: str
    original: _BatchNorm
    converted: nn.Module
    transfer: str = "statistics"  # the plan's: after "standardize" the producer applies BN's statistics


def _sites(original: nn.Module, converted: nn.Module, plan: Plan | None) -> tuple[list[_Site], list[tuple[str, str]]]:
    originals, converteds = dict(original.named_modules()), dict(converted.named_modules())
    transfers = (
        {e.site.path: str(e.options.get("transfer", "statistics")) for e in plan.conversions if e.site.kind == "module"}
        if plan is not None
        else {p: "statistics" for p, m in originals.items() if isinstance(m, _BatchNorm)}
    )
    sites, skipped = [], []
    for path, transfer in transfers.items():
        old, new = originals.get(path), converteds.get(path)
        if not isinstance(old, _BatchNorm) or new is None:
            continue
        if isinstance(new, AnnealedGroupNorm):
            skipped.append((path, "AnnealedGroupNorm starts from the original's own statistics: nothing to refit"))
        elif not calibratable(new):
            skipped.append((path, f"{type(new).__name__} is not a norm calibration refits"))
        elif getattr(new, "weight", None) is None:
            skipped.append((path, "the converted layer has no affine to refit"))
        else:
            sites.append(_Site(path, old, new, transfer))
    return sites, skipped


def _bn_target(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The original BatchNorm's eval-mode output before any activation of a norm+act module."""
    use_batch = bn.running_mean is None
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, use_batch, 0.0, bn.eps)


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _record_targets(site: _Site, targets: dict[str, list[torch.Tensor]]) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        targets.setdefault(site.path, []).append(_bn_target(site.original, args[0]).detach())

    return hook


GROUP_CANDIDATES = (1, 2, 4, 8, 16, 32)


def _group_candidates(site: _Site, search: bool) -> tuple[int, ...]:
    module = site.converted
    if not search or not isinstance(module, nn.GroupNorm):
        return ()
    c = module.num_channels
    return tuple(sorted({g for g in GROUP_CANDIDATES if c % g == 0} | {module.num_groups}))


def _refit(
    site: _Site,
    targets: dict[str, list[torch.Tensor]],
    moments: dict[Any, _Moments],
    fit: str,
    candidates: tuple[int, ...] = (),
) -> Callable[..., torch.Tensor | None]:
    """Forward hook on the converted site: add this batch, fit on everything so far, and hand the
    calibrated output downstream. With group ``candidates`` every count is fitted alongside; the
    current count is what flows downstream."""
    calls = {"i": 0}

    def hook(module: nn.Module, args: tuple[Any, ...], _out: Any) -> torch.Tensor | None:
        queue = targets.get(site.path, [])
        if calls["i"] >= len(queue):
            return None
        target = queue[calls["i"]]
        calls["i"] += 1
        for g in candidates:  # judged here, chosen after the sweep: downstream sees one count per sweep
            if g != module.num_groups:
                moments.setdefault((site.path, g), _Moments()).add(
                    F.group_norm(args[0], g, None, None, module.eps), target
                )
        n = normalized(module, args[0])
        assert n is not None
        stats = moments.setdefault((site.path, module.num_groups) if candidates else site.path, _Moments())
        stats.add(n, target)
        if fit == "statistics":  # the layer's own (transferred) affine stays: its output is the answer
            return None
        gamma, beta = stats.fit(fit, module.weight.detach())
        view = (1, -1) + (1,) * (n.ndim - 2)
        y = n * gamma.to(n.dtype).view(view) + beta.to(n.dtype).view(view)
        return _finish(module, y)

    return hook


@dataclass(frozen=True, eq=False)
class Calibration:
    """How :func:`normswap.convert` calibrates, as one value: ``convert(model, "small-batch",
    calibration=Calibration(data, fit="reconstruct", holdout=0.25))``. ``calibration=data`` (or
    ``"data-free"``) is short for ``Calibration(data)``. Each field is :func:`calibrate`'s argument of
    the same name."""

    data: Any
    fit: str = "least-squares"
    sweeps: int = 2
    groups: str | None = None
    steps: int = 50
    lr: float = 1e-3
    holdout: Any = None
    synthesis_steps: int = 200
    batch_size: int = 32

    @classmethod
    def of(cls, spec: Any) -> Calibration:
        return spec if isinstance(spec, Calibration) else cls(spec)

    def run(self, original: nn.Module, converted: nn.Module, plan: Plan | None,
            input_size: tuple[int, ...] | None, progress: bool = False) -> CalibrationResult:
        return calibrate(original, converted, self.data, plan=plan, fit=self.fit, sweeps=self.sweeps,
                         batch_size=self.batch_size, groups=self.groups, steps=self.steps, lr=self.lr,
                         holdout=self.holdout, synthesis_steps=self.synthesis_steps, input_size=input_size,
                         progress=progress)


def calibrate(
    original: nn.Module,
    converted: nn.Module,
    data: Any,
    *,
    plan: Plan | None = None,
    fit: str = "least-squares",
    sweeps: int = 2,
    batch_size: int = 32,
    source: str | None = None,
    groups: str | None = None,
    steps: int = 50,
    lr: float = 1e-3,
    holdout: Any = None,
    synthesis_steps: int = 200,
    input_size: tuple[int, ...] | None = None,
    progress: bool = False,
) -> CalibrationResult:
    """Refit the affine of every converted norm layer of ``converted`` (in place) so that, on
    ``data``, it reproduces the original network's BatchNorm output at the same path.

    ``fit``: ``least-squares`` (per-channel regression), ``moments`` (match mean and variance) or
    ``blend``. ``data``: anything :func:`normswap.load_inputs` takes (a tensor, an image folder, a
    tensor file, a DataLoader), or ``"data-free"``: inputs synthesised from the original's BatchNorm
    running statistics (:func:`synthesize_inputs` with ``synthesis_steps`` and ``input_size``, timed
    in ``result.synthesis``). Modes and every other parameter of both models are left as they were. When
    ``converted`` has no site to refit, nothing runs (no synthesis either) and the result says so.

    ``fit="statistics"`` keeps the statistics-aware affine (recomputed for the chosen group count), so
    the data only choose structure; per-site regressions attenuate the signal layer after layer in
    deep networks, and the running statistics do not.

    ``groups="search"`` also chooses each GroupNorm's group count (among 1, 2, 4, …, 32 that divide
    its channels, and its own) by the error of the fit's affine against the original at that site: on
    depthwise networks fewer groups keep far more of the original (see BENCHMARKS.md). The model's
    structure then differs from the plan: use ``result.updated_plan(plan)`` (``convert`` does).

    ``fit="reconstruct"`` also refits each site's producing conv/linear (see the module docstring):
    ``steps`` Adam steps at learning rate ``lr`` per site on minibatches of ``batch_size`` samples.
    Without a ``plan`` the producers are unknown and only the affines are fitted.

    ``holdout``: what the never-worse check judges on. None: the calibration data. A fraction in
    (0, 1): that share of the samples (seeded draw) is held back from the fit and judged on. Data
    (anything ``load_inputs`` takes): judged on it, all of ``data`` is fitted. Hold back whole
    sources (other photos, other recordings): views of one photo on both sides judge memorisation
    as success.

    Under ``torchrun`` (an initialized process group with several ranks) calibration is a collective
    call: run it on every rank, each with its own data (e.g. its DistributedSampler shard). The affine
    fits add up every rank's sums, so they are fits to all the data together and the same on every
    rank (group counts too); ``reconstruct`` adds up its sums and averages its gradients the same
    way; every keep-or-undo check averages the ranks' errors. Data-free, each rank synthesises its own
    inputs.
    """
    if groups not in (None, "search"):
        raise unknown_name("calibration groups mode", str(groups), ["search"], "groups=")
    if fit == "statistics" and groups is None:
        raise PlanError("fit='statistics' keeps the transferred affine, so it only chooses structure: "
                        "use it with groups='search'.")
    if fit not in FITS:
        raise unknown_name("calibration fit", fit, FITS)
    if sweeps < 1:
        raise PlanError(f"calibration needs at least one sweep, got {sweeps}.")
    if fit == "reconstruct" and groups is not None:
        raise PlanError("fit='reconstruct' keeps the group counts: choose them first (fit='statistics', "
                        "groups='search'), then reconstruct.")
    if steps < 1 or not lr > 0:
        raise PlanError(f"reconstruction needs steps ≥ 1 and lr > 0, got steps={steps}, lr={lr}.")
    data_free = isinstance(data, str) and data == DATA_FREE
    if data_free and synthesis_steps < 1:
        raise PlanError(f"data-free calibration needs synthesis_steps ≥ 1, got {synthesis_steps}.")
    sites, skipped = _sites(original, converted, plan)
    if data_free and not sites:  # synthesis takes minutes: not for a model with nothing to refit
        return _nothing_to_refit(DATA_FREE_SOURCE, fit, 0, skipped)
    synthesis: dict[str, Any] = {}
    if data_free:
        data, synthesis = _synthesised(original, synthesis_steps, input_size, progress)
        source = source or DATA_FREE_SOURCE
    inputs = data if isinstance(data, InputSet) else load_inputs(original, data, batch_size=batch_size)
    if inputs.source == "synthetic":
        raise DataError("calibration needs data: give real samples, or calibration='data-free'.")
    inputs, judge = held_back(original, inputs, holdout, batch_size)  # bad holdouts fail either way
    if not sites:
        return _nothing_to_refit(source or inputs.source, fit, inputs.num_samples, skipped)
    job = _Job(original, converted, sites, skipped, inputs, judge, source or inputs.source, progress)
    if fit == "reconstruct":
        result = _reconstruct(job, plan, steps, lr, batch_size)
    else:
        result = _affine_sweeps(job, fit, sweeps, groups)
    apart = judge is not inputs
    judged_on = f"held back: {judge.description}" if apart else "the synthesised inputs" if data_free else None
    return dataclasses.replace(result, synthesis=synthesis, judged_on=judged_on or result.judged_on,
                               samples=total(result.samples), held_back=total(judge.num_samples) if apart else 0)


def _nothing_to_refit(source: str, fit: str, samples: int, skipped: list[tuple[str, str]]) -> CalibrationResult:
    return CalibrationResult(source=source, fit=fit, sweeps=0, samples=samples, calibrated=(), skipped=tuple(skipped))


def _synthesised(original: nn.Module, steps: int, input_size: tuple[int, ...] | None,
                 progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Inputs synthesised from the running statistics, and what the report says of them."""
    started = time.perf_counter()
    # Under torchrun each rank synthesises its own inputs, and the affine fits sum them all.
    inputs = synthesize_inputs(original, steps=steps, input_size=input_size, progress=progress, seed=world()[0])
    return inputs, {"samples": int(inputs.shape[0]), "steps": steps, "seconds": time.perf_counter() - started}


@dataclass(frozen=True)
class _Job:
    """What every fit works on: both models, the sites to refit, the samples that fit them and the
    samples that judge the result."""

    original: nn.Module
    converted: nn.Module
    sites: list[_Site]
    skipped: list[tuple[str, str]]
    inputs: InputSet
    judge: InputSet
    source: str
    progress: bool

    def references(self) -> list[Any]:
        """The original's outputs on the judging samples, which every judgement compares against."""
        return [call_model(self.original, batch) for batch in self.judge.batches]

    def error(self, references: list[Any]) -> float:
        """The converted model's output error on the judging samples, as it is now."""
        return output_error(self.converted, self.judge.batches, references)  # under torchrun: over all ranks


def _affine_sweeps(job: _Job, fit: str, sweeps: int, groups: str | None) -> CalibrationResult:
    """The streamed per-site fits, sweep after sweep, keeping the sweeps that served the outputs."""
    original, converted, sites = job.original, job.converted, job.sites
    # Choosing a count changes what every later site sees, so the last sweep only refits: the final
    # fits are made on the final structure. Searching takes at least two sweeps.
    sweeps = max(sweeps, 2) if groups == "search" else sweeps
    with model_state_guard(original), model_state_guard(converted), torch.no_grad(), \
            progress_bar(job.progress, sweeps, f"calibrating ({fit})") as advance:
        references = job.references()
        errors = [job.error(references)]
        best, kept = _affines(sites), 0
        searched = {s.path: _group_candidates(s, groups == "search") for s in sites}
        for sweep in range(sweeps):
            last = sweep == sweeps - 1
            candidates = {path: () if last else c for path, c in searched.items()}
            _sweep(original, converted, sites, job.inputs.batches, fit, candidates)
            errors.append(job.error(references))
            advance(f"sweep {sweep + 1}")
            if errors[-1] >= min(errors[:-1]):
                # Each site's fit is optimal for that site, but downstream nonlinearities can turn
                # better layers into a worse network: keep what served the outputs best.
                _restore(sites, best)
                break
            best, kept = _affines(sites), sweep + 1
        chosen = {s.path: int(s.converted.num_groups) for s in sites if searched[s.path]}
    # The state guard puts plain attributes back, num_groups too; the chosen counts must outlive it.
    for site in sites:
        if site.path in chosen:
            site.converted.num_groups = chosen[site.path]
    return CalibrationResult(
        source=job.source,
        fit=fit,
        sweeps=sweeps,
        samples=job.inputs.num_samples,
        calibrated=tuple(s.path for s in sites),
        skipped=tuple(job.skipped),
        output_error=tuple(errors),
        kept_sweeps=kept,
        groups=chosen,
    )


def _sweep(
    original: nn.Module,
    converted: nn.Module,
    sites: list[_Site],
    batches: list[Any],
    fit: str,
    candidates: dict[str, tuple[int, ...]],
) -> None:
    moments: dict[Any, _Moments] = {}
    for batch in batches:
        targets: dict[str, list[torch.Tensor]] = {}
        handles = [s.original.register_forward_pre_hook(_record_targets(s, targets)) for s in sites]
        with _hooks(handles):
            call_model(original, batch)
        handles = [
            s.converted.register_forward_hook(_refit(s, targets, moments, fit, candidates[s.path])) for s in sites
        ]
        with _hooks(handles):
            call_model(converted, batch)
    _add_up_ranks_sums(moments, sites, candidates)
    for site in sites:
        if candidates[site.path]:
            fitted = {g: moments[(site.path, g)] for g in candidates[site.path] if (site.path, g) in moments}
            if not fitted:
                continue
            site.converted.num_groups = min(fitted, key=lambda g: _site_error(site, g, fitted[g], fit))
            stats = fitted[site.converted.num_groups]
        elif site.path in moments:
            stats = moments[site.path]
        else:
            continue
        if fit == "statistics":
            gamma, beta = _statistics_affine(site, _statistics_groups(site.converted))
        else:
            gamma, beta = stats.fit(fit, site.converted.weight.detach())
        site.converted.weight.copy_(gamma.to(site.converted.weight.dtype))
        site.converted.bias.copy_(beta.to(site.converted.bias.dtype))


def _add_up_ranks_sums(moments: dict[Any, _Moments], sites: list[_Site],
                       candidates: dict[str, tuple[int, ...]]) -> None:
    """Every rank's sums, added up in place: the fits after a sweep are then those of all the ranks'
    data together, and the same on every rank. (Within a sweep each rank streams its own fits
    downstream; those only shape what later sites see.)"""
    if not distributed():
        return
    keys = [((s.path, g) if candidates[s.path] else s.path, s.converted.weight.numel())
            for s in sites for g in (candidates[s.path] or (None,))]
    device = next((m.n.device for m in moments.values() if m.n is not None), torch.device("cpu"))
    summed = sum_over_ranks(torch.cat([moments.get(k, _Moments()).packed(c, device) for k, c in keys]))
    offset = 0
    for key, channels in keys:
        part = summed[offset: offset + 5 * channels + 1]
        offset += part.numel()
        if part[-1] > 0:  # seen by some rank
            moments[key] = _Moments.unpacked(part, channels)


def _statistics_affine(site: _Site, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    centred = not isinstance(site.converted, GroupRMSNorm)
    state = state_after(NormState.from_module(site.original), site.transfer)
    return statistics_aware_affine(state, groups, site.converted.eps, centred)


def _statistics_groups(module: nn.Module) -> int:
    """How many channel groups the layer takes its statistics over, as statistics_aware_affine counts."""
    if isinstance(module, (nn.GroupNorm, GroupRMSNorm)):
        return int(module.num_groups)
    if isinstance(module, _InstanceNorm):
        return int(module.num_features)
    return 1  # LayerNorm over the channels


def _site_error(site: _Site, groups: int, stats: _Moments, fit: str) -> float:
    """How well a group count can serve this site: the error of the affine the fit would give it."""
    if fit == "statistics":
        return stats.error_of(*_statistics_affine(site, groups))
    return stats.residual()


_State = tuple[torch.Tensor, torch.Tensor, int | None]


def _affines(sites: list[_Site]) -> list[_State]:
    """What calibration changes at each site: the affine, and a GroupNorm's group count."""
    return [
        (m.weight.detach().clone(), m.bias.detach().clone(), getattr(m, "num_groups", None))
        for m in (s.converted for s in sites)
    ]


def _restore(sites: list[_Site], states: list[_State]) -> None:
    for site, (weight, bias, groups) in zip(sites, states, strict=True):
        site.converted.weight.copy_(weight)
        site.converted.bias.copy_(bias)
        if groups is not None:
            site.converted.num_groups = groups


RECONSTRUCTION_MEMORY = 2 << 30  # bytes of the original sites' stored inputs per pass


class _Stop(Exception):
    """Ends a forward pass once the sites it was run for are done."""


def _reconstruct(job: _Job, plan: Plan | None, steps: int, lr: float, batch_size: int) -> CalibrationResult:
    original, converted, sites = job.original, job.converted, job.sites
    x = _joined(job.inputs)
    producers = _exclusive_producers(converted, plan)
    fitted = {s.path: _fitted_parameters(s, producers.get(s.path)) for s in sites}
    with model_state_guard(original), model_state_guard(converted), torch.no_grad(), \
            progress_bar(job.progress, len(sites), "reconstructing") as advance:
        references = job.references()
        errors = [job.error(references)]
        before = [p.detach().clone() for params in fitted.values() for _, p in params]
        site_error: dict[str, tuple[float, float]] = {}
        remaining = list(sites)
        while remaining:
            targets = _original_inputs(original, remaining, x)
            if not targets:
                break
            chunk = [s for s in remaining if s.path in targets]
            _fit_in_order(converted, chunk, producers, fitted, targets, x, steps, lr, batch_size, site_error,
                          advance)
            remaining = [s for s in remaining if s not in chunk]  # a pass that reaches none of them ends it
        errors.append(job.error(references))
        kept = 1
        if errors[-1] >= errors[0]:  # as for the other fits: never worse than uncalibrated on the data
            for (_, p), old in zip((q for params in fitted.values() for q in params), before, strict=True):
                p.copy_(old)
            kept = 0
    return CalibrationResult(
        source=job.source,
        fit="reconstruct",
        sweeps=1,
        samples=job.inputs.num_samples,
        calibrated=tuple(s.path for s in sites if s.path in site_error),
        skipped=tuple(job.skipped) + tuple((s.path, "not reached by the forward pass") for s in sites
                                       if s.path not in site_error),
        output_error=tuple(errors),
        kept_sweeps=kept,
        site_error=site_error,
        fitted={path: tuple(name for name, _ in params) for path, params in fitted.items()},
    )


def _joined(inputs: InputSet) -> tuple[torch.Tensor, ...]:
    """All calibration batches as one: every site is fitted on all of the data at once."""
    return inputs.joined()


def _exclusive_producers(converted: nn.Module, plan: Plan | None) -> dict[str, tuple[str, nn.Module]]:
    """Site path → (path, module) of the conv/linear that feeds only it, from the plan's facts."""
    if plan is None:
        return {}
    modules = dict(converted.named_modules())
    out = {}
    for entry in plan.conversions:
        site = entry.site
        producer = modules.get(site.producer) if site.producer else None
        if producer is not None and site.producer_exclusive and site.producer_foldable:
            out[site.path] = (str(site.producer), producer)
    return out


def _fitted_parameters(site: _Site, producer: tuple[str, nn.Module] | None) -> list[tuple[str, nn.Parameter]]:
    params = [(f"{site.path}.{n}", p) for n, p in site.converted.named_parameters() if p.is_floating_point()]
    if producer is not None:
        params += [(f"{producer[0]}.{n}", p) for n, p in producer[1].named_parameters() if p.is_floating_point()]
    return params


def _original_inputs(original: nn.Module, sites: list[_Site], x: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """What each original site receives on all of ``x``, in execution order, until they fill the memory
    budget; the pass stops there. (Its input, not its output: both the BatchNorm output before the
    activation and the module's output derive from it.)"""
    stored: dict[str, torch.Tensor] = {}
    size = [0]

    def keep(path: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if path in stored or not args or not isinstance(args[0], torch.Tensor):
                return
            stored[path] = args[0].detach()
            size[0] += stored[path].numel() * stored[path].element_size()
            if size[0] >= RECONSTRUCTION_MEMORY:
                raise _Stop

        return hook

    with _hooks([s.original.register_forward_pre_hook(keep(s.path)) for s in sites]), suppress(_Stop):
        call_model(original, x)
    return stored


def _fit_in_order(
    converted: nn.Module,
    chunk: list[_Site],
    producers: dict[str, tuple[str, nn.Module]],
    fitted: dict[str, list[tuple[str, nn.Parameter]]],
    targets: dict[str, torch.Tensor],
    x: tuple[torch.Tensor, ...],
    steps: int,
    lr: float,
    batch_size: int,
    site_error: dict[str, tuple[float, float]],
    advance: Callable[..., None],
) -> None:
    """One converted forward; at each chunk site (before its producer runs) fit it on its input. The
    pass ends after the last site the original reached (``targets`` is in execution order)."""
    last = next(reversed(targets))

    def fit_here(site: _Site, head: nn.Module | None) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if site.path in site_error or site.path not in targets:
                return
            site_error[site.path] = _fit_site(site, head, fitted[site.path], args[0].detach(),
                                              targets.pop(site.path), steps, lr, batch_size, seed=len(site_error))
            advance(site.path)
            if site.path == last:
                raise _Stop

        return hook

    handles = []
    for site in chunk:
        producer = producers.get(site.path)
        entry = producer[1] if producer is not None else site.converted
        handles.append(entry.register_forward_pre_hook(fit_here(site, producer[1] if producer else None)))
    with _hooks(handles), suppress(_Stop):
        call_model(converted, x)


def _fit_site(
    site: _Site,
    head: nn.Module | None,
    params: list[tuple[str, nn.Parameter]],
    inp: torch.Tensor,
    original_input: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[float, float]:
    """Fit ``params`` so that the converted site (its producer ``head`` first) on ``inp`` reproduces the
    original site on ``original_input``: the least-squares affine first (closed form, kept if it helps;
    a few small Adam steps cannot travel far), then Adam on everything. The relative error before and after."""
    module = site.converted

    def run(t: torch.Tensor) -> torch.Tensor:  # forward, not __call__: no hooks
        return module.forward(head.forward(t) if head is not None else t)

    def target(part: torch.Tensor) -> torch.Tensor:  # made per batch: the set's worth costs memory
        return site.original.forward(part).detach().float()

    chunks = [slice(i, i + 64) for i in range(0, len(inp), 64)]
    count = max(total(original_input.numel()), 1)

    def squared_sums() -> tuple[float, float]:
        """Sums of the squared error and of the squared target over the whole set (every rank's)."""
        err = size = 0.0
        for c in chunks:
            t = target(original_input[c])
            err += float((run(inp[c]).float() - t).pow(2).sum())
            size += float(t.pow(2).sum())
        err, size = sum_over_ranks(torch.tensor([err, size], dtype=torch.float64)).tolist()
        return err, size

    first_sum, target_sum = squared_sums()
    scale = max(target_sum / count, 1e-12)

    def error() -> float:
        return squared_sums()[0] / count / scale

    first = first_sum / count / scale
    _least_squares_start(module, head, inp, site, original_input, error, first)
    trainable = [p.requires_grad for _, p in params]
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _, p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam([p for _, p in params], lr=lr)
        for _ in range(steps):
            pick = torch.randperm(len(inp), generator=generator)[:batch_size].to(inp.device)
            loss = (run(inp[pick]).float() - target(original_input[pick])).pow(2).mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients([p for _, p in params])  # every rank takes the same step
            optimizer.step()
        for (_, p), was in zip(params, trainable, strict=True):
            p.grad = None
            p.requires_grad_(was)
    return first, error()


def _least_squares_start(
    module: nn.Module,
    head: nn.Module | None,
    inp: torch.Tensor,
    site: _Site,
    original_input: torch.Tensor,
    error: Callable[[], float],
    current: float,
    chunk: int = 32,
) -> None:
    """Set the affine to the per-channel least-squares fit against the original's BatchNorm output
    (before its activation), unless that does not lower the site's error. Sums are taken over chunks
    of samples: in float64, the whole set at once costs several times the activations."""
    stats = _Moments()
    for i in range(0, len(inp), chunk):
        part = inp[i:i + chunk]
        n = normalized(module, head.forward(part) if head is not None else part)
        assert n is not None
        stats.add(n, _bn_target(site.original, original_input[i:i + chunk]))
    stats = stats.over_ranks(module.weight.numel(), inp.device)
    old = module.weight.detach().clone(), module.bias.detach().clone()
    gamma, beta = stats.fit("least-squares", old[0])
    module.weight.copy_(gamma.to(old[0].dtype))
    module.bias.copy_(beta.to(old[1].dtype))
    if error() >= current:
        module.weight.copy_(old[0])
        module.bias.copy_(old[1])


def synthesize_inputs(
    original: nn.Module,
    num_samples: int = 32,
    steps: int = 200,
    input_size: tuple[int, ...] | None = None,
    seed: int = 0,
    lr: float = 0.05,
    progress: bool = False,
) -> torch.Tensor:
    """Inputs whose per-layer batch statistics match the original's BatchNorm running statistics.

    Starting from noise, Adam moves the inputs to minimise, summed over every BatchNorm with running
    statistics, the standardized gap between the batch mean/std of its input and its running
    mean/std, with small random shifts per step (DeepInversion's jitter) so the inputs do not overfit
    one alignment. The model is run in eval mode and not changed.
    """
    size = input_size or model_input_size(original)
    if size is None:
        raise DataError(f"{type(original).__name__} has no timm input config; pass input_size=(C, H, W).")
    bns = [m for m in original.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if not bns:
        raise PlanError("data-free calibration needs BatchNorm running statistics, and this model has none.")
    param = next((p for p in original.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((num_samples, *size), generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    losses: list[torch.Tensor] = []

    def statistics_gap(module: _BatchNorm, args: tuple[Any, ...]) -> None:
        h = args[0].float()
        dims = [0, *range(2, h.ndim)]
        scale = (module.running_var.float() + module.eps).sqrt()
        mean_gap = (h.mean(dims) - module.running_mean.float()) / scale
        std_gap = (h.var(dims, unbiased=False) + module.eps).sqrt() / scale - 1
        losses.append(mean_gap.pow(2).mean() + std_gap.pow(2).mean())

    with model_state_guard(original), _hooks([m.register_forward_pre_hook(statistics_gap) for m in bns]), \
            progress_bar(progress, steps, "synthesising inputs") as advance:
        for step in range(steps):
            losses.clear()
            shifted = _jitter(x, step, seed) if len(size) >= 2 else x
            original(shifted.to(param.dtype) if param is not None else shifted)
            loss = torch.stack(losses).sum() + 1e-4 * x.pow(2).mean()
            (grad,) = torch.autograd.grad(loss, x)
            optimizer.zero_grad()
            x.grad = grad
            optimizer.step()
            advance(f"statistics gap {float(loss.detach()):.3g}")
    return x.detach()


def _jitter(x: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    shifts = torch.randint(-2, 3, (2,), generator=g).tolist()
    return torch.roll(x, shifts=shifts, dims=(-2, -1))

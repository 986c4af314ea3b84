"""Output-drift validation: how much a conversion changed what the network computes, and where.

One pass over the inputs compares the final outputs leaf by leaf and, at every converted site, the
activation after the site (cumulative drift, against the original model's activation at the same
path) and the site's own error (local drift: the converted layer, with the conv/linear that feeds only
it, against the original ones on the same input). Statistics are streamed, so memory stays bounded:
original activations are held for one batch and, when they would exceed ``activation_budget`` bytes,
for a group of sites at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cloning import clone_model
from .checks import batch_dependence, count_parameters, first_tensor
from .data import InputSet, call_model, load_inputs
from .distributed import mean_over_ranks
from .errors import DataError, NormswapError
from .progress import progress_bar
from .tracing import model_state_guard
from .types import DriftReport, ModelStats, OutputDrift, Plan, Site, SiteDrift

DEFAULT_ACTIVATION_BUDGET = 1 << 30


class ValidationFailed(NormswapError):
    """A drift threshold failed (raised only with ``strict=True``; the CLI exits with this code)."""

    exit_code = 11

    def __init__(self, report: DriftReport) -> None:
        super().__init__("validation failed: " + "; ".join(report.failures))
        self.report = report


@dataclass
class _Stream:
    """Running sums for relative L2, per-sample cosine and max abs error between two tensors."""

    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cos_sum: float = 0.0
    samples: int = 0
    max_abs: float = 0.0
    calls: int = 0

    def add(self, ref: torch.Tensor, new: torch.Tensor) -> None:
        a = ref.detach().double().reshape(ref.shape[0], -1) if ref.ndim > 1 else ref.detach().double()[None]
        b = new.detach().double().reshape(a.shape)
        self.diff_sq += float((a - b).pow(2).sum())
        self.ref_sq += float(a.pow(2).sum())
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
        # Two all-zero samples (a zero-initialised gamma, say) are identical, not orthogonal.
        both_zero = (a.abs().amax(1) == 0) & (b.abs().amax(1) == 0)
        self.cos_sum += float(torch.where(both_zero, torch.ones_like(cos), cos).sum())
        self.samples += a.shape[0]
        self.max_abs = max(self.max_abs, float((a - b).abs().max()) if a.numel() else 0.0)
        self.calls += 1

    @property
    def relative_l2(self) -> float | None:
        """None where undefined: the original is all zeros and the converted is not."""
        if self.ref_sq > 0:
            return (self.diff_sq / self.ref_sq) ** 0.5
        return 0.0 if self.diff_sq == 0 else None

    @property
    def cosine(self) -> float | None:
        return self.cos_sum / self.samples if self.samples else None


@dataclass
class _OutputStream(_Stream):
    shape: tuple[int, ...] = ()
    top1: float = 0.0
    top5: float = 0.0
    kl: float = 0.0
    classifier: bool = False

    def add(self, ref: torch.Tensor, new: torch.Tensor) -> None:
        super().add(ref, new)
        self.shape = tuple(ref.shape)
        self.classifier = ref.ndim == 2 and ref.shape[1] > 1
        if self.classifier:
            a, b = ref.detach().double(), new.detach().double()
            self.top1 += float((a.argmax(1) == b.argmax(1)).sum())
            k = min(5, b.shape[1])
            self.top5 += float((b.topk(k, dim=1).indices == a.argmax(1, keepdim=True)).any(1).sum())
            log_p, log_q = a.log_softmax(1), b.log_softmax(1)
            self.kl += float((log_p.exp() * (log_p - log_q)).sum())

    def result(self, name: str) -> OutputDrift:
        extra = {}
        if self.classifier and self.samples:
            extra = {
                "top1_agreement": self.top1 / self.samples,
                "top5_agreement": self.top5 / self.samples,
                "kl_divergence": self.kl / self.samples,
            }
        return OutputDrift(name, self.shape, self.relative_l2, self.cosine, self.max_abs, **extra)


def output_leaves(output: Any, name: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a model output (tuple, list, dict, timm features_only lists), named by path."""
    if isinstance(output, torch.Tensor):
        yield name, output
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from output_leaves(value, f"{name}[{key!r}]")
    elif isinstance(output, (list, tuple)):
        for i, value in enumerate(output):
            yield from output_leaves(value, f"{name}[{i}]")


def output_error(converted: nn.Module, batches: list[Any], references: list[Any]) -> float:
    """Mean over output leaves and batches: KL(original ‖ converted) for classifier logits (what
    top-1 agreement follows), relative L2 for anything else. Under ``torchrun`` it is a collective
    call, the mean over the ranks weighted by their samples: the never-worse checks of calibration and
    recovery that decide by it then decide alike on every rank."""
    terms = []
    for batch, reference in zip(batches, references, strict=True):
        output = call_model(converted, batch)
        for (_, ref), (_, out) in zip(output_leaves(reference), output_leaves(output), strict=True):
            ref, out = ref.float(), out.float()
            if ref.ndim == 2 and ref.shape[1] > 1:
                terms.append(float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True,
                                            reduction="batchmean")))
            else:
                terms.append(float((out - ref).norm() / ref.norm().clamp_min(1e-12)))
    return mean_over_ranks(sum(terms) / max(len(terms), 1), sum(int(batch[0].shape[0]) for batch in batches))


@dataclass(frozen=True)
class _SiteSpec:
    path: str
    target: str
    chain: tuple[str, ...]
    in_original: bool
    estimated_bytes: int


def site_specs(original: nn.Module, converted: nn.Module, plan: Plan | None) -> list[_SiteSpec]:
    """The converted sites to watch: from the plan, or where the module class changed."""
    original_modules = dict(original.named_modules())
    converted_modules = dict(converted.named_modules())
    specs = []
    if plan is not None:
        for e in plan.conversions:
            if e.site.path not in converted_modules:
                continue
            chain = _local_chain(e.site, original_modules, converted_modules)
            shape = e.site.input_shape or ()
            per_sample = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 0
            specs.append(
                _SiteSpec(
                    e.site.path,
                    e.target or "",
                    chain,
                    all(p in original_modules for p in chain),
                    per_sample * 8 * max(e.site.call_count, 1),
                )
            )
        return specs
    for path, module in converted_modules.items():
        old = original_modules.get(path)
        if path and old is not None and type(old) is not type(module) and not list(module.children()):
            specs.append(_SiteSpec(path, type(module).__name__, (path,), True, 0))
    return specs


def _local_chain(site: Site, original: dict[str, nn.Module], converted: dict[str, nn.Module]) -> tuple[str, ...]:
    """The modules whose error is the site's own: the site, with the conv/linear that feeds only it, as
    folding, ``standardize`` and calibration's ``reconstruct`` rewrite that producer too (measuring the site
    alone on a rewritten producer's output compares different quantities). Unchanged producers cost
    nothing: both models compute the same thing there."""
    producer = site.producer
    if producer and site.producer_exclusive and producer in original and producer in converted:
        return (producer, site.path)
    return (site.path,)


def _groups(specs: list[_SiteSpec], batch: int, budget: int) -> list[list[_SiteSpec]]:
    groups: list[list[_SiteSpec]] = [[]]
    used = 0
    for spec in specs:
        cost = spec.estimated_bytes * batch
        if groups[-1] and used + cost > budget:
            groups.append([])
            used = 0
        groups[-1].append(spec)
        used += cost
    return groups


@contextmanager
def _hooks(pairs: Sequence[tuple[nn.Module, Callable[..., Any], bool]]) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn) for m, fn, pre in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class _SiteStreams:
    local: dict[str, _Stream] = field(default_factory=dict)
    cumulative: dict[str, _Stream] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)


def _run_original(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    try:
        return call_model(model, inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise DataError(
            f"the original {type(model).__name__} failed on validation inputs of shape {shapes}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Give inputs the model "
            f"accepts: example_inputs=... or data=... (API), --input-size C,H,W or --data (CLI)."
        ) from exc


class _DriftRun:
    """Runs both models over the batches and streams every comparison."""

    def __init__(self, original: nn.Module, converted: nn.Module, specs: list[_SiteSpec], budget: int) -> None:
        self.original, self.converted, self.specs, self.budget = original, converted, specs, budget
        self.outputs: dict[str, _OutputStream] = {}
        self.sites = _SiteStreams()

    def batch(self, inputs: tuple[torch.Tensor, ...]) -> None:
        groups = _groups(self.specs, int(inputs[0].shape[0]), self.budget)
        for index, group in enumerate(groups):
            stored: dict[str, list[torch.Tensor]] = {}
            with _hooks(self._original_hooks(group, stored)):
                ref = _run_original(self.original, inputs)
            with _hooks(self._converted_hooks(group, stored, local=index == 0)):
                new = call_model(self.converted, inputs)
            if index == 0:
                self._compare_outputs(ref, new)

    def _original_hooks(self, group: list[_SiteSpec], stored: dict[str, list[torch.Tensor]]) -> list[Any]:
        def keep(path: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _args: Any, out: Any) -> None:
                stored.setdefault(path, []).append(first_tensor(out).detach().clone())

            return hook

        modules = dict(self.original.named_modules())
        return [(modules[s.path], keep(s.path), False) for s in group if s.in_original and s.path in modules]

    def _converted_hooks(self, group: list[_SiteSpec], stored: dict[str, list[torch.Tensor]], local: bool) -> list[Any]:
        modules = dict(self.converted.named_modules())
        originals = dict(self.original.named_modules())
        pairs: list[Any] = []
        for spec in group:
            pairs.append((modules[spec.path], self._compare_site(spec, stored), False))
            if local and spec.in_original:
                stash: dict[str, Any] = {}
                pairs.append((modules[spec.chain[0]], self._stash(stash), True))
                pairs.append((modules[spec.path], self._local(spec, stash, originals), False))
        return pairs

    def _compare_site(self, spec: _SiteSpec, stored: dict[str, list[torch.Tensor]]) -> Callable[..., None]:
        calls = iter(range(1 << 30))

        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            self.sites.order.setdefault(spec.path, len(self.sites.order))
            refs = stored.get(spec.path, [])
            i = next(calls)
            if i < len(refs):
                self.sites.cumulative.setdefault(spec.path, _Stream()).add(refs[i], first_tensor(out))

        return hook

    @staticmethod
    def _stash(stash: dict[str, Any]) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any) -> None:
            stash["args"] = args

        return hook

    def _local(self, spec: _SiteSpec, stash: dict[str, Any], originals: dict[str, nn.Module]) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            args = stash.pop("args", None)
            if args is None:
                return
            y = originals[spec.chain[0]](*args)
            for path in spec.chain[1:]:
                y = originals[path](y)
            self.sites.local.setdefault(spec.path, _Stream()).add(first_tensor(y), first_tensor(out))

        return hook

    def _compare_outputs(self, ref: Any, new: Any) -> None:
        ref_leaves, new_leaves = list(output_leaves(ref)), list(output_leaves(new))
        if [n for n, _ in ref_leaves] != [n for n, _ in new_leaves]:
            raise NormswapError(
                "the converted model's output structure differs from the original's: "
                f"{[n for n, _ in ref_leaves][:5]} vs {[n for n, _ in new_leaves][:5]}."
            )
        for (name, a), (_, b) in zip(ref_leaves, new_leaves, strict=True):
            if a.shape != b.shape:
                raise NormswapError(f"{name}: output shape changed from {tuple(a.shape)} to {tuple(b.shape)}.")
            self.outputs.setdefault(name, _OutputStream()).add(a, b)

    def site_results(self) -> tuple[SiteDrift, ...]:
        results = []
        for spec in self.specs:
            local, cumulative = self.sites.local.get(spec.path), self.sites.cumulative.get(spec.path)
            calls = max(s.calls for s in (local, cumulative) if s is not None) if (local or cumulative) else 0
            results.append(
                SiteDrift(
                    path=spec.path,
                    target=spec.target,
                    order=self.sites.order.get(spec.path, -1),
                    calls=calls,
                    local_relative_l2=local.relative_l2 if local else None,
                    relative_l2=cumulative.relative_l2 if cumulative else None,
                    cosine=cumulative.cosine if cumulative else None,
                )
            )
        return tuple(sorted(results, key=lambda s: (s.order < 0, s.order)))


def measure_latency(model: nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int) -> float:
    with torch.no_grad():
        call_model(model, inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(model, inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_forward_memory(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    """Bytes a forward pass allocates at its peak, beyond what existed before it: CUDA's allocator
    statistics on a GPU, torch.profiler's memory events on the CPU."""
    device = inputs[0].device
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            call_model(model, inputs)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device) - base)
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call_model(model, inputs)
    records = []
    for event in prof.events():
        usage = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if usage:
            records.append((event.time_range.start, usage))
    current = peak = 0
    for _, delta in sorted(records):
        current += delta
        peak = max(peak, current)
    return int(peak)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side prints start/stop lines (and, on a CUDA build without a GPU, a device
    error) straight to file descriptor 2; they are noise in a report."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def train_eval_gap(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float | None:
    """Relative difference of train-mode and eval-mode outputs (0 for norms without running stats).
    Runs on a copy so running statistics are not touched."""
    probe = clone_model(model)
    with torch.no_grad():
        try:
            train = first_tensor(call_model(probe.train(), inputs)).double()
        except Exception:  # BatchNorm cannot train on one value per channel: the gap is undefined
            return None
        evaluated = first_tensor(call_model(probe.eval(), inputs)).double()
    return float((train - evaluated).norm() / evaluated.norm().clamp_min(1e-12))


def _model_stats(model: nn.Module, inputs: tuple[torch.Tensor, ...], measure: bool, repeats: int) -> ModelStats:
    params, buffers = count_parameters(model)
    dependence = None
    if inputs[0].shape[0] >= 2 and len(inputs) == 1:
        try:
            dependence = batch_dependence(model, inputs[0])
        except Exception:  # a model that cannot run in train mode on this batch has no figure here
            dependence = None
    with model_state_guard(model):
        latency = measure_latency(model, inputs, repeats) if measure else None
        peak = peak_forward_memory(model, inputs) if measure else None
    return ModelStats(params, buffers, latency, peak, dependence)


def _failures(outputs: Sequence[OutputDrift], max_drift: float | None, min_top1: float | None) -> list[str]:
    failures = []
    for o in outputs:
        if max_drift is not None and (o.relative_l2 is None or o.relative_l2 > max_drift):
            shown = "undefined (original output is zero)" if o.relative_l2 is None else f"{o.relative_l2:.4g}"
            failures.append(f"{o.name}: relative L2 {shown} > max drift {max_drift:g}")
        if min_top1 is not None and o.top1_agreement is not None and o.top1_agreement < min_top1:
            failures.append(f"{o.name}: top-1 agreement {o.top1_agreement:.4g} < {min_top1:g}")
    if min_top1 is not None and not any(o.top1_agreement is not None for o in outputs):
        failures.append("min top-1 agreement was asked for, but no output is classifier-shaped (N×K)")
    return failures


def validate(
    original: nn.Module,
    converted: nn.Module,
    inputs: Any = None,
    *,
    plan: Plan | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    measure: bool = True,
    repeats: int = 5,
    max_drift: float | None = None,
    min_top1_agreement: float | None = None,
    strict: bool = False,
    activation_budget: int = DEFAULT_ACTIVATION_BUDGET,
    progress: bool = False,
) -> DriftReport:
    """Compare ``converted`` against ``original`` on ``inputs`` (see :func:`normswap.data.load_inputs`:
    None means synthetic inputs from the model's input config, with a warning).

    Both models run in eval mode (restored afterwards); batch independence and the train/eval gap use
    copies in train mode. With ``strict`` a failed threshold raises :class:`ValidationFailed`;
    otherwise it is recorded in ``failures``.
    """
    data = inputs if isinstance(inputs, InputSet) else load_inputs(original, inputs, batch_size=batch_size)
    batches = data.batches[:max_batches] if max_batches else data.batches
    run = _DriftRun(original, converted, site_specs(original, converted, plan), activation_budget)
    with model_state_guard(original), model_state_guard(converted), torch.no_grad(), \
            progress_bar(progress, len(batches), "validating") as advance:
        for batch in batches:
            _check_batch(batch)
            run.batch(batch)
            advance()
    outputs = tuple(stream.result(name) for name, stream in run.outputs.items())
    first = batches[0]
    report = DriftReport(
        input_source=data.source,
        input_description=data.description,
        num_samples=sum(int(b[0].shape[0]) for b in batches),
        outputs=outputs,
        sites=run.site_results(),
        original=_model_stats(original, first, measure, repeats),
        converted=_model_stats(converted, first, measure, repeats),
        train_eval_gap=train_eval_gap(converted, first) if first[0].shape[0] >= 2 else None,
        thresholds={
            k: v for k, v in (("max_drift", max_drift), ("min_top1_agreement", min_top1_agreement)) if v is not None
        },
        failures=tuple(_failures(outputs, max_drift, min_top1_agreement)),
        warnings=data.warnings,
    )
    if strict and report.failures:
        raise ValidationFailed(report)
    return report


def _check_batch(batch: tuple[torch.Tensor, ...]) -> None:
    if not batch or batch[0].shape[0] == 0:
        raise DataError("an empty batch reached validation.")

"""Output-drift validation: how much a conversion changed what the network computes, and where.

One pass over the inputs compares the final outputs leaf by leaf (``normswap.outputs``: leaves whose
shape changed become findings, detection records are matched box by box) and, at every converted site, the
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
from .checks import (
    BatchDependence,
    NotMeasurable,
    count_parameters,
    first_tensor,
    measure_batch_dependence,
    seeded,
    train_mode_forward,
)
from .data import InputSet, call_model, load_inputs
from .distributed import mean_over_ranks
from .errors import DataError, NormswapError
from .progress import progress_bar
from .tracing import model_state_guard
from .outputs import OutputComparison, Stream, agreeing_leaves, is_class_scores, leaves, output_leaves
from .types import DriftReport, ModelStats, OutputDrift, OutputFinding, Plan, Site, SiteDrift

DEFAULT_ACTIVATION_BUDGET = 1 << 30


class ValidationFailed(NormswapError):
    """A drift threshold failed (raised only with ``strict=True``; the CLI exits with this code)."""

    exit_code = 11

    def __init__(self, report: DriftReport) -> None:
        super().__init__("validation failed: " + "; ".join(report.failures))
        self.report = report


def output_error(converted: nn.Module, batches: list[Any], references: list[Any]) -> float:
    """Mean over output leaves and batches: KL(original ‖ converted) for class-score leaves (what
    top-1 agreement follows; :func:`normswap.outputs.is_class_scores`), relative L2 for anything else;
    leaves whose shape changed or that are empty are left out. Under ``torchrun`` it is a collective
    call, the mean over the ranks weighted by their samples: the never-worse checks of calibration and
    recovery that decide by it then decide alike on every rank."""
    terms = []
    for batch, reference in zip(batches, references, strict=True):
        output = call_model(converted, batch)
        samples = int(batch[0].shape[0])
        produced = dict(output_leaves(output))
        for leaf in leaves(reference):
            out = produced.get(leaf.name)
            if out is None or out.shape != leaf.tensor.shape or out.numel() == 0:
                continue
            ref, out = leaf.tensor.float(), out.float()
            if is_class_scores(leaf, samples):
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
    local: dict[str, Stream] = field(default_factory=dict)
    cumulative: dict[str, Stream] = field(default_factory=dict)
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
        self.outputs = OutputComparison()
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
                self._compare_outputs(ref, new, int(inputs[0].shape[0]))

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
                self.sites.cumulative.setdefault(spec.path, Stream()).add(refs[i], first_tensor(out))

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
            self.sites.local.setdefault(spec.path, Stream()).add(first_tensor(y), first_tensor(out))

        return hook

    def _compare_outputs(self, ref: Any, new: Any, samples: int) -> None:
        self.outputs.add(ref, new, samples)

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
    """Relative difference of train-mode and eval-mode outputs (0 for norms without running stats;
    dropout and stochastic depth stay in eval mode);
    :func:`measure_train_eval_gap` also says how it was measured. Runs on a copy so running statistics
    are not touched."""
    return measure_train_eval_gap(model, inputs)[0]


def measure_train_eval_gap(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 0
) -> tuple[float | None, str | None]:
    """(gap, note): the relative L2 of train-mode against eval-mode outputs over the output leaves
    whose name and shape agree in both modes. Dropout and stochastic depth stay in eval mode: the gap
    is what the norm layers' mode changes, not random noise. Where the structures differ (a detection head that
    returns raw maps in train mode and decoded boxes in eval mode) the gap covers the agreeing leaves
    and the note names the others; with none agreeing the gap is None. Modules whose train-mode
    forward raises stay in eval mode (:func:`normswap.checks.train_mode_forward`), as the note says."""
    probe = clone_model(model)
    with torch.no_grad(), seeded(seed, inputs[0].device) as reseed:
        try:
            train = train_mode_forward(probe, inputs, reseed, random_in_eval=True)
        except NotMeasurable as exc:  # BatchNorm cannot train on one value per channel, say
            return None, f"not measurable: {exc}"
        reseed()
        evaluated = call_model(probe.eval(), inputs)
    pairs, differ = agreeing_leaves(train.output, evaluated)
    notes = [train.note] if train.note else []
    if differ:
        shown = "; ".join(differ[:3]) + (f"; … {len(differ) - 3} more" if len(differ) > 3 else "")
        covered = f"the gap covers the {len(pairs)} leaves that agree" if pairs else "no leaf agrees: no gap"
        notes.append(f"train-mode and eval-mode outputs differ in structure ({shown}); {covered}")
    if not pairs:
        return None, "; ".join(notes)
    diff = sum(float((t.double() - e.double()).pow(2).sum()) for t, e in pairs)
    ref = sum(float(e.double().pow(2).sum()) for _, e in pairs)
    return diff**0.5 / max(ref**0.5, 1e-12), "; ".join(notes) or None


def _model_stats(model: nn.Module, inputs: tuple[torch.Tensor, ...], measure: bool, repeats: int) -> ModelStats:
    params, buffers = count_parameters(model)
    dependence = BatchDependence(None)
    if inputs[0].shape[0] >= 2 and len(inputs) == 1:
        try:
            dependence = measure_batch_dependence(model, inputs[0])
        except Exception as exc:  # a figure this report cannot give must not cost the conversion
            dependence = BatchDependence(None, f"not measurable: {type(exc).__name__}: {_first_line(exc)}")
    with model_state_guard(model):
        latency = measure_latency(model, inputs, repeats) if measure else None
        peak = peak_forward_memory(model, inputs) if measure else None
    return ModelStats(params, buffers, latency, peak, dependence.value, dependence.note)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _failures(outputs: Sequence[OutputDrift], findings: Sequence[OutputFinding], max_drift: float | None,
              min_top1: float | None) -> list[str]:
    failures = []
    if max_drift is not None:
        # A leaf that could not be compared cannot be shown to stay under the threshold.
        failures += [f"{f.name}: {f.message} (max drift {max_drift:g} cannot be checked)"
                     for f in findings if f.kind != "empty"]
    for o in outputs:
        if max_drift is not None and (o.relative_l2 is None or o.relative_l2 > max_drift):
            shown = "undefined (original output is zero)" if o.relative_l2 is None else f"{o.relative_l2:.4g}"
            failures.append(f"{o.name}: relative L2 {shown} > max drift {max_drift:g}")
        if min_top1 is not None and o.top1_agreement is not None and o.top1_agreement < min_top1:
            failures.append(f"{o.name}: top-1 agreement {o.top1_agreement:.4g} < {min_top1:g}")
    if min_top1 is not None and not any(o.top1_agreement is not None for o in outputs):
        failures.append("min top-1 agreement was asked for, but no output leaf holds class scores (N×K, see "
                        "docs/validation.md)")
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
    outputs, findings = run.outputs.outputs(), run.outputs.findings()
    first = batches[0]
    gap, gap_note = measure_train_eval_gap(converted, first) if first[0].shape[0] >= 2 else (None, None)
    report = DriftReport(
        input_source=data.source,
        input_description=data.description,
        num_samples=sum(int(b[0].shape[0]) for b in batches),
        outputs=outputs,
        sites=run.site_results(),
        original=_model_stats(original, first, measure, repeats),
        converted=_model_stats(converted, first, measure, repeats),
        train_eval_gap=gap,
        thresholds={
            k: v for k, v in (("max_drift", max_drift), ("min_top1_agreement", min_top1_agreement)) if v is not None
        },
        failures=tuple(_failures(outputs, findings, max_drift, min_top1_agreement)),
        warnings=data.warnings,
        findings=findings,
        detections=run.outputs.detection_results(),
        train_eval_note=gap_note,
    )
    if strict and report.failures:
        raise ValidationFailed(report)
    return report


def _check_batch(batch: tuple[torch.Tensor, ...]) -> None:
    if not batch or batch[0].shape[0] == 0:
        raise DataError("an empty batch reached validation.")

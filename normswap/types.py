"""The data that crosses module boundaries: sites, facts, plan entries, plans, reports.

All of it is frozen and JSON-serialisable, so a plan can be printed, saved, diffed and replayed onto a
fresh instance of the same architecture.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import NormswapError, PlanError, UnknownNameError, unknown_name

PLAN_SCHEMA_VERSION = 1

Layout = Literal["features", "sequence", "image", "volume", "unknown"]
LAYOUTS: tuple[str, ...] = ("features", "sequence", "image", "volume", "unknown")
LAYOUT_BY_NDIM = {2: "features", 3: "sequence", 4: "image", 5: "volume"}
# The layouts a BatchNorm1d accepts: (N, C) and (N, C, L).
BATCHNORM1D_LAYOUTS = ("features", "sequence")

PURPOSES = ("train", "finetune", "inference")
TASKS = ("classification", "detection", "segmentation", "style-transfer", "gan", "video", "other")


@dataclass(frozen=True)
class Facts:
    """What the user tells about how the model will be used; recipes match on these."""

    batch_size: int | None = None
    sequence: bool | None = None
    purpose: str | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise PlanError(f"fact batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.sequence is not None and not isinstance(self.sequence, bool):
            raise PlanError(f"fact sequence must be true or false, got {self.sequence!r}.")
        if self.purpose is not None and self.purpose not in PURPOSES:
            raise unknown_name("purpose", str(self.purpose), PURPOSES, "facts")
        if self.task is not None and self.task not in TASKS:
            raise unknown_name("task", str(self.task), TASKS, "facts")

    @classmethod
    def from_kwargs(cls, facts: Mapping[str, Any]) -> Facts:
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in facts:
            if key not in valid:
                raise unknown_name("fact", key, valid, "keyword arguments")
        return cls(**{k: v for k, v in facts.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Site:
    """One normalization site and the context it runs in.

    ``path`` is the qualified module path (shared by the fx graph, ``named_modules()`` and the
    state_dict). For a functional ``batch_norm`` call it is ``<owner module path>.<fx node name>``.
    """

    path: str
    kind: Literal["module", "functional"]
    cls: str
    num_features: int
    affine: bool
    track_running_stats: bool
    has_running_stats: bool
    eps: float
    momentum: float | None
    has_act: bool
    input_shape: tuple[int, ...] | None
    layout: str
    layout_inferred: bool
    memory_format: str | None
    dtype: str
    producer: str | None
    producer_cls: str | None
    producer_exclusive: bool
    producer_foldable: bool
    consumers: tuple[str, ...]
    call_count: int
    # fx: a node of the whole model's trace; fx:<path>: a node of the trace of the submodule at <path>,
    # traced on its own because the whole model did not trace (tracing.trace_parts); eager: seen called
    # by a forward hook only (inside a leaf module, or outside every traced part); class: inside a leaf
    # module, its class fixing the layout, so no forward pass ran to see it called; none: never seen.
    learned_by: str
    node: str | None = None
    aliases: tuple[str, ...] = ()
    mro: tuple[str, ...] = ()
    # A frozen BatchNorm layer (tracing.is_frozen_batchnorm): fixed statistics in buffers, nothing trained.
    frozen: bool = False

    @property
    def traced(self) -> bool:
        """Whether the site's producer and consumers come from a graph (the whole model's or a part's)."""
        return self.learned_by == "fx" or self.learned_by.startswith("fx:")

    @property
    def short_cls(self) -> str:
        return self.cls.rsplit(".", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Site:
        values = dict(data)
        values["input_shape"] = tuple(values["input_shape"]) if values.get("input_shape") is not None else None
        values["consumers"] = tuple(values.get("consumers", ()))
        values["aliases"] = tuple(values.get("aliases", ()))
        values["mro"] = tuple(values.get("mro", ()))
        return cls(**values)


@dataclass(frozen=True)
class OtherNorm:
    """A normalization layer that is not a BatchNorm: listed so a plan shows the whole picture."""

    path: str
    cls: str


@dataclass(frozen=True)
class PlanEntry:
    """What happens to one site: the rule that matched, the action, and fully resolved options."""

    site: Site
    rule: str | None
    action: Literal["convert", "keep"]
    target: str | None
    options: Mapping[str, Any]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site.to_dict(),
            "rule": self.rule,
            "action": self.action,
            "target": self.target,
            "options": dict(self.options),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanEntry:
        return cls(
            site=Site.from_dict(data["site"]),
            rule=data.get("rule"),
            action=data["action"],
            target=data.get("target"),
            options=dict(data.get("options", {})),
            reason=data.get("reason", ""),
        )


@dataclass(frozen=True)
class RecoveryDefaults:
    """What a recipe's ``[recovery]`` table says distillation should use where the caller does not say:
    a conversion that starts close to the original is damaged by a learning rate that suits one that
    starts far from it, and the recipe is what knows which it made."""

    lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr}


@dataclass(frozen=True)
class Plan:
    """One entry per site, plus what a reader needs to trust it: how context was learned, which
    rules matched nothing, and the other norm layers present."""

    model_cls: str
    recipe: str
    facts: Facts
    entries: tuple[PlanEntry, ...]
    other_norms: tuple[OtherNorm, ...] = ()
    unmatched_rules: tuple[str, ...] = ()
    ensure: tuple[str, ...] = ()
    trace: str = "fx"
    trace_error: str | None = None
    example_input_shapes: tuple[tuple[int, ...], ...] = ()
    recovery: RecoveryDefaults = RecoveryDefaults()
    schema_version: int = PLAN_SCHEMA_VERSION

    @property
    def conversions(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.action == "convert")

    def entry(self, path: str) -> PlanEntry:
        for e in self.entries:
            if e.site.path == path:
                return e
        raise unknown_name("site", path, [e.site.path for e in self.entries], "plan")

    def needs_graph(self) -> bool:
        return any(e.site.kind == "functional" for e in self.conversions)

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            key = e.target if e.action == "convert" and e.target else "keep"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model_cls": self.model_cls,
            "recipe": self.recipe,
            "facts": self.facts.to_dict(),
            "trace": self.trace,
            "trace_error": self.trace_error,
            "example_input_shapes": [list(s) for s in self.example_input_shapes],
            "recovery": self.recovery.to_dict(),
            "ensure": list(self.ensure),
            "unmatched_rules": list(self.unmatched_rules),
            "other_norms": [dataclasses.asdict(o) for o in self.other_norms],
            "entries": [e.to_dict() for e in self.entries],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        version = data.get("schema_version")
        if version != PLAN_SCHEMA_VERSION:
            raise PlanError(
                f"plan schema version {version!r} is not supported (this normswap reads "
                f"version {PLAN_SCHEMA_VERSION}); re-create the plan with this version."
            )
        try:
            return cls(
                model_cls=data["model_cls"],
                recipe=data["recipe"],
                facts=Facts(**data.get("facts", {})),
                entries=tuple(PlanEntry.from_dict(e) for e in data["entries"]),
                other_norms=tuple(OtherNorm(**o) for o in data.get("other_norms", [])),
                unmatched_rules=tuple(data.get("unmatched_rules", [])),
                ensure=tuple(data.get("ensure", [])),
                trace=data.get("trace", "fx"),
                trace_error=data.get("trace_error"),
                example_input_shapes=tuple(tuple(s) for s in data.get("example_input_shapes", [])),
                # Plans written before recipes had a [recovery] table have none: the defaults apply.
                recovery=RecoveryDefaults(**data.get("recovery", {})),
            )
        except (KeyError, TypeError) as exc:
            if isinstance(exc, UnknownNameError):
                raise
            raise PlanError(
                f"plan data is malformed ({type(exc).__name__}: {exc}); was it written by "
                f"normswap.save or Plan.to_json?"
            ) from exc

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def __str__(self) -> str:
        from .render import plan_text

        return plan_text(self)


@dataclass(frozen=True)
class SwapRecord:
    """What was done at one site when the plan was applied."""

    path: str
    old_cls: str
    new_cls: str
    target: str
    transfer: str
    replaced: tuple[str, ...]


REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class OutputDrift:
    """Original vs converted at one output leaf (``output``, ``output[0]``, ``output['boxes']`` …).

    Compared only where the leaf's shape agrees (:class:`OutputFinding` records where it does not).
    ``top5_agreement`` is the share of samples whose original top-1 class is among the converted
    model's top 5; ``kl_divergence`` is KL(original softmax ‖ converted softmax), mean per sample, never
    negative. All three only for class-score leaves (:func:`normswap.outputs.is_class_scores`)."""

    name: str
    shape: tuple[int, ...]
    relative_l2: float | None
    cosine: float | None
    max_abs: float
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    kl_divergence: float | None = None


@dataclass(frozen=True)
class OutputFinding:
    """An output leaf that could not be compared element by element, and why. ``kind``: ``count``
    (the leading dimension changed: how many boxes, say), ``shape`` (another dimension changed),
    ``missing`` (only the original has it), ``added`` (only the converted model has it), ``empty``
    (no elements on either side). ``batches``: in how many validation batches it happened."""

    name: str
    kind: str
    original_shape: tuple[int, ...] | None
    converted_shape: tuple[int, ...] | None
    batches: int
    message: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputFinding:
        values = dict(data)
        for key in ("original_shape", "converted_shape"):
            values[key] = tuple(values[key]) if values.get(key) is not None else None
        return cls(**values)


@dataclass(frozen=True)
class DetectionDrift:
    """Detection records (dicts with K×4 ``boxes`` and K ``scores``, optional ``labels``) at one place of
    the output, all images together (``name`` with list indices as ``[*]``). Per image the original's
    detections, in falling score order, are greedily matched to the converted model's of the same
    label at IoU ≥ ``iou_threshold``. ``matched_share``: matched / original detections;
    ``mean_iou`` and ``mean_score_abs_diff`` over the matched pairs; ``images_compared``: images
    where both sides have detections."""

    name: str
    images: int
    images_compared: int
    original_detections: int
    converted_detections: int
    matched: int
    matched_share: float | None
    mean_iou: float | None
    mean_score_abs_diff: float | None
    iou_threshold: float


@dataclass(frozen=True)
class SiteDrift:
    """Drift at one converted site, in execution order.

    ``local_relative_l2`` is the site's own error: the converted layer against the original layer on
    the same (converted-model) input, so it shows where drift enters. ``relative_l2``/``cosine``
    compare the activation after the site with the original model's at the same path, so they show how
    drift accumulates with depth."""

    path: str
    target: str
    order: int
    calls: int
    local_relative_l2: float | None
    relative_l2: float | None
    cosine: float | None


@dataclass(frozen=True)
class ModelStats:
    """Cost and behaviour of one model on the validation inputs."""

    parameters: int
    buffers: int
    latency_s: float | None
    peak_memory_bytes: int | None
    batch_dependence: float | None
    # How batch_dependence was measured where it is not plain train mode, or why it is missing.
    batch_dependence_note: str | None = None


@dataclass(frozen=True)
class DriftReport:
    """What :func:`normswap.validate` measured, and whether the thresholds held."""

    input_source: str
    input_description: str
    num_samples: int
    outputs: tuple[OutputDrift, ...]
    sites: tuple[SiteDrift, ...]
    original: ModelStats
    converted: ModelStats
    train_eval_gap: float | None
    thresholds: Mapping[str, float]
    failures: tuple[str, ...]
    warnings: tuple[str, ...]
    findings: tuple[OutputFinding, ...] = ()
    detections: tuple[DetectionDrift, ...] = ()
    # How train_eval_gap was measured where not on every leaf in plain train mode, or why it is missing.
    train_eval_note: str | None = None

    @property
    def verdict(self) -> str:
        if self.failures:
            return "fail"
        return "pass" if self.thresholds else "measured"

    @property
    def headline(self) -> OutputDrift:
        """The first compared output leaf."""
        if not self.outputs:
            raise NormswapError("no output leaf could be compared (see findings): " +
                                "; ".join(f"{f.name}: {f.message}" for f in self.findings[:3]))
        return self.outputs[0]

    @property
    def worst_relative_l2(self) -> float | None:
        values = [o.relative_l2 for o in self.outputs]
        return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]

    def worst_sites(self, n: int = 5) -> list[SiteDrift]:
        scored = [s for s in self.sites if s.local_relative_l2 is not None]
        return sorted(scored, key=lambda s: -(s.local_relative_l2 or 0.0))[:n]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReport:
        values = {k: v for k, v in data.items() if k != "verdict"}
        values["outputs"] = tuple(OutputDrift(**(o | {"shape": tuple(o["shape"])})) for o in data["outputs"])
        values["sites"] = tuple(SiteDrift(**s) for s in data["sites"])
        values["original"] = ModelStats(**data["original"])
        values["converted"] = ModelStats(**data["converted"])
        values["failures"] = tuple(data["failures"])
        values["warnings"] = tuple(data["warnings"])
        values["findings"] = tuple(OutputFinding.from_dict(f) for f in data.get("findings", ()))
        values["detections"] = tuple(DetectionDrift(**d) for d in data.get("detections", ()))
        return cls(**values)


@dataclass(frozen=True)
class Report:
    """What a conversion did and how it changed the model; rendered by ``normswap.render``."""

    model_cls: str
    recipe: str
    facts: Facts
    plan_summary: Mapping[str, int]
    swaps: tuple[SwapRecord, ...]
    warnings: tuple[str, ...]
    timings: Mapping[str, float]
    params_before: int
    params_after: int
    buffers_before: int
    buffers_after: int
    batchnorm_left: tuple[str, ...]
    drift: DriftReport | None = None
    calibration: Mapping[str, Any] | None = None
    schema_version: int = REPORT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["facts"] = self.facts.to_dict()
        data["drift"] = self.drift.to_dict() if self.drift is not None else None
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        version = data.get("schema_version")
        if version != REPORT_SCHEMA_VERSION:
            raise PlanError(
                f"report schema version {version!r} is not supported (this normswap reads {REPORT_SCHEMA_VERSION})."
            )
        values = dict(data)
        values["facts"] = Facts(**data.get("facts", {}))
        values["swaps"] = tuple(SwapRecord(**(s | {"replaced": tuple(s["replaced"])})) for s in data["swaps"])
        values["warnings"] = tuple(data["warnings"])
        values["batchnorm_left"] = tuple(data["batchnorm_left"])
        values["drift"] = DriftReport.from_dict(data["drift"]) if data.get("drift") else None
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Conversion:
    """The result of :func:`normswap.convert`."""

    model: Any
    plan: Plan
    report: Report

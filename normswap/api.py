"""The programmatic API: plan, convert, apply_plan (validate lives in ``normswap.drift``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import apply_plan as _apply
from .calibrate import Calibration
from .checks import count_parameters
from .cloning import clone_model
from .data import load_inputs
from .drift import ValidationFailed
from .drift import validate as validate_drift
from .planner import build_plan, layout_matters
from .recipes import Recipe, load_recipe
from .tracing import as_input_tuple, default_example_inputs, discover, qualname
from .types import Conversion, Facts, Plan, Report

RecipeSpec = str | Path | Recipe | Mapping[str, Any]
CONVERT_VALIDATION_SAMPLES = 4


@contextmanager
def collection_paused() -> Iterator[None]:
    """Tracing and copying allocate many small objects, and with torch and timm loaded a full garbage
    collection in the middle costs up to 0.2 s, more than the conversion itself. Whatever cycles
    the conversion leaves are collected as usual once it returns."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def plan(
    model: nn.Module, recipe: RecipeSpec = "auto", example_inputs: Any = None, shapes: str = "auto", **facts: Any
) -> Plan:
    """What ``convert`` would do to each normalization site, with the reason; nothing is changed.

    ``facts`` are what the rules match on: ``batch_size`` (per device), ``sequence``, ``purpose``
    (train / finetune / inference) and ``task``. ``shapes="always"`` runs the example through the model
    to record every site's input shape even where the graph alone decides the plan (the default,
    ``"auto"``, runs it only where a layout depends on it: see :func:`normswap.tracing.discover`).
    """
    chosen = load_recipe(recipe)
    fact_values = Facts.from_kwargs(facts)
    discovery = discover(model, example_inputs, shapes)
    the_plan = build_plan(qualname(model), discovery, chosen, fact_values)
    if shapes == "auto" and layout_matters(the_plan, chosen, fact_values):
        seen = discover(model, example_inputs, "always", traced=discovery)
        the_plan = build_plan(qualname(model), seen, chosen, fact_values)
    return the_plan


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False) -> nn.Module:
    """Apply a plan (from :func:`plan`, or ``Plan.from_json``) to a model of the same architecture."""
    return _apply(model, plan, inplace=inplace).model


def convert(
    model: nn.Module,
    recipe: RecipeSpec = "auto",
    example_inputs: Any = None,
    inplace: bool = False,
    validate: bool = True,
    data: Any = None,
    max_drift: float | None = None,
    min_top1_agreement: float | None = None,
    strict: bool = False,
    calibration: Any = None,
    shapes: str = "auto",
    progress: bool = False,
    **facts: Any,
) -> Conversion:
    """Plan and apply in one step. The input model is untouched unless ``inplace=True``.

    ``calibration`` refits the new norm layers against the original (:func:`normswap.calibrate`):
    give data (anything :func:`normswap.load_inputs` takes: docs/data-inputs.md) or ``"data-free"`` to synthesise
    inputs from the BatchNorm running statistics first, or a :class:`~normswap.Calibration` for the
    fit, group search (the returned plan records the chosen counts), steps and hold-out. With
    ``validate`` (default) the report holds a :class:`~normswap.types.DriftReport` comparing the
    original and the converted model on ``data``, or on a few synthetic samples shaped like
    ``example_inputs``. ``strict`` raises
    :class:`~normswap.drift.ValidationFailed` when ``max_drift`` or ``min_top1_agreement`` fails.
    ``progress`` shows progress bars for the long steps (synthesis, calibration, validation).
    """
    clock = [time.perf_counter()]
    inputs = as_input_tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    before = count_parameters(model)
    with collection_paused():
        the_plan = plan(model, recipe, inputs, shapes, **facts)
        clock.append(time.perf_counter())
        original = clone_model(model) if inplace and (validate or calibration is not None) else model
        applied = _apply(model, the_plan, inplace=inplace)
    clock.append(time.perf_counter())
    calibrated = None
    if calibration is not None:
        size = tuple(inputs[0].shape[1:]) if isinstance(inputs[0], torch.Tensor) else None
        calibrated = Calibration.of(calibration).run(original, applied.model, the_plan, size, progress)
        the_plan = calibrated.updated_plan(the_plan)
    clock.append(time.perf_counter())
    drift = None
    notes = list(applied.warnings)
    if validate and data is None and not isinstance(inputs[0], torch.Tensor):
        validate = False  # no batch to draw validation samples like: said, not raised, so nothing is lost
        notes.append(f"not validated: the example input is a {type(inputs[0]).__name__}, and validation draws "
                     f"its samples as batched tensors; pass data= (batches the model takes) or a batch tensor "
                     f"as the example (torchvision detectors take N×3×H×W too).")
    if validate:
        samples = None if data is not None else CONVERT_VALIDATION_SAMPLES
        checked = load_inputs(original, data, limit=samples, example_shape=tuple(inputs[0].shape))
        drift = validate_drift(original, applied.model, checked, plan=the_plan, repeats=3, max_drift=max_drift,
                               min_top1_agreement=min_top1_agreement, progress=progress)
    clock.append(time.perf_counter())
    after = count_parameters(applied.model)
    steps = ("plan_s", "apply_s", "calibrate_s", "validate_s")
    report = Report(
        model_cls=the_plan.model_cls, recipe=the_plan.recipe, facts=the_plan.facts,
        plan_summary=the_plan.summary(), swaps=tuple(applied.swaps), warnings=tuple(notes),
        timings={name: b - a for name, a, b in zip(steps, clock[:-1], clock[1:], strict=True)},
        params_before=before[0], params_after=after[0], buffers_before=before[1], buffers_after=after[1],
        batchnorm_left=tuple(applied.batchnorm_left), drift=drift,
        calibration=calibrated.to_dict() if calibrated is not None else None,
    )
    conversion = Conversion(model=applied.model, plan=the_plan, report=report)
    if strict and drift is not None and drift.failures:
        raise ValidationFailed(drift)
    return conversion


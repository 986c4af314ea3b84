"""Property-based: random networks through every shipped recipe.

Each conversion either succeeds with every invariant holding (nothing left that the recipe removes,
shapes, batch independence, exact folding/freezing, plan round-trip, input untouched) or raises a
NormswapError with a message. Never another exception, never a silently wrong model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import normswap
from normswap.apply import batchnorm_left
from normswap.recipes import builtin_recipes, load_recipe

from .conftest import model_fingerprint, relative_error
from .random_nets import build, example_input, net_specs

RECIPES = builtin_recipes()
REMOVES_ALL = {
    "small-batch", "layernorm", "layernorm-chw", "rmsnorm-chw", "style-transfer", "detection", "dp", "freeze", "fold",
    "pretrained-finetune",
}
EXACT = {"fold", "freeze"}
STATS = {"cases": 0, "converted": 0, "refused": 0}


def check_conversion(spec, recipe: str) -> None:
    model = build(spec)
    x = example_input(spec)
    before = model_fingerprint(model)
    try:
        conversion = normswap.convert(model, recipe, x[:1], validate=False)
    except normswap.NormswapError as exc:
        assert len(str(exc)) > 20, "a NormswapError must say what went wrong"
        assert model_fingerprint(model) == before
        STATS["refused"] += 1
        return
    STATS["converted"] += 1
    converted = conversion.model
    assert model_fingerprint(model) == before, "the input model must be untouched"
    kept = [e.site for e in conversion.plan.entries if e.action == "keep"]
    if "no-batchnorm" in load_recipe(recipe).ensure:
        assert not kept
    # Exactly the sites the plan keeps are still BatchNorm; everything else was replaced.
    kept_modules = {p for s in kept if s.kind == "module" for p in (s.path, *s.aliases)}
    kept_modules |= {s.node for s in kept if s.kind == "functional"}  # a kept call stays a graph node
    left = set(batchnorm_left(converted))
    assert left <= kept_modules and {s.path for s in kept if s.kind == "module"} <= left
    with torch.no_grad():
        expected, got = model(x), converted.eval()(x)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    exact = {e.target for e in conversion.plan.conversions} <= {"fold", "frozen"}
    if recipe in EXACT and exact and not [e for e in conversion.plan.entries if e.action == "keep"]:
        assert relative_error(expected, got) < 1e-4, f"{recipe} must reproduce the eval-mode model"
    if recipe in REMOVES_ALL and not kept:
        assert normswap.batch_dependence(converted, x) < 1e-4, f"{recipe}: samples must be independent"
    plan = conversion.plan
    assert normswap.Plan.from_json(plan.to_json()) == plan
    replayed = normswap.apply_plan(copy.deepcopy(model), plan)
    replayed.load_state_dict(converted.state_dict())
    with torch.no_grad():
        assert torch.equal(replayed.eval()(x), got)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs())
def test_random_networks_convert_or_fail_cleanly(spec):
    for recipe in RECIPES:
        STATS["cases"] += 1
        check_conversion(spec, recipe)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs())
def test_random_networks_sweep(spec):
    for recipe in RECIPES:
        STATS["cases"] += 1
        check_conversion(spec, recipe)


def test_zz_report_generated_cases(capsys):
    """Prints the count of generated cases (``pytest -s``) for the record."""
    with capsys.disabled():
        print(f"\nproperty cases: {STATS}")

"""The timm zoo's structural cases, small and fast; ``benchmarks/zoo.py`` runs the whole zoo.

One smallest model per case: plain BatchNorm2d, timm BatchNormAct2d, BatchNorm1d over tokens at a fixed
resolution, models that plain torch.fx cannot trace, BatchNorm hidden inside timm's no-trace leaf
modules, and SyncBatchNorm. The measurements are the zoo's own functions, so the test and the
benchmark cannot drift apart.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import normswap
from normswap.apply import batchnorm_left

ZOO_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo.py"


def _load_zoo() -> ModuleType:
    # benchmarks/ is not a package; load the script as a module (registered, so its dataclasses work).
    spec = importlib.util.spec_from_file_location("normswap_benchmarks_zoo", ZOO_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()

# model -> input side. Where the reason is structural the comment names it.
CASES = {
    "test_resnet": 64,  # plain BatchNorm2d
    "test_efficientnet": 64,  # timm BatchNormAct2d (activation kept)
    "levit_128s": 224,  # BatchNorm1d over flattened tokens; resolution fixed by attention biases
    "mobilevit_xxs": 64,  # plain fx fails (control flow); BatchNorm inside timm leaf modules
    "tiny_vit_5m_224": 64,  # plain fx fails; BatchNorm inside leaf modules
    "efficientvit_m0": 64,  # efficientvit_msra: plain fx fails; BatchNorm1d and 2d inside leaves
    "cpubone_nano": 64,  # plain fx fails on padding control flow; BatchNorm inside leaves
    "efficientvit_b0": 64,  # efficientvit_mit: BatchNorm inside leaves
    "lowformer_b0": 64,  # BatchNorm inside leaves
    "sync:test_resnet": 64,  # SyncBatchNorm (another _BatchNorm subclass), no process group
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: with two OpenMP threads on a loaded two-core machine a forward pass is up to 100x
    # slower than with one. Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def build(case: str) -> tuple[nn.Module, torch.Tensor]:
    """Built once per session: conversion leaves its input model untouched."""
    name = case.removeprefix("sync:")
    model = zoo.build_model(name)
    if case.startswith("sync:"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    channels = model.pretrained_cfg["input_size"][0]
    side = CASES[case]
    return model, zoo.example((channels, side, side), zoo.BATCH)


@pytest.mark.parametrize("case", list(CASES))
def test_small_batch_converts_every_batchnorm(case):
    model, x = build(case)
    present = sum(zoo.count_batchnorm(model).values())
    assert present > 0
    reference = zoo.eval_output(model, x)

    conversion = normswap.convert(model, "small-batch", example_inputs=x[:1], validate=False, batch_size=2)
    converted = conversion.model

    assert batchnorm_left(converted) == []
    stats = zoo.plan_stats(conversion.plan, present)
    assert stats["module_sites"] == present, "every BatchNorm module is a site, also inside leaf modules"
    assert stats["learned_by"]["none"] == 0, "every site was seen by the graph or by hooks, or fixed by its class"
    assert zoo.eval_output(converted, x).shape == reference.shape
    assert zoo.batch_dependence(converted, x)["batch_dependence"] < zoo.INDEPENDENT


@pytest.mark.parametrize("case", list(CASES))
def test_fold_is_exact_where_it_folds(case):
    model, x = build(case)
    conversion = normswap.convert(model, "fold", example_inputs=x[:1], validate=False)
    folded = [e for e in conversion.plan.conversions if e.target == "fold"]
    if not folded:
        pytest.skip("nothing in this model can take a folded BatchNorm")
    error = zoo.relative_l2(zoo.eval_output(model, x), zoo.eval_output(conversion.model, x))
    assert error <= zoo.FOLD_EXACT


@pytest.mark.parametrize("case", ["test_efficientnet", "mobilevit_xxs", "levit_128s"])
def test_plan_round_trips_onto_a_fresh_model(case):
    model, x = build(case)
    conversion = normswap.convert(model, "small-batch", example_inputs=x[:1], validate=False, batch_size=2)
    result = zoo.round_trip(conversion.plan, conversion.model, lambda: zoo.build_model(case, seed=1), x)
    assert result == {"roundtrip_json": True, "roundtrip_exact": True}


# --- the benchmark's own machinery, on synthetic data ---------------------------------------------


def test_representative_is_the_smallest_batchnorm_model_of_each_module():
    models = [
        zoo.ZooModel("big", "a", 10, 3, {"BatchNorm2d": 3}),
        zoo.ZooModel("small", "a", 5, 1, {"BatchNorm2d": 1}),
        zoo.ZooModel("only", "b", 7, 2, {"BatchNorm1d": 2}),
    ]
    assert [m.name for m in zoo.representatives(models)] == ["small", "only"]


def test_least_squares_recovers_a_line():
    fit = zoo.least_squares([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert fit["slope"] == pytest.approx(2.0)
    assert fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0)


def _record(name: str, family: str, bn_left: int = 0, dependence: float = 0.0) -> dict:
    recipe = {
        "ok": True,
        "errors": {},
        "bn_left": bn_left,
        "sites_match_bn": True,
        "shape_equal": True,
        "batch_dependence": dependence,
        "rel_l2": 1e-7,
        "folded_sites": 3,
        "roundtrip_json": True,
        "roundtrip_exact": True,
        "trace": "fx",
        "learned_by": {"fx": 3, "eager": 0, "class": 0, "none": 0},
        "convert_s": 0.2,
        "plan_s": 0.15,
        "forward_s": 0.1,
        "ratio": 2.0,
    }
    return {
        "name": name,
        "family": family,
        "status": "ok",
        "errors": {},
        "fx_nodes": 100 if name == "m1" else 200,
        "check_input": [3, 64, 64],
        "params": 1_000_000,
        "bn_modules": 3,
        "bn_classes": {"BatchNorm2d": 3},
        "wall_s": 1.0,
        "recipes": {r: dict(recipe) for r in zoo.RECIPES},
        "opacus": {"errors": {}, "fix_s": 0.1, "bn_left": 0, "runs": True},
    }


def test_render_counts_failures_and_the_section_is_replaced_in_place(tmp_path):
    records = [_record("m1", "fam1"), _record("m2", "fam2", bn_left=2, dependence=0.5), _record("m3", "fam3")]
    records[2]["fx_nodes"] = 300
    records[2]["recipes"]["dp"] = {"ok": False, "errors": {"convert": {"error": "PlanError: boom"}}}
    text = zoo.render(records, "fast", "python benchmarks/zoo.py --fast --write", {"rounds": 3})
    assert "no BatchNorm left 2/3" in text  # small-batch: m2 left BatchNorm
    assert "batch-independent (< 0.0001) 2/3" in text
    assert "PlanError: boom" in text and "small-batch/bn-left" in text
    assert "| fam2 | m2 |" in text

    common = sys.modules["_common"]  # the benchmarks' shared harness, which zoo.py imports
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- begin other -->\nkeep me\n<!-- end other -->\n")
    common.write_section("zoo", "first", path=path)
    common.write_section("zoo", "second", path=path)
    content = path.read_text()
    assert "keep me" in content and "second" in content and "first" not in content
    assert content.count("<!-- begin zoo -->") == 1
    summary = common.condensed(text, keep=("Totals",))
    assert "### Totals" in summary and "### Per family" not in summary and "| fam2 | m2 |" not in summary


def test_a_summary_leaves_descriptive_columns_and_details_to_the_full_tables():
    common = sys.modules["_common"]
    text = "\n".join([
        "## Section", "", "| method | how | score | wall s |", "|---|---|---|---|", "| a | long words | 1.0 | 3 |", "",
        "Details:", "", "- one", "- two", "", "A closing line " + "word " * 200,
    ])
    summary = common.condensed(text)
    assert "| method | score |" in summary and "| a | 1.0 |" in summary and "long words" not in summary
    assert "- one" not in summary and "Details" not in summary
    assert summary.splitlines()[-1].endswith("… (full tables)") and len(summary.splitlines()[-1]) < 650


@pytest.mark.slow
@pytest.mark.parametrize("case", ["test_resnet", "mobilevit_xxs"])
def test_whole_zoo_measurement_of_one_model(case):
    rec = zoo.run_model(case, "?", zoo.Options(max_size=64, rounds=1))
    assert rec["status"] == "ok", rec["errors"]
    assert not zoo.failure_keys(rec), rec

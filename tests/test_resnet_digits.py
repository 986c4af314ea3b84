"""``benchmarks/resnet_digits.py``: its two digit tasks and the size of its BENCHMARKS.md summary (the run
itself takes most of an hour; these check what it is built on, in seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    # benchmarks/ is not a package; load the script as a module (it puts benchmarks/ on sys.path itself).
    spec = importlib.util.spec_from_file_location("normswap_benchmarks_resnet_digits", BENCHMARKS / "resnet_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_task_is_its_own_classes_renumbered_and_split_stratified(bench):
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    for classes, seed in ((bench.ORIGINAL_CLASSES, 0), (bench.NEW_CLASSES, 3)):
        data = bench.load_classes(classes, seed, 400)
        total = int(counts[list(classes)].sum())
        assert data["x_test"].shape == (400, 3, 64, 64) and len(data["x_train"]) == total - 400
        assert data["x_train"].min() >= -1 and data["x_train"].max() <= 1
        assert set(data["y_train"].tolist()) == set(range(len(classes)))
        held = np.bincount(data["y_test"].numpy(), minlength=len(classes))
        expected = 400 * counts[list(classes)] / total
        assert np.all(np.abs(held - expected) <= 1), (classes, held, expected)
    # another seed, another split of the new task; the original's split is the same for the same seed
    assert not bench.load_classes(bench.NEW_CLASSES, 1, 400)["x_test"].equal(
        bench.load_classes(bench.NEW_CLASSES, 3, 400)["x_test"])
    assert bench.load_classes(bench.ORIGINAL_CLASSES, 0, 400)["x_test"].equal(
        bench.load_classes(bench.ORIGINAL_CLASSES, 0, 400)["x_test"])


def test_the_benchmarks_md_summary_of_a_full_run_stays_near_2000_characters(bench):
    """BENCHMARKS.md is near its size cap: the summary keeps the two task tables (every variant and lr) and
    leaves the no-data detail and the agreement after fine-tuning to the full tables."""
    common = sys.modules["_common"]
    lrs = ["3e-05", "0.0001", "0.0003"]
    names = list(bench.VARIANTS)
    row = {"new": dict.fromkeys(lrs, 0.9), "original": dict.fromkeys(lrs, 0.99),
           "original_agreement": dict.fromkeys(lrs, 0.98), "steps": {"new": 248, "original": 250},
           "wall_s": {lr: {"new": 14.0, "original": 14.0} for lr in lrs}}
    result = {
        "command": "python benchmarks/resnet_digits.py --write",
        "versions": common.versions(), "machine": common.machine(),
        "settings": {"held_out": 400, "json": "resnet_digits.json"},
        "original": {"model": bench.MODEL, "accuracy": 1.0, "held_out": 400, "train_wall_s": 60.0, "steps": 240},
        "no_data": {name: {"agreement": 0.988, "accuracy": 0.988} for name in names},
        "runs": [{"seed": seed, "variants": {name: row for name in names}} for seed in range(5)],
        "run_wall_s": 2400.0,
    }
    summary = common.condensed(bench.render(result), keep=bench.SUMMARY)
    footer = ("\n\nFull tables: `benchmarks/results/batch2-resnet.md`; "
              "raw numbers: `benchmarks/results/resnet_digits.json`.")
    assert len(summary + footer) <= 2000
    assert "### New task" in summary and "### Original task" in summary
    assert "No data, in full" not in summary and "Agreement with the original" not in summary
    for name in names:
        assert summary.count(f"| {name} | 98.8 | " + " | ".join(["90.0 (≥ 90.0)"] * 3) + " |") == 1

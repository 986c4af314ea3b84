"""Every script in examples/ runs, at a tiny size; each is skipped where its optional package is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str, *requires: str) -> ModuleType:
    for module in requires:
        pytest.importorskip(module)
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_progressive_example():
    transition = example("lightning_progressive", "lightning").main(samples=8, size=32, batch_size=2, accumulate=2,
                                                                    epochs=1, steps=2)
    assert transition.finalized and transition.taken == 2


def test_huggingface_trainer_example():
    transition = example("huggingface_trainer", "transformers", "accelerate").main(samples=8, size=16, max_steps=2,
                                                                                   transition_steps=2)
    assert transition.finalized


def test_opacus_example():
    assert example("opacus_dp", "opacus").main(samples=8, size=32, steps=1) > 0


def test_torchrun_recovery_example_on_two_processes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "torchrun_recover.py"), str(tmp_path / "checkpoints"), "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 processes, steps 0→2 (loss" in result.stdout and "same weights on every rank: True" in result.stdout
    assert (tmp_path / "checkpoints" / "recover-checkpoint.pt").is_file()

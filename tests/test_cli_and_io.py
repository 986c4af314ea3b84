"""The command line and the file formats: exit codes, written outputs, safe checkpoint loading."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import normswap
from normswap.cli import main
from normswap.io import load_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> int:
    return main(list(args))


def test_the_readme_demo_runs_end_to_end(tmp_path, capsys):
    assert run_cli("demo", "--output", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "weights bit-identical = True" in out
    saved = next(tmp_path.iterdir())
    assert {"plan.json", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    plan = json.loads((saved / "plan.json").read_text())
    assert all(e["site"]["input_shape"] for e in plan["entries"]), "the demo's plan records every shape"


def test_recipes_and_targets_list(capsys):
    assert run_cli("recipes") == 0
    out = capsys.readouterr().out
    assert "small-batch" in out and "style-transfer" in out
    assert run_cli("targets") == 0
    assert "layernorm-chw" in capsys.readouterr().out


def test_inspect_changes_nothing_and_prints_json(capsys):
    assert run_cli("inspect", "resnet18", "--recipe", "small-batch", "--input-size", "3,32,32", "--json") == 0
    plan = normswap.Plan.from_json(capsys.readouterr().out)
    assert plan.summary() == {"groupnorm": 20}


def test_convert_writes_weights_plan_and_report_and_reloads(tmp_path, capsys):
    out = tmp_path / "conv"
    assert (
        run_cli(
            "convert", "resnet18", "-r", "small-batch", "--batch-size", "2", "--input-size", "3,32,32", "-o", str(out)
        )
        == 0
    )
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "plan.json",
        "report.json",
        "report.md",
        "report.html",
        "normswap.json",
    }
    report = json.loads((out / "report.json").read_text())
    assert report["batchnorm_left"] == [] and len(report["swaps"]) == 20
    reloaded = normswap.load(out)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reloaded.modules())
    # A saved directory is itself a MODEL for inspect.
    assert run_cli("inspect", str(out), "-r", "small-batch", "--input-size", "3,32,32") == 0


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "conv"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    args = ["convert", "resnet18", "-r", "fold", "--input-size", "3,32,32", "-o", str(out)]
    assert run_cli(*args) == normswap.OutputExistsError.exit_code
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run_cli(*args, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "plan.json").exists()


def test_unknown_model_suggests_close_timm_names(capsys):
    assert run_cli("inspect", "resnet51") == normswap.UnknownNameError.exit_code
    err = capsys.readouterr().err
    assert "unknown timm model 'resnet51'" in err and "resnet50" in err and "Traceback" not in err


def test_unknown_recipe_exit_code(capsys):
    assert run_cli("inspect", "resnet18", "-r", "nope") == normswap.UnknownNameError.exit_code
    assert "small-batch" in capsys.readouterr().err


def test_pretrained_offline_is_a_clear_error(capsys, monkeypatch):
    import huggingface_hub.constants

    # Offline mode fails at once instead of waiting on connection retries; the error path is the same.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert run_cli("inspect", "resnet18", "--pretrained") == normswap.ModelLoadError.exit_code
    assert "--checkpoint" in capsys.readouterr().err


def test_checkpoint_by_name_with_prefix_and_by_order(tmp_path):
    source = timm.create_model("resnet18")
    sd = source.state_dict()
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, prefixed)
    model = load_checkpoint(timm.create_model("resnet18"), prefixed)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # Another code base's names, same tensors in the same order (safetensors files do not keep order).
    renamed = tmp_path / "renamed.pth"
    torch.save({f"layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(sd.items())}, renamed)
    model = load_checkpoint(timm.create_model("resnet18"), renamed)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_checkpoint_mismatch_names_keys_and_shapes(tmp_path):
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(1, 1, 1, 1), "extra": torch.zeros(1)}, str(bad))
    with pytest.raises(normswap.ModelLoadError, match=r"missing.*unexpected \(extra\).*conv1.weight \(1, 1, 1, 1\)"):
        load_checkpoint(timm.create_model("resnet18"), bad)


class _Exploit:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"conv1.weight": _Exploit(str(marker))}, fh)
    with pytest.raises(normswap.UnsafeCheckpointError, match=r"evil.pth.*weights_only=True"):
        read_checkpoint(evil)
    assert run_cli("inspect", "resnet18", "--checkpoint", str(evil)) == normswap.UnsafeCheckpointError.exit_code
    assert not marker.exists(), "the pickle's payload must never run"


def test_debug_shows_the_traceback():
    with pytest.raises(normswap.UnknownNameError):
        run_cli("--debug", "inspect", "resnet51")


def test_installed_launcher_runs_from_a_checkout():
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "recipes"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0 and "dp" in result.stdout


def test_module_factory_spec_and_input_size(tmp_path, capsys):
    assert run_cli("inspect", "tests.models:SequenceBN", "--input-size", "4,16", "-r", "sequence") == 0
    assert "layernorm" in capsys.readouterr().out


def test_saved_files_get_ordinary_permissions(tmp_path):
    import stat

    from normswap.io import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        normswap.save(normswap.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "small-batch",
                                       torch.randn(1, 3, 8, 8), validate=False), tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "report.json").stat().st_mode) == 0o644

"""The command line with models from the user's own package: imported from the current folder, saved
conversions inspected, validated and re-rendered without timm's input config, and every failure one
readable line with a non-zero exit code (a traceback only with --debug)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from normswap.cli import main

PACKAGE = "nsw_user_models"

MODELS = '''
import torch
from torch import nn


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same weights every time the factory is called
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


class FailsWhenConverted(ConvBN):
    def forward(self, x):
        if not isinstance(self.bn, nn.BatchNorm2d):
            raise ValueError("this model only runs with its BatchNorm")
        return super().forward(x)


class Interrupts(ConvBN):
    def forward(self, x):
        raise KeyboardInterrupt


class EmptyBoxes(ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return {"scores": y.mean((1, 2, 3)), "boxes": y.new_zeros(0, 4)}


class TrainEvalStructure(ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if self.training else y.flatten(2)


class Thresholded(ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y[y > 0.5]


def convbn():
    return ConvBN()


def empty_boxes():
    return EmptyBoxes()


def train_eval_structure():
    return TrainEvalStructure()


def thresholded():
    return Thresholded()


def fails_when_converted():
    return FailsWhenConverted()


def broken():
    raise RuntimeError("no weights here")


def interrupts():
    return Interrupts()


def not_a_model():
    return 3


def detector():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20)
'''


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the user's package, made the current folder (and not on sys.path)."""
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(MODELS))
    (tmp_path / "broken_at_import.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.chdir(tmp_path)  # sys.path is left as it is: the CLI must find the package itself
    for name in [m for m in sys.modules if m.startswith((PACKAGE, "broken_at_import"))]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_a_factory_imports_from_the_current_folder_and_saved_conversions_need_no_timm_config(workdir, capsys):
    spec = f"{PACKAGE}.models:convbn"
    assert str(workdir) not in sys.path
    assert main(["convert", spec, "--input-size", "3,16,16", "-r", "small-batch", "-o", "out/gn"]) == 0
    capsys.readouterr()
    assert main(["inspect", "out/gn", "--json"]) == 0, "the example shapes come from out/gn/plan.json"
    assert json.loads(capsys.readouterr().out)["example_input_shapes"] == [[1, 3, 16, 16]]
    assert main(["validate", spec, "out/gn", "-o", "out/v"]) == 0
    assert json.loads((workdir / "out" / "v" / "report.json").read_text())["drift"]["num_samples"] == 8
    assert main(["report", "out/gn"]) == 0
    assert str(workdir) not in sys.path, "sys.path is restored"


def test_a_detector_from_a_package_converts_validates_and_reports(workdir, capsys):
    pytest.importorskip("torchvision")
    spec = f"{PACKAGE}.models:detector"
    assert main(["convert", spec, "--input-size", "3,64,64", "-r", "small-batch", "-o", "out/det",
                 "--validation-batch-size", "2", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "detections output[*]" in out and "targets should not be none" in out
    drift = json.loads((workdir / "out" / "det" / "report.json").read_text())["drift"]
    assert drift["detections"][0]["images"] == 2 and drift["converted"]["batch_dependence"] == 0.0
    assert main(["inspect", "out/det"]) == 0
    assert main(["report", "out/det"]) == 0
    assert "detections output[*]" in (workdir / "out" / "det" / "report.md").read_text()


@pytest.mark.parametrize(("factory", "shown"), [
    ("empty_boxes", "output['boxes']: empty on both sides"),
    ("train_eval_structure", "train-mode and eval-mode outputs differ in structure"),
    ("thresholded", "output: count changed from"),
])
def test_outputs_that_change_shape_are_reported_not_raised(workdir, capsys, factory, shown):
    assert main(["convert", f"{PACKAGE}.models:{factory}", "--input-size", "3,16,16", "-r", "small-batch",
                 "-o", "out"]) == 0
    captured = capsys.readouterr()
    assert shown in " ".join(captured.out.split()) and "Traceback" not in captured.err


SPEC = f"{PACKAGE}.models"
FAILURES = {
    "factory raises": (["inspect", f"{SPEC}:broken"], 7, "raised RuntimeError: no weights here"),
    "module raises at import": (["inspect", "broken_at_import:model"], 7, "raised RuntimeError: half-written"),
    "no such module": (["inspect", "nsw_no_such_package:model"], 7, "No module named 'nsw_no_such_package'"),
    "no such factory": (["inspect", f"{SPEC}:nope"], 7, "has no attribute 'nope'"),
    "not a model": (["inspect", f"{SPEC}:not_a_model"], 7, "returned int, not a torch.nn.Module"),
    "no input size": (["inspect", f"{SPEC}:convbn"], 6, "--input-size C,H,W"),
    "bad input size": (["inspect", f"{SPEC}:convbn", "--input-size", "3x16"], 1, "--input-size must be integers"),
    "unknown recipe": (["inspect", f"{SPEC}:convbn", "--input-size", "3,16,16", "-r", "nope"], 4, "nope"),
    "missing data": (["convert", f"{SPEC}:convbn", "--input-size", "3,16,16", "-o", "o", "--data", "nope.npy"], 10,
                     "does not exist"),
    "original fails on validation inputs": (["convert", f"{SPEC}:convbn", "--input-size", "3,16,16", "-o", "o",
                                             "--data", "wrong.npy"], 10,
                                            "failed on validation inputs of shape (2, 5, 16, 16)"),
    "converted model raises": (["convert", f"{SPEC}:fails_when_converted", "--input-size", "3,16,16", "-o", "o",
                                "-r", "small-batch"], 1,
                               "convert failed with ValueError: this model only runs with its BatchNorm"),
    "not a saved conversion": (["report", "nowhere"], 7, "holds no report.json"),
    "corrupt report": (["report", "corrupt"], 7, "is not a normswap report"),
    "validate without a saved conversion": (["validate", f"{SPEC}:convbn", "corrupt"], 7, "plan.json is missing"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_every_failure_is_one_line_and_a_nonzero_exit(workdir, capsys, case):
    import numpy as np

    np.save(workdir / "wrong.npy", np.zeros((2, 5, 16, 16), dtype=np.float32))
    (workdir / "corrupt").mkdir()
    (workdir / "corrupt" / "report.json").write_text("{not json")
    argv, code, message = FAILURES[case]
    assert main(argv) == code
    line = one_error_line(capsys)
    assert line.startswith("normswap: error: ") and message in line, line


def test_an_interrupt_is_one_line(workdir, capsys):
    assert main(["inspect", f"{SPEC}:interrupts", "--input-size", "3,16,16"]) == 130
    assert "interrupted" in one_error_line(capsys)


def test_debug_shows_the_traceback_of_an_unexpected_exception(workdir):
    with pytest.raises(ValueError, match="only runs with its BatchNorm"):
        main(["--debug", "convert", f"{SPEC}:fails_when_converted", "--input-size", "3,16,16", "-o", "o",
              "-r", "small-batch"])


def test_a_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert"])
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err

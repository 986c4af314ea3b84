"""Drift validation and reports: figures agree with direct computation, catch broken sites, gate."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import timm
import torch
from torch import nn

import normswap
from normswap.cli import main
from normswap.data import load_inputs
from normswap.types import Report

from .conftest import randomize_batchnorm


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("resnet18", num_classes=10)).eval()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return model, x


def test_output_metrics_agree_with_a_direct_computation(resnet):
    model, x = resnet
    converted = normswap.convert(model, "small-batch", x[:1], validate=False).model
    drift = normswap.validate(model, converted, x, batch_size=5, measure=False)  # 3 uneven batches
    with torch.no_grad():
        a, b = model(x).double(), converted.eval()(x).double()
    out = drift.headline
    assert out.relative_l2 == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-9)
    assert out.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b).mean()), rel=1e-9)
    assert out.max_abs == pytest.approx(float((a - b).abs().max()), rel=1e-9)
    assert out.top1_agreement == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()))
    top5 = (b.topk(5, 1).indices == a.argmax(1, keepdim=True)).any(1).double().mean()
    assert out.top5_agreement == pytest.approx(float(top5))
    kl = torch.nn.functional.kl_div(b.log_softmax(1), a.log_softmax(1), log_target=True, reduction="batchmean")
    assert out.kl_divergence == pytest.approx(float(kl), rel=1e-9)
    assert drift.num_samples == 12 and drift.input_source == "given"


def test_identity_conversion_reports_no_drift(resnet):
    model, x = resnet
    conversion = normswap.convert(model, "fold", x[:1], data=x)
    drift = conversion.report.drift
    assert drift.headline.relative_l2 < 1e-5 and drift.headline.top1_agreement == 1.0
    assert drift.headline.kl_divergence < 1e-9
    assert all(s.local_relative_l2 < 1e-5 and s.relative_l2 < 1e-5 for s in drift.sites)
    assert len(drift.sites) == 20 and [s.order for s in drift.sites] == list(range(20))


def test_a_broken_site_is_ranked_first(resnet):
    model, x = resnet
    conversion = normswap.convert(model, "fold", x[:1], validate=False)
    broken = conversion.model
    with torch.no_grad():
        broken.layer2[0].conv1.weight.mul_(1.5)  # the conv that layer2.0.bn1 was folded into
    drift = normswap.validate(model, broken, x, plan=conversion.plan, measure=False)
    assert drift.worst_sites(1)[0].path == "layer2.0.bn1"
    by_path = {s.path: s for s in drift.sites}
    assert by_path["layer2.0.bn1"].local_relative_l2 > 0.1
    assert by_path["layer1.1.bn2"].relative_l2 < 1e-5, "upstream of the break nothing changes"
    assert by_path["layer4.1.bn2"].relative_l2 > 1e-3, "downstream the drift propagates"


def test_bounded_activation_memory_gives_the_same_figures(resnet):
    model, x = resnet
    conversion = normswap.convert(model, "small-batch", x[:1], validate=False)
    whole = normswap.validate(model, conversion.model, x, plan=conversion.plan, measure=False)
    chunked = normswap.validate(model, conversion.model, x, plan=conversion.plan, measure=False,
                                activation_budget=1)  # one site per group
    assert [s.relative_l2 for s in whole.sites] == pytest.approx([s.relative_l2 for s in chunked.sites])
    assert whole.outputs == chunked.outputs


def test_feature_lists_are_compared_leaf_by_leaf():
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))).eval()
    x = torch.randn(4, 3, 32, 32)
    conversion = normswap.convert(model, "small-batch", x[:1], data=x)
    names = [o.name for o in conversion.report.drift.outputs]
    assert names == ["output[0]", "output[1]", "output[2]"]
    assert all(o.top1_agreement is None for o in conversion.report.drift.outputs)


def test_batch_dependence_train_eval_gap_and_costs_are_measured(resnet):
    model, x = resnet
    drift = normswap.convert(model, "small-batch", x[:1], data=x[:4]).report.drift
    assert drift.original.batch_dependence > 1e-3 and drift.converted.batch_dependence < 1e-6
    assert drift.train_eval_gap == pytest.approx(0.0, abs=1e-6)
    assert drift.original.latency_s > 0 and drift.converted.peak_memory_bytes > 0
    assert drift.original.buffers > 0 and drift.converted.buffers == 0


def test_thresholds_fail_only_when_asked_and_strict_raises(resnet):
    model, x = resnet
    converted = normswap.convert(model, "small-batch", x[:1], validate=False).model
    relaxed = normswap.validate(model, converted, x, measure=False)
    assert relaxed.verdict == "measured" and not relaxed.failures
    gated = normswap.validate(model, converted, x, measure=False, max_drift=1e-6, min_top1_agreement=1.0)
    assert gated.verdict == "fail" and len(gated.failures) >= 1
    with pytest.raises(normswap.ValidationFailed, match="relative L2"):
        normswap.validate(model, converted, x, measure=False, max_drift=1e-6, strict=True)


def test_report_json_round_trips(resnet):
    model, x = resnet
    report = normswap.convert(model, "small-batch", x[:1], data=x[:4]).report
    text = report.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert Report.from_json(text) == report


def test_synthetic_inputs_come_with_a_warning(resnet):
    model, _ = resnet
    data = load_inputs(model, None, example_shape=(1, 3, 32, 32))
    assert data.source == "synthetic" and "say little" in data.warnings[0]


def test_inputs_from_an_image_folder_and_tensor_files(tmp_path, resnet):
    from PIL import Image

    model, _ = resnet
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / f"{i}.png")
    data = load_inputs(model, images, batch_size=2)
    assert data.source == "images" and data.num_samples == 3
    assert data.first[0].shape[1:] == (3, 224, 224)  # the model's own timm preprocessing

    tensor = torch.randn(5, 3, 32, 32)
    np.save(tmp_path / "x.npy", tensor.numpy())
    torch.save(tensor, tmp_path / "x.pt")
    from safetensors.torch import save_file

    save_file({"inputs": tensor}, str(tmp_path / "x.safetensors"))
    for name in ("x.npy", "x.pt", "x.safetensors"):
        loaded = load_inputs(model, tmp_path / name, batch_size=4)
        assert loaded.num_samples == 5 and torch.equal(torch.cat([b[0] for b in loaded.batches]), tensor)


def _folder_with(folder, name, content):
    folder.mkdir()
    (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "empty", "holds no images"),
        (lambda d: _folder_with(d / "bad", "x.png", b"not a png"), "could not be read"),
        (lambda d: torch.save(torch.randn(2, 1, 32, 32), d / "c.pt") or d / "c.pt", "does not fit"),
        (lambda d: torch.save(torch.full((2, 3, 8, 8), float("nan")), d / "n.pt") or d / "n.pt", "NaN/Inf"),
        (lambda d: torch.save(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), d / "i.pt") or d / "i.pt",
         "not floating point"),
        (lambda d: d / "missing.npy", "does not exist"),
    ],
)
def test_bad_data_gets_a_clear_error(tmp_path, resnet, make, message):
    model, _ = resnet
    (tmp_path / "empty").mkdir()
    with pytest.raises(normswap.DataError, match=message):
        load_inputs(model, make(tmp_path))


def test_cli_exit_code_follows_thresholds_and_report_rerenders(tmp_path, capsys):
    # Random timm weights differ per build: the original's weights travel as a checkpoint.
    weights = tmp_path / "resnet18.safetensors"
    from safetensors.torch import save_model

    save_model(timm.create_model("resnet18"), str(weights))
    base = ["convert", "resnet18", "--checkpoint", str(weights), "--input-size", "3,32,32",
            "--validation-batch-size", "4"]
    assert main([*base, "-r", "fold", "-o", str(tmp_path / "fold"), "--max-drift", "1e-4",
                 "--min-top1-agreement", "1.0"]) == 0
    code = main([*base, "-r", "small-batch", "-o", str(tmp_path / "gn"), "--max-drift", "1e-6"])
    assert code == normswap.ValidationFailed.exit_code == 11
    assert "validation failed" in capsys.readouterr().err
    assert (tmp_path / "gn" / "report.html").exists(), "outputs are written even when the gate fails"
    (tmp_path / "gn" / "report.html").unlink()
    assert main(["report", str(tmp_path / "gn")]) == 11
    assert (tmp_path / "gn" / "report.html").exists()
    assert main(["validate", "resnet18", str(tmp_path / "fold"), "--checkpoint", str(weights),
                 "--input-size", "3,32,32", "--max-drift", "1e-4", "-o", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "report.json").read_text())["drift"]["verdict"] == "pass"


def test_terminal_summary_fits_80_columns(resnet):
    from rich.console import Console

    from normswap.render import print_report

    model, x = resnet
    report = normswap.convert(model, "small-batch", x[:1], data=x[:4]).report
    console = Console(width=80, record=True, color_system=None)
    print_report(report, console)
    text = console.export_text()
    assert "verdict" in text and "where drift enters" in text
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no headless Chromium")
def test_html_report_renders_in_headless_chromium(tmp_path, resnet):
    from normswap.io import write_reports

    model, x = resnet
    conversion = normswap.convert(model, "small-batch", x[:1], data=x[:4])
    write_reports(conversion.report, conversion.plan, tmp_path)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "Per-site drift along depth" in dom and "<svg" in dom and "<polyline" in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", (tmp_path / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_validation_leaves_both_models_as_they_were(resnet):
    from .conftest import model_fingerprint

    model, x = resnet
    converted = normswap.convert(model, "small-batch", x[:1], validate=False).model.train()
    before = (model_fingerprint(model), model_fingerprint(converted))
    normswap.validate(model, converted, x)
    assert (model_fingerprint(model), model_fingerprint(converted)) == before
    assert converted.training and all(isinstance(m, nn.Module) for m in converted.modules())


@pytest.mark.parametrize("transfer", ["standardize", "statistics"])
def test_local_drift_includes_a_rewritten_producer(transfer):
    """standardize (like fold and reconstruct) rewrites the conv feeding the site; the site's own error is
    then that conv and the site together, which in a one-site model is the output error itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-2, 2)
        model[1].running_var.uniform_(0.5, 4)
    x = torch.randn(6, 3, 10, 10)
    recipe = {"rules": [{"name": "ln", "target": "layernorm-chw", "options": {"transfer": transfer}}]}
    drift = normswap.convert(model, recipe, x[:1], data=x).report.drift
    (site,) = drift.sites
    assert site.local_relative_l2 == pytest.approx(drift.headline.relative_l2, rel=1e-5)
    assert site.relative_l2 == pytest.approx(drift.headline.relative_l2, rel=1e-5)

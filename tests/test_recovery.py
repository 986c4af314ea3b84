"""Closing the drift: calibration (with and without data), progressive transition, distillation."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normswap

from .conftest import relative_error
from .models import trained_stats


def _trained_on_shifted_data(model: nn.Module, samples: int) -> tuple[nn.Module, torch.Tensor]:
    """Spread the BatchNorm affines and learn running statistics of shifted, channel-scaled data."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    data = torch.randn(samples, 3, 8, 8) * torch.linspace(0.5, 2, 3).view(1, 3, 1, 1) + 0.3
    return trained_stats(model, data, steps=20), data


def small_cnn(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A BatchNorm CNN whose running statistics describe its data (as after training)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10), nn.BatchNorm1d(10),
    )
    return _trained_on_shifted_data(model, 96)


def drift_of(original, conversion_model, held):
    return normswap.validate(original, conversion_model, held, measure=False).headline.relative_l2


def test_calibration_reduces_drift_on_held_out_data():
    model, data = small_cnn()
    calibration, held = data[:64], data[64:]
    plain = normswap.convert(model, "small-batch", data[:1], validate=False)
    before = drift_of(model, plain.model, held)
    for fit in ("least-squares", "moments", "blend"):
        calibrated = normswap.convert(model, "small-batch", data[:1], validate=False,
                                      calibration=normswap.Calibration(calibration, fit=fit))
        after = drift_of(model, calibrated.model, held)
        assert after < 0.6 * before, f"{fit}: {after} vs {before}"
        info = calibrated.report.calibration
        assert info["fit"] == fit and info["samples"] == 64 and len(info["calibrated"]) == 3


def test_calibration_keeps_the_sweeps_that_served_the_outputs_and_undoes_a_harmful_one(monkeypatch):
    calibration_module = importlib.import_module("normswap.calibrate")  # the function shadows the module

    model, data = small_cnn()
    good = normswap.convert(model, "small-batch", data[:1], validate=False).model
    result = normswap.calibrate(model, good, data[:64])
    errors = result.output_error
    assert len(errors) >= 2 and errors[result.kept_sweeps] == min(errors) and result.kept_sweeps >= 1
    # A fit that wrecks every layer: the guard must hand back the model exactly as it came.
    harmful = normswap.convert(model, "small-batch", data[:1], validate=False).model
    before = {k: v.clone() for k, v in harmful.state_dict().items()}
    real_fit = calibration_module._Moments.fit
    monkeypatch.setattr(calibration_module._Moments, "fit",
                        lambda self, fit, weight: tuple(-5 * t for t in real_fit(self, fit, weight)))
    wrecked = normswap.calibrate(model, harmful, data[:64])
    assert wrecked.kept_sweeps == 0 and wrecked.output_error[1] > wrecked.output_error[0]
    assert all(torch.equal(before[k], v) for k, v in harmful.state_dict().items())


@pytest.mark.parametrize("fit", ["least-squares", "reconstruct"])
def test_holdout_judges_calibration_on_data_the_fit_did_not_see(fit):
    model, data = small_cnn()
    # Calibration samples from another domain than the network's: a fit to them serves them and
    # wrecks the data the running statistics describe. Judged on its own samples it looks good.
    skewed, held = data[:32] * 3 + 2, data[64:]
    recipe = standardized("rmsnorm-chw") if fit == "reconstruct" else "small-batch"

    def calibrated(**holdout):
        conversion = normswap.convert(model, recipe, data[:1], validate=False)
        before = {k: v.clone() for k, v in conversion.model.state_dict().items()}
        result = normswap.calibrate(model, conversion.model, skewed, plan=conversion.plan, fit=fit, steps=20,
                                    **holdout)
        return conversion.model, before, result

    fooled, uncalibrated, result = calibrated()
    assert result.kept_sweeps >= 1 and result.judged_on == "calibration data" and result.held_back == 0
    plain = normswap.convert(model, recipe, data[:1], validate=False).model
    assert drift_of(model, fooled, held) > 1.1 * drift_of(model, plain, held)
    guarded, uncalibrated, result = calibrated(holdout=held)
    assert result.kept_sweeps == 0 and result.output_error[-1] > result.output_error[0]
    assert result.held_back == 32 and result.samples == 32 and result.judged_on.startswith("held back")
    assert all(torch.equal(uncalibrated[k], v) for k, v in guarded.state_dict().items())


def test_a_dataloader_of_the_users_batches_serves_calibration_recovery_and_validation():
    from torch.utils.data import DataLoader, TensorDataset

    from normswap.data import load_inputs

    model, data = small_cnn()
    loader = DataLoader(TensorDataset(data[:64], torch.arange(64)), batch_size=7)  # (input, target) batches
    inputs = load_inputs(model, loader, batch_size=16)
    assert inputs.num_samples == 64 and torch.equal(torch.cat([b[0] for b in inputs.batches]), data[:64])
    assert load_inputs(model, loader, limit=10).num_samples == 10
    assert load_inputs(model, (x for x, _ in loader), limit=10).num_samples == 10  # any iterable of tensors

    def calibrated(calibration):
        converted = normswap.convert(model, "small-batch", data[:1], validate=False).model
        return normswap.calibrate(model, converted, calibration), converted

    (from_loader, a), (from_tensor, b) = calibrated(loader), calibrated(data[:64])
    assert from_loader.output_error == from_tensor.output_error and from_loader.source == "batches"
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    result = normswap.recover(model, a, loader, steps=2, batch_size=16, progress=False)
    assert result.steps == 2
    assert normswap.validate(model, a, loader, measure=False).num_samples == 64
    for bad, message in ((DataLoader(TensorDataset(data[:0]), batch_size=4), "empty"),
                         ([{"image": data[:4]}].__iter__(), "takes no 'image'"),
                         (iter([object()]), "input tensor first"),
                         (iter([data[:4], data[:4, :, :4]]), "different shapes")):
        with pytest.raises(normswap.NormswapError, match=message):
            load_inputs(model, bad)


def test_holdout_fraction_holds_back_disjoint_samples_in_order():
    from normswap.data import InputSet

    model, data = small_cnn()
    labels = torch.arange(10)
    # labels ride along as a second input (load_inputs would leave them out as targets)
    inputs = InputSet(tuple((data[:10][i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)), "given", "labelled")
    kept, held = inputs.split_off(0.3)
    kept_labels, held_labels = (torch.cat([b[1] for b in part.batches]) for part in (kept, held))
    assert len(held_labels) == 3 and len(kept_labels) == 7
    assert sorted(torch.cat([kept_labels, held_labels]).tolist()) == list(range(10))
    assert torch.equal(kept_labels, kept_labels.sort().values) and max(len(b[0]) for b in kept.batches) == 4
    for k, x in zip(kept_labels.tolist(), torch.cat([b[0] for b in kept.batches]), strict=True):
        assert torch.equal(x, data[k])  # inputs stay with their labels
    again = inputs.split_off(0.3)[1]
    assert torch.equal(torch.cat([b[1] for b in again.batches]), held_labels)
    result = normswap.calibrate(model, normswap.convert(model, "small-batch", data[:1], validate=False).model,
                                data[:64], holdout=0.25)
    assert (result.samples, result.held_back) == (48, 16) and "16 of 64 samples" in result.judged_on
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(normswap.NormswapError, match="fraction"):
            normswap.calibrate(model, model, data[:8], holdout=bad)


def test_calibration_leaves_the_original_untouched_and_is_deterministic():
    from .conftest import model_fingerprint

    model, data = small_cnn()
    before = model_fingerprint(model)
    a = normswap.convert(model, "small-batch", data[:1], validate=False, calibration=data[:32]).model
    b = normswap.convert(model, "small-batch", data[:1], validate=False, calibration=data[:32]).model
    assert model_fingerprint(model) == before
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_data_free_calibration_uses_the_running_statistics():
    model, data = small_cnn()
    synthetic = normswap.synthesize_inputs(model, num_samples=32, steps=60, input_size=(3, 8, 8))
    # The synthesised inputs reproduce the first BatchNorm's statistics far better than noise does.
    first_bn = model[1]

    def gap(x):
        with torch.no_grad():
            h = model[0](x)
        return float(((h.mean((0, 2, 3)) - first_bn.running_mean) ** 2).mean())

    assert gap(synthetic) < 0.2 * gap(torch.randn(32, 3, 8, 8))
    plain = normswap.convert(model, "small-batch", data[:1], validate=False)
    free = normswap.convert(model, "small-batch", data[:1], validate=False,
                            calibration=normswap.Calibration("data-free", synthesis_steps=60))
    info = free.report.calibration
    assert info["source"].startswith("data-free") and info["judged_on"] == "the synthesised inputs"
    assert info["synthesis"]["samples"] == info["samples"] == 32 and info["synthesis"]["steps"] == 60
    # The synthesis time is the synthesis alone, not the calibration after it.
    assert 0 < info["synthesis"]["seconds"] < free.report.timings["calibrate_s"]
    assert drift_of(model, free.model, data) < drift_of(model, plain.model, data)


def test_calibrating_a_conversion_that_converts_nothing_runs_nothing(monkeypatch):
    from normswap.render import report_lines

    model, data = small_cnn()

    def no_synthesis(*_args, **_kwargs):
        raise AssertionError("inputs were synthesised for a model with nothing to calibrate")

    monkeypatch.setattr(importlib.import_module("normswap.calibrate"), "synthesize_inputs", no_synthesis)
    for calibration in ("data-free", data[:16]):
        kept = normswap.convert(model, "freeze", data[:1], validate=False, calibration=calibration)
        info = kept.report.calibration
        assert info["calibrated"] == [] and info["output_error"] == [] and info["sweeps"] == 0
        line = next(line for line in report_lines(kept.report) if line.startswith("calibration:"))
        assert line.startswith("calibration: nothing to refit (") and "undone" not in line
    # A converted site calibration cannot refit is named with the reason.
    folded = normswap.convert(model.eval(), "fold", data[:1], validate=False, calibration=data[:16])
    line = next(line for line in report_lines(folded.report) if line.startswith("calibration:"))
    assert "nothing to refit" in line and folded.report.calibration["skipped"], line


def test_progress_bars_change_no_result():
    model, data = small_cnn()
    quiet = normswap.synthesize_inputs(model, num_samples=8, steps=5, input_size=(3, 8, 8))
    shown = normswap.synthesize_inputs(model, num_samples=8, steps=5, input_size=(3, 8, 8), progress=True)
    assert torch.equal(quiet, shown)
    results = []
    for progress in (False, True):
        converted = normswap.convert(model, "small-batch", data[:1], validate=False).model
        result = normswap.calibrate(model, converted, data[:32], fit="reconstruct", steps=3, progress=progress)
        results.append((result.output_error, [p.detach().clone() for p in converted.parameters()]))
    assert results[0][0] == results[1][0] and all(map(torch.equal, results[0][1], results[1][1]))


def test_progressive_transition_starts_exact_moves_smoothly_and_finalizes():
    model, data = small_cnn()
    transition = normswap.progressive(model, "small-batch", steps=4, example_inputs=data[:1])
    blended = transition.model.eval()
    with torch.no_grad():
        reference = model(data)
        assert torch.equal(blended(data), reference), "step 0 is the original, bit for bit"
        outputs = []
        for _ in range(4):
            transition.step()
            outputs.append(blended(data))
    assert transition.alpha == 1.0
    gaps = [float((b - a).norm() / reference.norm()) for a, b in zip([reference, *outputs], outputs, strict=False)]
    assert max(gaps) < 2.5 * min(gaps) + 1e-6, f"no cliff: the steps move the output evenly ({gaps})"
    final = transition.finalize()
    assert not any(isinstance(m, (nn.BatchNorm2d, normswap.ProgressiveNorm)) for m in final.modules())
    with torch.no_grad():
        assert torch.allclose(final.eval()(data), outputs[-1], atol=1e-6)


def test_progressive_transition_from_a_standardized_conversion_starts_at_the_original():
    """pretrained-small-batch folds BatchNorm's statistics into the conv before each site; the frozen
    start must then not apply them a second time."""
    from normswap.layers import GroupRMSNorm

    model, data = small_cnn()
    transition = normswap.progressive(model, "pretrained-small-batch", steps=2, example_inputs=data[:1])
    assert {e.options["transfer"] for e in transition.plan.conversions} == {"standardize"}
    with torch.no_grad():
        reference = model(data)
        assert relative_error(transition.model.eval()(data), reference) < 1e-5
    final = transition.finalize()
    assert sum(isinstance(m, GroupRMSNorm) for m in final.modules()) == 2
    assert not any(isinstance(m, (nn.BatchNorm2d, normswap.ProgressiveNorm)) for m in final.modules())


def test_transition_callback_drives_a_training_loop():
    model, data = small_cnn()
    transition = normswap.progressive(model, "small-batch", steps=3, example_inputs=data[:1])
    callback = normswap.TransitionCallback(transition)
    optimizer = torch.optim.SGD(transition.model.parameters(), lr=1e-3)
    transition.model.train()
    for batch in data.split(32):
        loss = transition.model(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        callback.on_train_batch_end(None, None, None, batch, 0)
    callback.on_train_end(None, None)
    assert transition.alpha == 1.0
    assert not any(isinstance(m, normswap.ProgressiveNorm) for m in transition.model.modules())


def test_recovery_by_distillation_closes_most_of_the_gap_and_resumes(tmp_path):
    model, data = small_cnn()
    converted = normswap.convert(model, "small-batch", data[:1], validate=False).model
    before = drift_of(model, converted, data[64:])
    result = normswap.recover(model, converted, data[:64], steps=60, lr=3e-3, batch_size=16, progress=False,
                              checkpoint_dir=tmp_path, checkpoint_every=20)
    assert result.final_loss < result.first_loss
    assert drift_of(model, converted, data[64:]) < 0.7 * before
    assert (tmp_path / "recover-checkpoint.pt").exists()
    again = normswap.convert(model, "small-batch", data[:1], validate=False).model
    resumed = normswap.recover(model, again, data[:64], steps=60, lr=3e-3, batch_size=16, progress=False,
                               checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 60
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_recovery_warm_up_ramps_the_first_steps_and_must_end_before_the_run():
    model, data = small_cnn()

    def biggest_moves(warmup_steps: int) -> list[float]:
        converted = normswap.convert(model, "small-batch", data[:1], validate=False).model
        before = [p.detach().clone() for p in converted.parameters()]
        moves: list[float] = []

        def measure(step: int, loss: float) -> None:
            moves.append(max(float((p.detach() - b).abs().max())
                             for p, b in zip(converted.parameters(), before, strict=True)))
            before[:] = [p.detach().clone() for p in converted.parameters()]

        normswap.recover(model, converted, data[:64], steps=20, lr=1e-3, batch_size=16, progress=False,
                         warmup_steps=warmup_steps, callback=measure)
        return moves

    plain, warmed = biggest_moves(0), biggest_moves(4)
    # Adam's first update moves every weight by about the whole learning rate, whatever its gradient.
    assert plain[0] == pytest.approx(1e-3, rel=0.05)
    assert warmed[0] == pytest.approx(1e-3 / 5, rel=0.05)
    assert warmed[0] < warmed[1] < warmed[3]
    converted = normswap.convert(model, "small-batch", data[:1], validate=False).model
    with pytest.raises(normswap.NormswapError, match="warmup_steps must be at least 0 and below steps"):
        normswap.recover(model, converted, data[:64], steps=5, warmup_steps=5, progress=False)


def test_recovery_with_feature_loss_runs():
    model, data = small_cnn()
    conversion = normswap.convert(model, "small-batch", data[:1], validate=False)
    result = normswap.recover(model, conversion.model, data, steps=5, lr=1e-3, batch_size=16, progress=False,
                              feature_weight=1.0, plan=conversion.plan)
    assert result.steps == 5 and result.final_loss == result.final_loss


def test_image_augment_gives_new_views_of_the_batch_with_its_generator():
    batch = torch.rand(6, 3, 16, 12)
    augment = normswap.ImageAugment(size=10, mix=0.5)
    first = augment(batch, torch.Generator().manual_seed(3))
    assert first.shape == (6, 3, 10, 10) and torch.equal(first, augment(batch, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, augment(batch, torch.Generator().manual_seed(4)))
    assert first.min() >= batch.min() - 1e-6 and first.max() <= batch.max() + 1e-6, "crops and convex mixes"
    same = normswap.ImageAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, mix=0.0)(
        torch.rand(2, 3, 8, 8).clone(), torch.Generator())
    assert same.shape == (2, 3, 8, 8)


def test_image_augment_contrast_scales_each_sample_about_its_own_channel_means():
    batch = torch.randn(8, 3, 12, 12) * 2 + 5
    keep = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, mix=0.0)
    views = normswap.ImageAugment(contrast=(0.25, 0.5), **keep)(batch, torch.Generator().manual_seed(0))
    mean = batch.mean(dim=(-2, -1), keepdim=True)
    assert torch.allclose(views.mean(dim=(-2, -1), keepdim=True), mean, atol=1e-4), "means kept"
    factor = ((views - mean).flatten(1).norm(dim=1) / (batch - mean).flatten(1).norm(dim=1))
    assert ((factor > 0.25 - 1e-4) & (factor < 0.5 + 1e-4)).all() and factor.std() > 0.01, "one factor per sample"
    plain = normswap.ImageAugment(**keep)(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(plain, batch, atol=1e-5), "contrast (1, 1) leaves the views alone"


@pytest.mark.parametrize("contrast", [(0.0, 1.0), (1.5, 1.0), (-1.0, 2.0)])
def test_image_augment_refuses_a_contrast_range_that_is_not_positive_and_ordered(contrast):
    with pytest.raises(normswap.NormswapError, match="contrast"):
        normswap.ImageAugment(contrast=contrast)


def test_recovery_with_augmented_views_generalises_and_resumes_identically(tmp_path):
    model, data = small_cnn()
    augment = normswap.ImageAugment(scale=(0.5, 1.0), mix=0.5)
    converted = normswap.convert(model, "small-batch", data[:1], validate=False).model
    before = drift_of(model, converted, data[64:])
    seen: list[tuple[int, float]] = []
    normswap.recover(model, converted, data[:64], steps=40, lr=3e-3, batch_size=16, progress=False,
                     augment=augment, callback=lambda step, loss: seen.append((step, loss)),
                     checkpoint_dir=tmp_path / "a", checkpoint_every=20)
    assert [step for step, _ in seen] == list(range(1, 41))
    assert drift_of(model, converted, data[64:]) < 0.9 * before, "held-out drift shrinks"
    # Stopped after 20 steps and resumed: the same augmented stream, the same weights.
    resumed = normswap.convert(model, "small-batch", data[:1], validate=False).model
    with pytest.raises(KeyboardInterrupt):
        normswap.recover(model, resumed, data[:64], steps=40, lr=3e-3, batch_size=16, progress=False,
                         augment=augment, checkpoint_dir=tmp_path / "b", checkpoint_every=20,
                         callback=lambda step, _loss: _interrupt_at(step, 20))
    normswap.recover(model, resumed, data[:64], steps=40, lr=3e-3, batch_size=16, progress=False,
                     augment=augment, checkpoint_dir=tmp_path / "b", checkpoint_every=20)
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))


def test_recovery_with_holdout_ends_in_the_best_state_it_saw_and_resumes_it(tmp_path):
    model, data = small_cnn()
    held = data[64:]

    def fresh() -> nn.Module:
        return normswap.convert(model, "small-batch", data[:1], validate=False).model

    # Distilled on another domain than the network's, it forgets the data it knew: only held-back
    # samples can tell, and the start is then the best state.
    skewed = data[:32] * 3 + 2
    fooled, guarded, plain = fresh(), fresh(), fresh()
    normswap.recover(model, fooled, skewed, steps=20, lr=3e-3, batch_size=16, progress=False)
    assert drift_of(model, fooled, held) > 1.5 * drift_of(model, plain, held)
    result = normswap.recover(model, guarded, skewed, steps=20, lr=3e-3, batch_size=16, progress=False,
                              holdout=held, eval_every=10)
    assert [step for step, _ in result.holdout_error] == [0, 10, 20] and result.kept_step == 0
    assert result.holdout_error[0][1] < min(error for _, error in result.holdout_error[1:])
    assert all(torch.equal(a, b) for a, b in zip(guarded.state_dict().values(), plain.state_dict().values(),
                                                 strict=True))
    # Where distillation helps it keeps a later state, and a run stopped and resumed keeps the same one.
    helped, resumed = fresh(), fresh()
    options = dict(steps=40, lr=3e-3, batch_size=16, progress=False, holdout=0.25, eval_every=10,
                   checkpoint_every=20)
    result = normswap.recover(model, helped, data[:64], checkpoint_dir=tmp_path / "a", **options)
    errors = dict(result.holdout_error)
    assert result.held_back == 16 and result.kept_step > 0 and errors[result.kept_step] == min(errors.values())
    assert errors[result.kept_step] < 0.8 * errors[0]
    with pytest.raises(KeyboardInterrupt):
        normswap.recover(model, resumed, data[:64], checkpoint_dir=tmp_path / "b",
                         callback=lambda step, _loss: _interrupt_at(step, 20), **options)
    again = normswap.recover(model, resumed, data[:64], checkpoint_dir=tmp_path / "b", **options)
    assert again.resumed_from == 20 and again.holdout_error == result.holdout_error
    assert all(torch.equal(a, b) for a, b in zip(helped.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))
    unjudged = {k: v for k, v in options.items() if k != "holdout"}
    with pytest.raises(KeyboardInterrupt):
        normswap.recover(model, fresh(), data[:64], checkpoint_dir=tmp_path / "c",
                         callback=lambda step, _loss: _interrupt_at(step, 20), **unjudged)
    untouched = fresh()
    with pytest.raises(normswap.NormswapError, match="without holdout"):
        normswap.recover(model, untouched, data[:64], checkpoint_dir=tmp_path / "c", **options)
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), plain.state_dict().values(),
                                                 strict=True))


def _interrupt_at(step: int, stop: int) -> None:
    if step == stop:
        raise KeyboardInterrupt


def test_recovery_and_calibration_under_torchrun_with_two_processes_on_their_own_shards(tmp_path):
    out = tmp_path / "ddp.json"
    script = Path(__file__).with_name("ddp_recover.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["world"] == 2 and summary["same_weights"] and summary["same_calibration"], summary
    assert summary["judged_steps"] == [0, 10, 20, 30] and summary["kept_step"] in summary["judged_steps"]
    assert summary["drift_after"] < summary["drift_before"]
    # Inside on_this_rank_only, rank 0 calibrated and recovered alone: its own 32 samples, no DDP, no waiting.
    assert summary["alone"] == {"samples": 32, "world": 1}
    # Two shards of 32 fit what one process fits on all 64 samples (one site: its sums are the whole story).
    from .ddp_recover import build

    model, data = build()
    alone = normswap.convert(model, "small-batch", data[:1], validate=False,
                             calibration=normswap.Calibration(data, sweeps=1))
    assert summary["calibration_samples"] == [64, 64, 64] and alone.report.calibration["samples"] == 64
    assert summary["reconstructed"] == ["1"]
    sharded = torch.load(str(out) + ".fitted.pt", weights_only=True)
    for name, value in alone.model.state_dict().items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6)


def test_cli_convert_with_calibration_and_recovery_then_recover_command(tmp_path):
    from safetensors.torch import save_model

    from normswap.cli import main

    model, data = small_cnn()
    torch.save(data, tmp_path / "data.pt")
    weights = tmp_path / "w.safetensors"
    save_model(model, str(weights))
    (tmp_path / "factory.py").write_text(
        "from tests.test_recovery import small_cnn\n\ndef build():\n    return small_cnn()[0]\n")
    import sys as _sys

    _sys.path.insert(0, str(tmp_path))
    try:
        base = ["--checkpoint", str(weights), "--input-size", "3,8,8"]
        assert main(["convert", "factory:build", *base, "-r", "small-batch", "--calibrate", str(tmp_path / "data.pt"),
                     "--holdout", "0.25", "--recover-steps", "5", "--data", str(tmp_path / "data.pt"),
                     "-o", str(tmp_path / "c")]) == 0
        report = json.loads((tmp_path / "c" / "report.json").read_text())
        assert report["calibration"]["fit"] == "least-squares" and report["calibration"]["recovery"]["steps"] == 5
        # Every step that ran has its time, validation (run after recovery) included.
        assert all(report["timings"][k] > 0 for k in ("calibrate_s", "recover_s", "validate_s")), report["timings"]
        assert report["calibration"]["held_back"] == 24 and report["calibration"]["recovery"]["held_back"] == 24
        assert "- calibration: least-squares on 72 samples" in (tmp_path / "c" / "report.md").read_text()
        markdown = (tmp_path / "c" / "report.md").read_text()
        assert "on 24 held-back samples" in markdown
        recovery = next(line for line in markdown.splitlines() if line.startswith("- recovery: "))
        kept = report["calibration"]["recovery"]["kept_step"]
        assert "5 distillation steps at lr 0.0001" in recovery and "on 24 held-back samples" in recovery
        assert recovery.endswith(f"(state after step {kept} of 5 kept)")
        # Recovery alone, on augmented views: a recovery line that names them, and no calibration line.
        assert main(["convert", "factory:build", *base, "-r", "small-batch", "--recover-steps", "2", "--data",
                     str(tmp_path / "data.pt"), "--augment", "-o", str(tmp_path / "d")]) == 0
        markdown = (tmp_path / "d" / "report.md").read_text()
        assert "- recovery: 2 distillation steps" in markdown and "calibration:" not in markdown
        assert "on views made by ImageAugment(" in markdown
        assert main(["recover", "factory:build", str(tmp_path / "c"), *base, "--data", str(tmp_path / "data.pt"),
                     "--steps", "3", "--warmup-steps", "1", "--holdout", str(tmp_path / "data.pt"), "--augment",
                     "-o", str(tmp_path / "r")]) == 0
        recovered = json.loads((tmp_path / "r" / "report.json").read_text())["calibration"]["recovery"]
        assert recovered["steps"] == 3 and recovered["held_back"] == 96 and len(recovered["holdout_error"]) == 2
        assert recovered["augment"].startswith("ImageAugment(size=None")
        assert (recovered["lr"], recovered["lr_source"], recovered["warmup_steps"]) == (1e-4, "default", 1)
        markdown = (tmp_path / "r" / "report.md").read_text()
        assert "on views made by ImageAugment(" in markdown and "(default) after 1 warm-up steps" in markdown
    finally:
        _sys.path.remove(str(tmp_path))


def test_cli_data_free_calibration_and_its_early_refusal_of_recovery(tmp_path, monkeypatch, capsys):
    from normswap import api
    from normswap.cli import main

    def no_conversion(*_args, **_kwargs):
        raise AssertionError("converted before the arguments were checked")

    monkeypatch.setattr(api, "convert", no_conversion)
    (tmp_path / "factory.py").write_text(
        "from tests.test_recovery import small_cnn\n\ndef build():\n    return small_cnn()[0]\n")
    import sys as _sys

    _sys.path.insert(0, str(tmp_path))
    try:
        code = main(["convert", "factory:build", "--input-size", "3,8,8", "-r", "small-batch", "--calibrate",
                     "data-free", "--recover-steps", "5", "-o", str(tmp_path / "c")])
        assert code != 0 and "--recover-steps needs real data" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()
        code = main(["convert", "factory:build", "--input-size", "3,8,8", "-r", "small-batch", "--augment",
                     "-o", str(tmp_path / "c")])
        assert code != 0 and "--augment makes the views --recover-steps trains on" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()
        monkeypatch.undo()
        assert main(["convert", "factory:build", "--input-size", "3,8,8", "-r", "small-batch", "--calibrate",
                     "data-free", "--synthesis-steps", "7", "--no-validate", "-o", str(tmp_path / "d")]) == 0
        calibration = json.loads((tmp_path / "d" / "report.json").read_text())["calibration"]
        assert calibration["synthesis"]["steps"] == 7 and calibration["source"].startswith("data-free")
    finally:
        _sys.path.remove(str(tmp_path))


def depthwise_cnn(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Depthwise convolutions between BatchNorms: channels with very different statistics, where
    GroupNorm(32)'s per-sample group statistics are far from the running ones."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return _trained_on_shifted_data(model, 128)


def test_calibration_can_choose_group_counts_and_the_plan_replays_them():
    model, data = depthwise_cnn()
    calibration, held = data[:96], data[96:]
    fixed = normswap.convert(model, "small-batch", data[:1], validate=False, calibration=calibration)
    searched = normswap.convert(model, "small-batch", data[:1], validate=False,
                                calibration=normswap.Calibration(calibration, groups="search"))
    chosen = searched.report.calibration["groups"]
    assert set(chosen) == {"1", "4", "7"} and all(32 % g == 0 for g in chosen.values())
    errors = searched.report.calibration["output_error"]
    assert errors[searched.report.calibration["kept_sweeps"]] <= fixed.report.calibration["output_error"][-1] + 1e-12
    assert drift_of(model, searched.model, held) <= drift_of(model, fixed.model, held) * 1.05
    for e in searched.plan.conversions:
        assert e.options["groups"] == chosen[e.site.path] == searched.model.get_submodule(e.site.path).num_groups
    # The plan (JSON) replayed onto a fresh model, then the weights: the calibrated model exactly.
    replayed = normswap.apply_plan(depthwise_cnn()[0], normswap.Plan.from_json(searched.plan.to_json()))
    replayed.load_state_dict(searched.model.state_dict())
    assert torch.equal(replayed.eval()(held), searched.model.eval()(held))
    with pytest.raises(normswap.UnknownNameError, match="search"):
        normswap.calibrate(model, fixed.model, calibration, groups="best")


def test_statistics_fit_chooses_structure_only_and_keeps_the_transfer():
    from normswap.transfer import NormState, statistics_aware_affine

    model, data = depthwise_cnn()
    calibration, held = data[:96], data[96:]
    plain = normswap.convert(model, "small-batch", data[:1], validate=False)
    searched = normswap.convert(model, "small-batch", data[:1], validate=False,
                                calibration=normswap.Calibration(calibration, groups="search", fit="statistics"))
    chosen = searched.report.calibration["groups"]
    assert set(chosen) == {"1", "4", "7"}
    for path, groups in chosen.items():
        layer = searched.model.get_submodule(path)
        gamma, beta = statistics_aware_affine(NormState.from_module(model.get_submodule(path)), groups, layer.eps)
        assert layer.num_groups == groups
        assert torch.allclose(layer.weight.float(), gamma.float()) and torch.allclose(layer.bias.float(), beta.float())
    if searched.report.calibration["kept_sweeps"]:
        assert drift_of(model, searched.model, held) < drift_of(model, plain.model, held)
    with pytest.raises(normswap.PlanError, match="groups='search'"):
        normswap.calibrate(model, plain.model, calibration, fit="statistics")


def test_statistics_fit_on_a_standardized_conversion_uses_the_statistics_the_site_sees():
    """After ``standardize`` the conv already applies BatchNorm's statistics: the statistics affine
    must be that of the standardized site, and LayerNorm sites (features) take part too."""
    from normswap.transfer import NormState, standardized_state, statistics_aware_affine

    model, data = small_cnn()
    recipe = {"rules": [
        {"name": "images", "match": {"layouts": ["image"]}, "target": "groupnorm",
         "options": {"transfer": "standardize"}},
        {"name": "features", "target": "layernorm", "options": {"transfer": "standardize"}},
    ]}
    conversion = normswap.convert(model, recipe, data[:1], validate=False)
    result = normswap.calibrate(model, conversion.model, data[:64], plan=conversion.plan, fit="statistics",
                                groups="search")
    assert result.kept_sweeps >= 1, result.output_error
    assert set(result.groups) == {"1", "4"} and len(result.calibrated) == 3
    for path, groups in result.groups.items():
        layer = conversion.model.get_submodule(path)
        state = standardized_state(NormState.from_module(model.get_submodule(path)))
        gamma, beta = statistics_aware_affine(state, groups, layer.eps)
        assert torch.allclose(layer.weight.float(), gamma.float()) and torch.allclose(layer.bias.float(), beta.float())


def standardized(image_target: str) -> dict:
    return {"rules": [
        {"name": "images", "match": {"layouts": ["image"]}, "target": image_target,
         "options": {"transfer": "standardize", "eps": 1.0}},
        {"name": "features", "target": "layernorm", "options": {"transfer": "standardize"}},
    ]}


@pytest.mark.parametrize("image_target", ["layernorm-chw", "rmsnorm-chw"])
def test_reconstruction_refits_each_site_with_its_conv_and_generalises(image_target):
    from .conftest import model_fingerprint

    model, data = small_cnn()
    calibration, held = data[:64], data[64:]
    before = model_fingerprint(model)
    recipe = standardized(image_target)
    plain = normswap.convert(model, recipe, data[:1], validate=False)
    assert [e.options["transfer"] for e in plain.plan.conversions] == ["standardize"] * 3
    assert [e.target for e in plain.plan.conversions] == [image_target, image_target, "layernorm"]
    least_squares = normswap.convert(model, recipe, data[:1], validate=False, calibration=calibration)
    rebuilt = normswap.convert(model, recipe, data[:1], validate=False,
                               calibration=normswap.Calibration(calibration, fit="reconstruct"))
    info = rebuilt.report.calibration
    assert info["fit"] == "reconstruct" and info["kept_sweeps"] == 1 and len(info["calibrated"]) == 3
    # Each site's own conv/linear is refitted with it, and every site got closer to the original's output.
    assert info["fitted"]["1"] == ["1.weight", "1.bias", "0.weight", "0.bias"]
    assert info["fitted"]["9"] == ["9.weight", "9.bias", "8.weight", "8.bias"]
    assert all(after < before for before, after in info["site_error"].values())
    assert drift_of(model, rebuilt.model, held) < 0.5 * drift_of(model, plain.model, held)
    assert drift_of(model, rebuilt.model, held) <= drift_of(model, least_squares.model, held)
    assert model_fingerprint(model) == before
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in rebuilt.model.modules())
    # Structure is the plan's: replay, then the weights, gives the calibrated model exactly.
    replayed = normswap.apply_plan(model, normswap.Plan.from_json(rebuilt.plan.to_json()))
    replayed.load_state_dict(rebuilt.model.state_dict())
    assert torch.equal(replayed.eval()(held), rebuilt.model.eval()(held))
    with pytest.raises(normswap.PlanError, match="groups='search'"):
        normswap.calibrate(model, plain.model, calibration, fit="reconstruct", groups="search")


def test_reconstruction_in_memory_bounded_passes_gives_the_same_model(monkeypatch):
    """Stored targets over the budget end a pass early and the next pass resumes: one site per pass
    must give the very model one pass gives."""
    calibration_module = importlib.import_module("normswap.calibrate")
    model, data = small_cnn()
    models, calls = [], []
    real_outputs = calibration_module._original_inputs

    def counted(*args):
        calls.append(1)
        return real_outputs(*args)

    monkeypatch.setattr(calibration_module, "_original_inputs", counted)
    for budget in (calibration_module.RECONSTRUCTION_MEMORY, 1):
        monkeypatch.setattr(calibration_module, "RECONSTRUCTION_MEMORY", budget)
        recipe = standardized("layernorm-chw")
        converted = normswap.convert(model, recipe, data[:1], validate=False).model
        normswap.calibrate(model, converted, data[:48], plan=normswap.plan(model, recipe, data[:1]),
                           fit="reconstruct", steps=10)
        models.append(converted)
    assert len(calls) == 1 + 3
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_reconstruction_that_hurts_the_outputs_is_undone(monkeypatch):
    calibration_module = importlib.import_module("normswap.calibrate")
    model, data = small_cnn()
    conversion = normswap.convert(model, standardized("layernorm-chw"), data[:1], validate=False)
    before = {k: v.clone() for k, v in conversion.model.state_dict().items()}

    def wreck(site, head, params, *args, **kwargs):
        for _, p in params:
            p.mul_(-3)
        return 1.0, 9.0

    monkeypatch.setattr(calibration_module, "_fit_site", wreck)
    result = normswap.calibrate(model, conversion.model, data[:64], plan=conversion.plan, fit="reconstruct")
    assert result.kept_sweeps == 0 and result.output_error[1] > result.output_error[0]
    assert all(torch.equal(before[k], v) for k, v in conversion.model.state_dict().items())


def test_recovery_rate_comes_from_the_caller_then_the_plans_recipe_then_the_default():
    model, data = small_cnn()
    conversion = normswap.convert(model, "pretrained-small-batch", data[:1], validate=False)
    by_recipe = normswap.recover(model, copy.deepcopy(conversion.model), data, steps=1, progress=False,
                                 plan=conversion.plan)
    assert (by_recipe.lr, by_recipe.lr_source) == (3e-6, "recipe pretrained-small-batch")
    given = normswap.recover(model, copy.deepcopy(conversion.model), data, steps=1, lr=3e-4, progress=False,
                             plan=conversion.plan)
    assert (given.lr, given.lr_source) == (3e-4, "argument")
    plain = normswap.recover(model, copy.deepcopy(conversion.model), data, steps=1, progress=False)
    assert (plain.lr, plain.lr_source) == (1e-4, "default")
    from normswap.render import recovery_line

    line = recovery_line(by_recipe.to_dict())
    assert "at lr 3e-06 (recipe pretrained-small-batch)" in line
    with pytest.raises(normswap.NormswapError, match="learning rate must be positive"):
        normswap.recover(model, copy.deepcopy(conversion.model), data, steps=1, lr=0.0, progress=False)

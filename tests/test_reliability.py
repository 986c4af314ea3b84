"""Nothing lost, nothing half-done: failures midway, interrupted writes, dtypes and devices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap
from normswap import io
from normswap.apply import batchnorm_left

from .conftest import model_fingerprint
from .models import SequenceBN, Variants, trained_stats


class _ExplodingTarget(normswap.Target):
    """Builds fine for every site but one, where it fails: a conversion that breaks midway."""

    name = "test-explodes-at-bn3d"
    description = "fails on bn3d"

    def resolve(self, site, options):
        return {"transfer": "affine"}

    def build(self, model, site, state, options):
        if site.path == "bn3d":
            raise RuntimeError("boom")
        return {site.path: nn.Identity()}


@pytest.mark.parametrize("inplace", [False, True])
def test_a_conversion_failing_midway_leaves_the_model_untouched(inplace):
    normswap.register_target(_ExplodingTarget(), overwrite=True)
    model = Variants().eval()
    before = model_fingerprint(model)
    recipe = {"rules": [{"name": "explode", "target": "test-explodes-at-bn3d"}]}
    with pytest.raises(normswap.PlanError, match=r"bn3d: building target 'test-explodes-at-bn3d'.*boom"):
        normswap.convert(model, recipe, torch.randn(2, 3, 8, 8), inplace=inplace)
    assert model_fingerprint(model) == before
    assert len(batchnorm_left(model)) == 5, "no site was swapped before the failure"


def test_an_interrupted_save_leaves_the_old_result(tmp_path, monkeypatch):
    model = trained_stats(SequenceBN(), torch.randn(8, 4, 10))
    x = torch.randn(1, 4, 10)
    out = tmp_path / "out"
    first = normswap.convert(model, "sequence", x, validate=False)
    io.save(first, out)
    saved = {p.name: p.read_bytes() for p in out.iterdir()}

    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save(normswap.convert(model, "layernorm", x, validate=False), out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved, "the old result is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary directory is left behind"


def test_a_forward_that_fails_names_the_input_shape_and_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(normswap.TraceError, match=r"shape \(1, 5, 8, 8\).*example_inputs=.*--input-size"):
        normswap.plan(model, "small-batch", torch.randn(1, 5, 8, 8), shapes="always")
    # Without shapes the plan needs no forward pass; validation is where the bad input shows.
    with pytest.raises(normswap.DataError, match=r"shape \(\d+, 5, 8, 8\).*example_inputs=.*--input-size"):
        normswap.convert(model, "small-batch", torch.randn(1, 5, 8, 8))


def test_a_model_without_input_config_asks_for_example_inputs():
    with pytest.raises(normswap.TraceError, match="example_inputs"):
        normswap.plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "small-batch")


def test_batch_norm_without_running_stats_runs_on_a_single_example():
    # Batch statistics in eval mode: one sample per channel cannot be normalized, so discovery
    # repeats the example to two samples instead of failing.
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False)).eval()
    plan = normswap.plan(model, "small-batch", torch.randn(1, 4), shapes="always")
    assert plan.entries[0].site.input_shape == (2, 6)
    # A recipe that needs the layout runs the model the same way.
    assert normswap.plan(model, "style-transfer", torch.randn(1, 4)).entries[0].site.input_shape == (2, 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["small-batch", "fold", "freeze", "layernorm"])
def test_half_precision_models_keep_their_dtype(dtype, recipe):
    torch.manual_seed(0)
    model = trained_stats(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()),
                          torch.randn(8, 3, 8, 8)).to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    converted = normswap.convert(model, recipe, x[:1], validate=False).model
    assert {p.dtype for p in converted.parameters()} | {b.dtype for b in converted.buffers()} == {dtype}
    assert converted(x).dtype == dtype


def test_channels_last_weights_stay_channels_last_through_folding():
    model = trained_stats(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)), torch.randn(8, 3, 8, 8))
    model = model.to(memory_format=torch.channels_last)
    converted = normswap.convert(model, "fold", torch.randn(1, 3, 8, 8), validate=False).model
    assert converted[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("recipe", ["small-batch", "fold", "freeze", "dp"])
def test_cuda_models_stay_on_their_device(recipe):
    import timm

    model = timm.create_model("resnet18").cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    conversion = normswap.convert(model, recipe, x[:1], data=x)
    converted = conversion.model
    assert {p.device.type for p in converted.parameters()} == {"cuda"}
    assert converted(x).device.type == "cuda"
    if recipe in ("fold", "freeze"):
        assert conversion.report.drift.headline.relative_l2 < 1e-4

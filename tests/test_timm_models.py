"""Real timm models through the whole pipeline: plan, convert, save, load."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from normswap.apply import batchnorm_left

from .conftest import TIMM_CASES, model_fingerprint, relative_error

MODELS = list(TIMM_CASES)


@pytest.mark.parametrize("name", MODELS)
def test_small_batch_removes_batchnorm_and_makes_samples_independent(name, timm_model_factory):
    model, x = timm_model_factory(name)
    before = model_fingerprint(model)
    conversion = normswap.convert(model, "small-batch", x[:1], batch_size=2)
    converted = conversion.model

    assert batchnorm_left(converted) == []
    assert not any(isinstance(m, _BatchNorm) for m in converted.modules())
    assert type(converted) is type(model), "module-for-module swaps keep the model's class"
    with torch.no_grad():
        assert converted.eval()(x).shape == model(x).shape
        assert converted.forward_features(x).shape == model.forward_features(x).shape
    # What users convert for: in train mode a sample's output does not depend on its batch.
    assert normswap.batch_dependence(model, x) > 1e-3
    assert normswap.batch_dependence(converted, x) < 1e-5
    assert model_fingerprint(model) == before, "the input model must be untouched"
    assert len(conversion.plan.conversions) == sum(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_fold_is_exact_and_removes_foldable_batchnorm(name, timm_model_factory):
    model, x = timm_model_factory(name)
    conversion = normswap.convert(model, "fold", x[:1])
    folded = [e for e in conversion.plan.conversions if e.target == "fold"]
    assert folded, "every one of these models has conv→BN pairs"
    with torch.no_grad():
        err = relative_error(model(x), conversion.model.eval()(x))
    assert err <= 1e-5
    left = batchnorm_left(conversion.model)
    assert left == [], "fold falls back to frozen, which is not a BatchNorm"


@pytest.mark.parametrize("name", ["efficientnet_b0", "levit_128s"])
def test_freeze_is_exact_in_train_mode_too(name, timm_model_factory):
    model, x = timm_model_factory(name)
    converted = normswap.convert(model, "freeze", x[:1]).model.train()
    with torch.no_grad():
        assert relative_error(model(x), converted(x)) <= 1e-5
    assert normswap.batch_dependence(converted, x) < 1e-5


def test_pretrained_small_batch_on_efficientnet_keeps_activations_and_reloads(timm_model_factory, tmp_path):
    """RMSNorm over C×H×W in place of every BatchNormAct2d, the conv before it standardized; the saved
    conversion (plan + weights) reloads onto a fresh model bit for bit."""
    import timm

    from normswap.layers import GroupRMSNormAct

    model, x = timm_model_factory("efficientnet_b0")
    conversion = normswap.convert(model, "pretrained-small-batch", x[:1], batch_size=2)
    converted = conversion.model
    assert batchnorm_left(converted) == []
    assert isinstance(converted.bn1, GroupRMSNormAct) and converted.bn1.eps == 100.0
    assert type(converted.bn1.act) is type(model.bn1.act)
    assert converted.conv_stem.bias is not None and model.conv_stem.bias is None  # standardized copy only
    assert normswap.batch_dependence(converted, x) < 1e-5
    normswap.save(conversion, tmp_path / "out", model_spec={"timm": "efficientnet_b0"})
    reloaded = normswap.load(tmp_path / "out", timm.create_model("efficientnet_b0", pretrained=False))
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), reloaded.eval()(x))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "levit_128s"])
def test_plan_round_trips_and_saved_conversion_reloads_bit_exactly(name, timm_model_factory, tmp_path):
    import timm

    model, x = timm_model_factory(name)
    conversion = normswap.convert(model, "small-batch", x[:1], batch_size=2)
    plan = conversion.plan
    assert normswap.Plan.from_json(plan.to_json()) == plan
    normswap.save(conversion, tmp_path / "out", model_spec={"timm": name})

    fresh = timm.create_model(name, pretrained=False)
    reloaded = normswap.load(tmp_path / "out", fresh)
    expected = conversion.model.state_dict()
    got = reloaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(conversion.model.eval()(x), reloaded.eval()(x))


def test_tracing_leaves_no_trace_on_levit(timm_model_factory):
    model, x = timm_model_factory("levit_128s")
    normswap.plan(model, "small-batch", x[:1])
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    assert caches and all(c == {} for c in caches)
    torch.save(model, io.BytesIO())  # failed with fx Proxies left in the cache
    pickle.dumps(model.state_dict())


def test_levit_bn1d_on_tokens_becomes_layernorm(timm_model_factory):
    model, x = timm_model_factory("levit_128s")
    plan = normswap.plan(model, "small-batch", x[:1])
    token_sites = [e for e in plan.entries if e.site.short_cls == "BatchNorm1d"]
    assert token_sites and all(e.target == "layernorm" for e in token_sites)
    assert {e.site.layout for e in token_sites} == {"features"}


def test_efficientnet_keeps_activation_of_batchnormact(timm_model_factory):
    from timm.layers import GroupNormAct

    model, x = timm_model_factory("efficientnet_b0")
    converted = normswap.convert(model, "small-batch", x[:1], batch_size=2).model
    assert isinstance(converted.bn1, GroupNormAct)
    assert type(converted.bn1.act) is type(model.bn1.act)
    assert converted.bn1.num_groups == 32


def test_inplace_converts_the_given_object(timm_model_factory):
    model, x = timm_model_factory("resnet18")
    conversion = normswap.convert(model, "small-batch", x[:1], inplace=True, batch_size=2)
    assert conversion.model is model
    assert batchnorm_left(model) == []
    assert conversion.report.drift is not None


def test_timm_sync_batchnorm_act_converts_and_keeps_activation(timm_model_factory):
    from timm.layers import GroupNormAct, convert_sync_batchnorm
    from timm.layers.norm_act import SyncBatchNormAct

    model, x = timm_model_factory("mobilenetv3_small_050")
    synced = convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, SyncBatchNormAct) for m in synced.modules())
    converted = normswap.convert(synced, "small-batch", x[:1], batch_size=2).model
    assert batchnorm_left(converted) == []
    assert isinstance(converted.bn1, GroupNormAct) and type(converted.bn1.act) is type(synced.bn1.act)
    assert normswap.batch_dependence(converted, x) < 1e-5

"""pretrained-finetune: a converted network that is the original until it trains, then GroupNorm.

The layer (``AnnealedGroupNorm``) keeps BatchNorm's statistics as buffers and moves from the frozen
BatchNorm to a GroupNorm of the standardized input over its first train-mode forwards."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from normswap.recipes import load_recipe

from .conftest import model_fingerprint, relative_error


def pretrained_resnet(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """timm resnet18 whose BatchNorm statistics are those of the inputs it is then given (cumulative
    averages over a few batches), as a pretrained network's are of its own data."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=10)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = None
    x = torch.randn(16, 3, 32, 32)
    model.train()
    with torch.no_grad():
        for chunk in x.split(4):
            model(chunk)
    return model.eval(), x


def with_options(**options) -> dict:
    recipe = load_recipe("pretrained-finetune").to_dict()
    recipe["rules"][0]["options"].update(options)
    return recipe


def annealed_layers(model: nn.Module) -> list[normswap.AnnealedGroupNorm]:
    return [m for m in model.modules() if isinstance(m, normswap.AnnealedGroupNorm)]


def test_converted_network_is_the_original_until_it_trains():
    original, x = pretrained_resnet()
    before = model_fingerprint(original)
    shipped = normswap.convert(original, "pretrained-finetune", x[:2], validate=False).model
    assert model_fingerprint(original) == before
    assert not [m for m in shipped.modules() if isinstance(m, _BatchNorm)]
    assert len(annealed_layers(shipped)) == 20
    with torch.no_grad():
        expected = original(x)
        assert relative_error(expected, shipped.eval()(x)) < 1e-5  # the frozen BatchNorm, whatever eps_start
        shipped.train()(x[:2])  # one training forward starts the anneal at eps_start (100)
        moved = relative_error(expected, shipped.eval()(x))
        assert 1e-4 < moved < 0.05
    # Nothing was folded: the convs are the original's, the statistics buffers of the new layers.
    torch.testing.assert_close(shipped.conv1.weight, original.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(shipped.bn1.running_var, original.bn1.running_var, rtol=0, atol=0)


def test_train_mode_forwards_anneal_it_into_groupnorm_of_the_standardized_input():
    original, x = pretrained_resnet()
    model = normswap.convert(original, with_options(anneal_steps=4), x[:2], validate=False).model
    layer = model.bn1
    seen = []
    for _ in range(6):
        model.train()(x[:2])
        seen.append(float(layer.eps))
        model.eval()(x[:2])  # evaluation does not advance it
    expected = [100 * (1e-3 / 100) ** min(k / 4, 1) for k in range(1, 7)]
    assert seen == pytest.approx(expected, rel=1e-4)
    assert int(layer.train_forwards) == 6 and layer.progress() == 1.0 and float(layer.centring) == 1.0
    # At the end: GroupNorm(32) of (x − μ)/σ, with BatchNorm's affine (and √(1 + eps), which is 1.0005).
    h = torch.randn(2, 64, 8, 8) * 3 + 1
    standardized = (h - layer.running_mean.view(1, -1, 1, 1)) / (layer.running_var.view(1, -1, 1, 1) + 1e-5).sqrt()
    reference = F.group_norm(standardized, 32, eps=1e-3) * math.sqrt(1 + 1e-3)
    reference = reference * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(h), reference, rtol=1e-4, atol=1e-4)


def test_samples_stay_independent_in_train_mode_and_the_plan_round_trips(tmp_path):
    original, x = pretrained_resnet()
    conversion = normswap.convert(original, "pretrained-finetune", x[:4], validate=False)
    assert normswap.batch_dependence(conversion.model, x[:4]) < 1e-5
    plan = normswap.Plan.from_json(conversion.plan.to_json())
    assert plan == conversion.plan
    assert {e.target for e in plan.conversions} == {"annealed-groupnorm"}
    assert all(e.options["groups"] == 32 and e.options["anneal_steps"] == 200 for e in plan.conversions)


def test_checkpoint_carries_where_the_anneal_stands(tmp_path):
    original, x = pretrained_resnet()
    conversion = normswap.convert(original, "pretrained-finetune", x[:2], validate=False)
    model = conversion.model.train()
    for _ in range(5):
        model(x[:2])
    normswap.save(conversion, tmp_path / "ckpt")
    loaded = normswap.load(tmp_path / "ckpt", timm.create_model("resnet18", num_classes=10))
    for a, b in zip(annealed_layers(model), annealed_layers(loaded), strict=True):
        assert int(b.train_forwards) == 5 and float(b.eps) == float(a.eps)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_auto_chooses_it_to_finetune_at_a_small_batch_and_keeps_batchnorm_at_a_large_one():
    original, x = pretrained_resnet()
    small = normswap.plan(original, "auto", x[:2], purpose="finetune", batch_size=2)
    unknown = normswap.plan(original, "auto", x[:2], purpose="finetune")
    large = normswap.plan(original, "auto", x[:2], purpose="finetune", batch_size=32)
    assert {e.target for e in small.conversions} == {e.target for e in unknown.conversions} == {"annealed-groupnorm"}
    assert not large.conversions


def test_recipes_command_says_what_each_of_the_three_keeps_and_costs(capsys):
    from normswap.cli import main

    for name in ("pretrained-finetune", "pretrained-small-batch", "small-batch"):
        recipe = load_recipe(name)
        assert recipe.keeps and recipe.costs, name
        assert normswap.Recipe.from_dict(recipe.to_dict(), recipe.source) == recipe
    assert main(["recipes"]) == 0
    shown = capsys.readouterr().out
    trade = shown[shown.index("what each keeps"):]
    assert all(name in trade for name in ("pretrained-finetune", "pretrained-small-batch", "small-batch"))

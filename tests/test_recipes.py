"""Recipes: every shipped one loads, strict validation, and the seed document's selection guide."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import normswap
from normswap.recipes import builtin_recipes, load_recipe

from .models import SequenceBN, Variants

SHIPPED = {
    "small-batch",
    "sequence",
    "layernorm",
    "layernorm-chw",
    "rmsnorm-chw",
    "style-transfer",
    "detection",
    "dp",
    "freeze",
    "fold",
    "auto",
    "pretrained-small-batch",
    "pretrained-finetune",
}


def test_every_required_recipe_ships_and_loads():
    assert set(builtin_recipes()) >= SHIPPED
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description and recipe.when
        assert normswap.Recipe.from_dict(recipe.to_dict(), recipe.source) == recipe


def write(tmp_path, text: str):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_path_and_valid_keys(tmp_path):
    path = write(tmp_path, '[[rules]]\nname = "a"\ntarget = "groupnorm"\nmatch = { layout = ["image"] }\n')
    with pytest.raises(normswap.RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and "rules[0].match" in message and "'layout'" in message
    assert "Did you mean 'layouts'" in message and "batch_size_max" in message


def test_unknown_target_and_option_list_the_valid_ones(tmp_path):
    with pytest.raises(
        normswap.RecipeError, match=r"unknown target 'groupnrom'.*Did you mean 'groupnorm'.*layernorm-chw"
    ):
        load_recipe(write(tmp_path, '[[rules]]\nname = "a"\ntarget = "groupnrom"\n'))
    with pytest.raises(normswap.RecipeError, match=r"'group'.*rules\[0\].target options.*groups"):
        load_recipe(write(tmp_path, '[[rules]]\nname = "a"\ntarget = "groupnorm"\noptions = { group = 4 }\n'))
    with pytest.raises(normswap.RecipeError, match=r"groups: expected int"):
        load_recipe(write(tmp_path, '[[rules]]\nname = "a"\ntarget = "groupnorm"\noptions = { groups = "4" }\n'))
    with pytest.raises(normswap.RecipeError, match=r"not valid TOML"):
        load_recipe(write(tmp_path, "[[rules]\n"))


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(normswap.UnknownNameError, match=r"unknown recipe 'smallbatch'.*Did you mean 'small-batch'"):
        load_recipe("smallbatch")


def test_unknown_fact_is_refused():
    with pytest.raises(normswap.UnknownNameError, match=r"unknown fact 'batchsize'.*batch_size"):
        normswap.plan(SequenceBN(), "auto", torch.randn(1, 4, 8), batchsize=2)


def test_first_match_wins_and_unmatched_rules_are_reported():
    recipe = {
        "rules": [
            {"name": "images", "match": {"layouts": ["image"]}, "target": "groupnorm"},
            {"name": "also-images", "match": {"layouts": ["image"]}, "target": "layernorm"},
            {"name": "exclude-bn3d", "match": {"include": ["bn*"], "exclude": ["re:bn3d"]}, "target": "layernorm"},
        ]
    }
    plan = normswap.plan(Variants().eval(), recipe, torch.randn(1, 3, 8, 8))
    by_path = {e.site.path: e for e in plan.entries}
    assert by_path["sync"].target == "groupnorm" and by_path["sync"].rule == "images"
    assert by_path["bn1d"].rule == "exclude-bn3d" and by_path["bn3d"].action == "keep"
    assert plan.unmatched_rules == ("also-images",)


def test_class_match_includes_subclasses():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct2d(8), nn.BatchNorm2d(8)).eval()
    recipe = {
        "rules": [
            {"name": "act-only", "match": {"classes": ["BatchNormAct2d"]}, "target": "groupnorm"},
            {"name": "any-bn2d", "match": {"classes": ["BatchNorm2d"]}, "target": "layernorm"},
        ]
    }
    plan = normswap.plan(model, recipe, torch.randn(1, 3, 4, 4))
    assert [e.rule for e in plan.entries] == ["act-only", "any-bn2d"]


def test_ensure_is_checked_at_plan_time():
    recipe = {
        "recipe": {"ensure": ["no-batchnorm"]},
        "rules": [{"name": "only-images", "match": {"layouts": ["image"]}, "target": "groupnorm"}],
    }
    with pytest.raises(normswap.PlanError, match=r"ensures no-batchnorm.*bn1d stays BatchNorm"):
        normswap.plan(Variants().eval(), recipe, torch.randn(1, 3, 8, 8))


def _targets(plan):
    return {e.site.path: (e.target if e.action == "convert" else "keep") for e in plan.entries}


@pytest.mark.parametrize(
    ("facts", "image", "features", "volume"),
    [
        # Large batch + CNN: BatchNorm stays.
        ({"batch_size": 64}, "keep", "keep", "keep"),
        # Small batch: CNN → GroupNorm, features → LayerNorm.
        ({"batch_size": 2}, "groupnorm", "layernorm", "groupnorm"),
        # Object detection / segmentation / video → GroupNorm, whatever the batch.
        ({"task": "detection", "batch_size": 64}, "groupnorm", "keep", "groupnorm"),
        ({"task": "video"}, "groupnorm", "keep", "groupnorm"),
        # Style transfer / GAN → InstanceNorm.
        ({"task": "style-transfer"}, "instancenorm", "keep", "instancenorm"),
        ({"task": "gan", "batch_size": 2}, "instancenorm", "layernorm", "instancenorm"),
        # Sequence models / Transformers: tokens → LayerNorm.
        ({"sequence": True}, "keep", "layernorm", "keep"),
        # Inference: whatever stays BatchNorm is folded away (or frozen where it cannot be).
        ({"purpose": "inference"}, "frozen", "fold", "fold"),
    ],
)
def test_auto_recipe_follows_the_seed_selection_guide(facts, image, features, volume):
    plan = normswap.plan(Variants().eval(), "auto", torch.randn(1, 3, 8, 8), **facts)
    targets = _targets(plan)
    # The image site "sync" follows two other BN layers, so it cannot be folded: frozen instead.
    assert (targets["sync"], targets["bn1d"], targets["bn3d"]) == (image, features, volume)


def test_auto_recipe_sends_sequences_to_layernorm_without_facts():
    plan = normswap.plan(SequenceBN().eval(), "auto", torch.randn(1, 4, 8))
    assert _targets(plan) == {"bn": "layernorm"}


def test_user_can_register_a_target():
    class Scale(normswap.Target):
        name = "test-scale"
        description = "multiply by gamma only"

        def resolve(self, site, options):
            return {"transfer": "affine"}

        def build(self, model, site, state, options):
            from normswap.targets import finish

            layer = finish(nn.Conv2d(site.num_features, site.num_features, 1, groups=site.num_features), state)
            return {site.path: layer}

    normswap.register_target(Scale(), overwrite=True)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)).eval()
    converted = normswap.convert(
        model, {"rules": [{"name": "s", "target": "test-scale"}]}, torch.randn(1, 3, 4, 4)
    ).model
    assert isinstance(converted[1], nn.Conv2d)


def test_recovery_table_sets_a_learning_rate_the_plan_carries(tmp_path):
    rule = '[[rules]]\nname = "a"\ntarget = "groupnorm"\n'
    recipe = load_recipe(write(tmp_path, rule + "[recovery]\nlr = 3e-5\n"))
    assert recipe.recovery.lr == 3e-5 and load_recipe(write(tmp_path, rule)).recovery.lr is None
    assert normswap.recipes.Recipe.from_dict(recipe.to_dict()).recovery == recipe.recovery
    with pytest.raises(normswap.RecipeError, match=r"'rate'.*\[recovery\].*Valid keys: lr"):
        load_recipe(write(tmp_path, rule + "[recovery]\nrate = 3e-5\n"))
    for bad in ("0", "2.0", '"1e-5"', "true"):
        with pytest.raises(normswap.RecipeError, match=r"\[recovery\]\.lr must be a learning rate"):
            load_recipe(write(tmp_path, rule + f"[recovery]\nlr = {bad}\n"))


def test_pretrained_small_batch_plan_records_its_recovery_rate_and_old_plans_still_load():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    plan = normswap.plan(model, "pretrained-small-batch", torch.randn(2, 3, 8, 8))
    assert plan.recovery.lr == 3e-6 and json.loads(plan.to_json())["recovery"] == {"lr": 3e-6}
    assert normswap.Plan.from_json(plan.to_json()) == plan
    older = {k: v for k, v in json.loads(plan.to_json()).items() if k != "recovery"}
    assert normswap.Plan.from_dict(older).recovery.lr is None
    assert "defaults to lr 3e-06, from the recipe pretrained-small-batch" in str(plan)
    assert normswap.plan(model, "small-batch", torch.randn(2, 3, 8, 8)).recovery.lr is None

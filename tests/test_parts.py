"""Tracing by parts (models fx cannot trace whole) and frozen BatchNorm layers as sites, on small
hand-built models; tests/test_torchvision.py has the same on real detectors and segmenters."""

from __future__ import annotations

import pytest
import timm.layers.norm_act
import torch
import torchvision
from torch import nn

import normswap
from normswap.tracing import is_frozen_batchnorm

from .conftest import relative_error


def _block(cin: int, cout: int, norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU())


class Head(nn.Module):
    """Applied to a list of feature maps, one conv → BN shared by every level (a detector's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.bn(self.conv(f)) for f in features]


class Detector(nn.Module):
    """Top-level control flow on a tensor (fx cannot trace it) around plain traceable blocks."""

    def __init__(self, norm: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_block(3, 8, norm), _block(8, 8, norm))
        self.head = Head()
        self.side = nn.Conv2d(8, 8, 1)
        self.side_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        levels = self.head([f, nn.functional.avg_pool2d(f, 2)])
        if f.sum() > 0:  # data-dependent: the whole model does not trace
            levels = [level * 2 for level in levels]
        return {"p3": levels[0], "p4": levels[1], "side": self.side_bn(self.side(f))}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine at every site, BatchNorm or frozen (their weight is a buffer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            var = m._buffers.get("running_var")
            if var is not None:
                c = var.numel()
                m._buffers["running_mean"].copy_(0.3 * torch.randn(c, generator=g))
                var.copy_(0.5 + torch.rand(c, generator=g))
                for name in ("weight", "bias"):
                    t = m._parameters.get(name)
                    t = t if t is not None else m._buffers[name]
                    t.copy_((1.0 if name == "weight" else 0.0) + 0.2 * torch.randn(c, generator=g))
    return model


def _max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(relative_error(a[k], b[k]) for k in a)


def test_a_model_that_does_not_trace_whole_is_traced_by_parts_and_folds():
    torch.manual_seed(0)
    model = _randomize(Detector()).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = normswap.plan(model, "fold", x)
    assert plan.trace == "parts" and "TraceError" in (plan.trace_error or "")
    learned = {e.site.path: e.site.learned_by for e in plan.entries}
    assert learned == {"backbone.0.1": "fx:backbone", "backbone.1.1": "fx:backbone", "head.bn": "fx:head",
                       "side_bn": "eager"}
    # The head's shared conv → BN (called once per level) folds; side_bn, outside every part, cannot.
    assert {e.site.path: e.target for e in plan.entries} == {
        "backbone.0.1": "fold", "backbone.1.1": "fold", "head.bn": "fold", "side_bn": "frozen"}
    head = plan.entry("head.bn").site
    assert head.producer == "head.conv" and head.call_count == 2
    conversion = normswap.convert(model, "fold", x, validate=False)
    with torch.no_grad():
        assert _max_relative(model(x), conversion.model(x)) < 1e-5
    assert any("traces of its parts" in w for w in conversion.report.warnings)


def test_a_part_plan_round_trips_through_json_and_replays_on_a_fresh_model():
    torch.manual_seed(0)
    model = _randomize(Detector()).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = normswap.plan(model, "fold", x)
    again = normswap.Plan.from_json(plan.to_json())
    assert again == plan and again.trace == "parts"
    replayed = normswap.apply_plan(model, again)
    with torch.no_grad():
        assert _max_relative(model(x), replayed(x)) < 1e-5


def test_a_producer_also_called_outside_its_part_is_not_folded():
    class Reuse(Detector):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = super().forward(x)
            # the head's conv is also called here, outside the head's trace, without its BatchNorm
            return out | {"raw": self.head.conv(out["p3"])}

    model = _randomize(Reuse()).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = normswap.plan(model, "fold", x)
    entry = plan.entry("head.bn")
    assert entry.site.learned_by == "fx:head" and not entry.site.producer_exclusive and entry.target == "frozen"
    conversion = normswap.convert(model, "fold", x, validate=False)
    with torch.no_grad():
        assert _max_relative(model(x), conversion.model(x)) < 1e-5


@pytest.mark.parametrize("layer", [
    torchvision.ops.misc.FrozenBatchNorm2d(8),
    timm.layers.norm_act.FrozenBatchNorm2d(8),
    timm.layers.FrozenBatchNormAct2d(8),
    normswap.FrozenBatchNorm(8),
])
def test_frozen_batchnorm_layers_of_every_library_are_sites(layer: nn.Module):
    assert is_frozen_batchnorm(layer)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), layer, nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(1, 3, 8, 8)
    plan = normswap.plan(model, "fold", x)
    [entry] = plan.entries
    assert entry.site.frozen and entry.site.num_features == 8 and entry.target == "fold"
    folded = normswap.convert(model, "fold", x, validate=False).model
    assert not any(is_frozen_batchnorm(m) for m in folded.modules())
    with torch.no_grad():
        assert relative_error(model(x), folded(x)) < 1e-5


def test_layers_that_train_or_update_statistics_are_not_frozen_sites():
    class Updating(torchvision.ops.misc.FrozenBatchNorm2d):
        def __init__(self, c: int) -> None:
            super().__init__(c)
            self.momentum = 0.1  # updates its statistics somewhere: not frozen

    class Trained(torchvision.ops.misc.FrozenBatchNorm2d):
        def __init__(self, c: int) -> None:
            super().__init__(c)
            self.scale = nn.Parameter(torch.ones(c))

    assert not is_frozen_batchnorm(Updating(4)) and not is_frozen_batchnorm(Trained(4))
    assert not is_frozen_batchnorm(nn.BatchNorm2d(4)), "a BatchNorm is a site of its own kind"
    assert not is_frozen_batchnorm(nn.Sequential(torchvision.ops.misc.FrozenBatchNorm2d(4)))


def test_recipes_fold_keep_or_convert_frozen_sites():
    torch.manual_seed(0)
    model = _randomize(Detector(torchvision.ops.misc.FrozenBatchNorm2d)).eval()
    x = torch.randn(1, 3, 16, 16)
    frozen = [p for p, m in model.named_modules() if is_frozen_batchnorm(m)]
    targets = {r: {e.site.path: (e.action, e.target) for e in normswap.plan(model, r, x).entries}
               for r in ("freeze", "small-batch", "dp")}
    assert {targets["freeze"][p] for p in frozen} == {("keep", None)}, "freeze keeps what is frozen already"
    assert {targets["small-batch"][p] for p in frozen} == {("convert", "groupnorm")}
    # dp: no BatchNorm and no running statistics anywhere, the frozen ones included.
    conversion = normswap.convert(model, "dp", x, validate=False)
    assert not [n for n, _ in conversion.model.named_buffers() if "running" in n]
    assert not any(is_frozen_batchnorm(m) for m in conversion.model.modules())


def test_groupnorm_from_a_frozen_site_keeps_its_expected_output_and_trains():
    torch.manual_seed(0)
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(8)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 8, 3), frozen)).eval()
    x = torch.randn(1, 3, 8, 8)
    conversion = normswap.convert(model, "small-batch", x, validate=False)
    gn = conversion.model[1]
    assert isinstance(gn, nn.GroupNorm) and gn.weight.requires_grad, "the new layer trains like any other"
    assert conversion.plan.entries[0].options["transfer"] == "statistics"
    # The statistics-aware transfer used the frozen layer's buffers: not the default affine.
    assert not torch.allclose(gn.weight, torch.ones(8))


def test_a_second_discovery_for_shapes_reuses_the_parts_and_keeps_their_context():
    from normswap.tracing import discover

    model = _randomize(Detector()).eval()
    x = torch.randn(1, 3, 16, 16)
    first = discover(model, x)
    again = discover(model, x, "always", traced=first)
    assert again.parts == first.parts
    assert [s.producer_exclusive for s in again.sites] == [s.producer_exclusive for s in first.sites]
    assert [s.learned_by for s in again.sites] == [s.learned_by for s in first.sites]


def test_standardize_folds_into_producers_found_in_parts():
    torch.manual_seed(0)
    model = _randomize(Detector(torchvision.ops.misc.FrozenBatchNorm2d)).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = normswap.plan(model, "pretrained-small-batch", x)
    transfers = {e.site.path: (e.options["transfer"], e.options.get("producer")) for e in plan.entries}
    assert transfers == {
        "backbone.0.1": ("standardize", "backbone.0.0"), "backbone.1.1": ("standardize", "backbone.1.0"),
        "head.bn": ("standardize", "head.conv"), "side_bn": ("statistics", None)}
    converted = normswap.apply_plan(model, plan)
    assert not torch.equal(converted.backbone[0][0].weight, model.backbone[0][0].weight), "the conv was standardized"
    with torch.no_grad():
        assert all(torch.isfinite(v).all() for v in converted(x).values())


def _same_padding(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """TF-style padding from the input's shape in Python: int() on a traced size stops fx."""
    height = int(x.shape[-2])
    pad = max(conv.kernel_size[0] - (1 if height % 2 else 0), 0)
    return nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


class _PaddedConvLayer(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(_same_padding(x, self.conv))))


class _GroupedConv(nn.Conv2d):  # configures its base only: folding into it is exact
    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels)


class _ScaledConv(nn.Conv2d):  # its own forward: not a plain conv to fold into
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class _PaddedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(_PaddedConvLayer(3, 8), _PaddedConvLayer(8, 8))
        self.grouped = nn.Sequential(_GroupedConv(8), nn.BatchNorm2d(8))
        self.scaled = nn.Sequential(_ScaledConv(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent: the whole model does not trace
            x = self.layers(x)
        return self.scaled(self.grouped(x)).mean((2, 3))


def test_parts_whose_forward_calls_python_shape_arithmetic_still_fold_exactly():
    model = _randomize(_PaddedNet()).eval()
    x = torch.randn(2, 3, 15, 15)
    conversion = normswap.convert(model, "fold", x[:1], validate=False)
    targets = {e.site.path: e.target for e in conversion.plan.entries}
    assert conversion.plan.trace == "parts"
    assert targets == {"layers.0.norm": "fold", "layers.1.norm": "fold", "grouped.1": "fold",
                       "scaled.1": "frozen"}, "the padding is one call; a conv with its own forward is no producer"
    with torch.no_grad():
        assert relative_error(conversion.model(x), model(x)) < 1e-5


@pytest.mark.parametrize("name", ["MobileNetV2", "EfficientNet"])
def test_hugging_face_mobile_networks_fold_every_site_exactly(name):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{name}Config")(num_labels=4, image_size=32)
    model = _randomize(getattr(transformers, f"{name}ForImageClassification")(config)).eval()
    x = torch.randn(2, 3, 32, 32)
    conversion = normswap.convert(model, "fold", x[:1], validate=False)
    assert set(conversion.plan.summary()) == {"fold"}, conversion.plan.summary()
    with torch.no_grad():
        assert relative_error(conversion.model(x).logits, model(x).logits) < 1e-5

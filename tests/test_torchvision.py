"""torchvision models at tiny sizes with random weights: a detector whose backbone holds
FrozenBatchNorm2d (what torchvision builds on pretrained backbones), a segmenter and a classifier,
each converted and folded exactly; and a GroupNorm detector trained one step at batch 2."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap.tracing import is_frozen_batchnorm, is_site_module

from .test_parts import _randomize

SIZE = 96


def _detector() -> nn.Module:
    """Faster R-CNN on a ResNet-18 FPN whose norms are FrozenBatchNorm2d, at a 96-pixel input."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=5)
    model = torchvision.models.detection.FasterRCNN(
        backbone, num_classes=3, min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
        box_batch_size_per_image=32,
    )
    return _randomize(model)


def _outputs(value: object) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _assert_same(a: object, b: object) -> None:
    left, right = _outputs(a), _outputs(b)
    assert [t.shape for t in left] == [t.shape for t in right]
    for x, y in zip(left, right, strict=True):
        if x.is_floating_point():
            scale = x.abs().max().clamp_min(1.0)
            assert (x - y).abs().max() <= 1e-4 * scale
        else:
            assert torch.equal(x, y)


def _sites(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_site_module(m))


def test_detector_with_frozen_batchnorm_folds_exactly_by_parts():
    model = _detector().eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    frozen = sum(1 for m in model.modules() if is_frozen_batchnorm(m))
    assert frozen == _sites(model) == 20, "every norm of the backbone is a FrozenBatchNorm2d"
    conversion = normswap.convert(model, "fold", x)  # default validation: fold keeps every detection
    assert conversion.report.drift is not None and not conversion.report.drift.failures
    plan = conversion.plan
    assert plan.trace == "parts"
    # Every one of them follows a conv in the backbone, which traces on its own: all fold.
    assert plan.summary() == {"fold": frozen}
    assert {e.site.learned_by for e in plan.entries} == {"fx:backbone"}
    assert not any(is_site_module(m) for m in conversion.model.modules())
    with torch.no_grad():
        _assert_same(model.backbone(x), conversion.model.backbone(x))  # the FPN features
        _assert_same(model(x), conversion.model(x))  # and the detections


def test_groupnorm_detector_trains_one_step_at_batch_two():
    model = _detector().eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    conversion = normswap.convert(model, "detection", x)  # default validation: changed detections are findings
    drift = conversion.report.drift
    assert drift is not None and drift.detections, "the detections of both models were matched"
    converted = conversion.model
    assert conversion.plan.summary() == {"groupnorm": 20}
    assert not any(is_site_module(m) for m in converted.modules())
    norms = [m for m in converted.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20 and all(m.weight.requires_grad for m in norms)
    converted.train()
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [30.0, 40.0, 90.0, 90.0]]),
                "labels": torch.tensor([2, 1])}]
    before = {n: p.detach().clone() for n, p in converted.named_parameters()}
    optimizer = torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.01)
    losses = converted(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in converted.named_parameters() if not torch.equal(p, before[n])}
    gn_weights = {f"{path}.weight" for path, m in converted.named_modules() if isinstance(m, nn.GroupNorm)}
    assert gn_weights <= changed, "every GroupNorm trained"
    assert "backbone.body.conv1.weight" in changed
    # the model the user gave keeps its frozen layers
    assert sum(1 for m in model.modules() if is_frozen_batchnorm(m)) == 20


@pytest.mark.parametrize(("name", "size"), [("lraspp_mobilenet_v3_large", 64), ("resnet18", 64)])
def test_segmenter_and_classifier_convert_with_validation_and_fold_exactly(name: str, size: int):
    torch.manual_seed(0)
    if name.startswith("lraspp"):
        model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3)
    else:
        model = torchvision.models.resnet18(weights=None, num_classes=10)
    model = _randomize(model).eval()
    x = torch.rand(1, 3, size, size)
    sites = _sites(model)
    converted = normswap.convert(model, "small-batch", x, batch_size=2)
    assert converted.report.drift is not None and converted.report.batchnorm_left == ()
    folded = normswap.convert(model, "fold", x)
    assert folded.report.drift is not None
    assert folded.plan.summary() == {"fold": sites}, "every BatchNorm follows a conv: all fold"
    with torch.no_grad():
        _assert_same(model(x), folded.model(x))


def test_a_detector_given_a_list_of_images_converts_and_says_it_was_not_validated():
    model = _detector().eval()
    conversion = normswap.convert(model, "fold", ([torch.rand(3, SIZE, SIZE)],))
    assert conversion.plan.summary() == {"fold": 20} and conversion.report.drift is None
    assert any(w.startswith("not validated: the example input is a list") for w in conversion.report.warnings)


def test_dp_detector_that_does_not_trace_whole_gets_its_blocks_rewritten_out_of_place():
    """torchvision's BasicBlock does ``out += identity`` on a hooked output; the detector does not trace
    whole, so the blocks are found by a hooked forward and rewritten alone, and Opacus-style hooks run."""
    from normswap.inplace import check_out_of_place

    model = _detector().eval()
    conversion = normswap.convert(model, "dp", torch.rand(1, 3, SIZE, SIZE), validate=False)
    converted = conversion.model
    assert conversion.plan.trace == "parts" and type(converted).__name__ == "FasterRCNN"
    assert any("`out += identity`" in w for w in conversion.report.warnings)
    check_out_of_place(converted, ((1, 3, SIZE, SIZE),))  # the hooked forward now passes
    converted.train()
    for module in converted.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.register_full_backward_hook(lambda *_: None)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    sum(converted([torch.rand(3, SIZE, SIZE)], targets).values()).backward()

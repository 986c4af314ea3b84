"""Validation of models whose outputs are not one logits tensor: empty leaves, outputs whose structure
differs between train and eval mode, changed counts, box leaves, detectors; batch dependence with
every random generator seeded."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import normswap
from normswap.checks import measure_batch_dependence
from normswap.html import report_html
from normswap.outputs import Leaf, box_iou, is_class_scores, kl_per_sample, match_detections
from normswap.render import print_report, report_markdown
from normswap.types import Report


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class EmptyBoxes(_ConvBN):
    def forward(self, x):
        y = self.features(x)
        return {"scores": y.mean((1, 2, 3)), "boxes": y.new_zeros(0, 4)}


class TrainEvalStructure(_ConvBN):
    def forward(self, x):
        y = self.features(x)
        return y if self.training else y.flatten(2)


class PartlyTrainEvalStructure(_ConvBN):
    def forward(self, x):
        y = self.features(x)
        return y.mean((2, 3)), (y if self.training else y.flatten(2))


class Thresholded(_ConvBN):
    def forward(self, x):
        y = self.features(x)
        return y[y > 0.5]


class BoxesAndLogits(_ConvBN):
    def __init__(self) -> None:
        super().__init__()
        self.box = nn.Linear(8, 4)
        self.cls = nn.Linear(8, 5)

    def forward(self, x):
        y = self.features(x).mean((2, 3))
        return {"boxes": self.box(y), "logits": self.cls(y)}


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _rendered(report: Report) -> str:
    console = Console(width=80, record=True, color_system=None)
    print_report(report, console)
    return console.export_text() + report_markdown(report) + report_html(report)


def test_an_empty_output_leaf_is_a_finding_not_a_crash():
    report = normswap.convert(EmptyBoxes().eval(), "small-batch", X[:1], data=X).report
    drift = report.drift
    assert [o.name for o in drift.outputs] == ["output['scores']"]
    (finding,) = drift.findings
    assert (finding.name, finding.kind, finding.original_shape, finding.batches) == ("output['boxes']", "empty",
                                                                                    (0, 4), 1)
    assert "empty on both sides" in _rendered(report)


def test_train_eval_gap_only_where_the_structures_agree():
    drift = normswap.convert(TrainEvalStructure().eval(), "small-batch", X[:1], data=X).report.drift
    assert drift.train_eval_gap is None
    assert "differ in structure" in drift.train_eval_note and "no leaf agrees" in drift.train_eval_note
    assert drift.outputs[0].relative_l2 is not None, "eval-mode outputs are still compared"

    partly = normswap.convert(PartlyTrainEvalStructure().eval(), "small-batch", X[:1], data=X).report.drift
    assert partly.train_eval_gap == pytest.approx(0.0, abs=1e-6)  # GroupNorm: the same in both modes
    assert "covers the 1 leaves that agree" in partly.train_eval_note
    assert "output[1] (4, 8, 14, 14) vs (4, 8, 196)" in partly.train_eval_note


def test_a_changed_count_is_reported_and_the_conversion_kept(tmp_path):
    conversion = normswap.convert(Thresholded().eval(), "small-batch", X[:1], data=X)
    drift = conversion.report.drift
    (finding,) = drift.findings
    with torch.no_grad():
        before, after = Thresholded().eval()(X).shape, conversion.model.eval()(X).shape
    assert before != after
    assert (finding.kind, finding.original_shape, finding.converted_shape) == ("count", tuple(before), tuple(after))
    assert drift.outputs == () and drift.verdict == "measured"
    assert Report.from_json(conversion.report.to_json()) == conversion.report
    normswap.save(conversion, tmp_path / "out", model_spec={})
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["drift"]["findings"][0]["kind"] == "count"
    assert f"count changed from {tuple(before)} to {tuple(after)}" in _rendered(conversion.report)
    for name in ("report.md", "report.html"):
        assert "count changed" in (tmp_path / "out" / name).read_text()
    # A threshold cannot be checked on a leaf that was not compared: a failure, not an exception.
    gated = normswap.validate(Thresholded().eval(), conversion.model, X, measure=False, max_drift=0.5)
    assert gated.verdict == "fail" and "cannot be checked" in gated.failures[0]
    with pytest.raises(normswap.NormswapError, match="no output leaf could be compared"):
        _ = drift.headline


def test_class_metrics_only_on_class_score_leaves():
    drift = normswap.convert(BoxesAndLogits().eval(), "fold", X[:1], data=X).report.drift
    by_name = {o.name: o for o in drift.outputs}
    assert by_name["output['boxes']"].top1_agreement is None and by_name["output['boxes']"].kl_divergence is None
    assert by_name["output['logits']"].top1_agreement == 1.0
    assert by_name["output['logits']"].kl_divergence >= 0.0

    logits = torch.randn(4, 6)
    assert is_class_scores(Leaf("output", None, False, logits), samples=4)
    assert is_class_scores(Leaf("output[0]['logits']", "logits", False, logits), samples=4)
    assert not is_class_scores(Leaf("output", None, False, logits[:, :1]), samples=4), "K = 1"
    assert not is_class_scores(Leaf("output", None, False, logits), samples=3), "rows are not samples"
    assert not is_class_scores(Leaf("output['pred_coords']", "pred_coords", False, logits), samples=4)
    assert not is_class_scores(Leaf("output['scores']", "scores", True, logits), samples=4), "in a detection record"
    assert not is_class_scores(Leaf("output", None, False, logits.long()), samples=4), "integers"


def test_kl_is_never_negative():
    # One ulp up in one logit: p·(log p − log q) summed in double comes out below zero.
    a = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[:, 3] = torch.nextafter(a[:, 3], a[:, 3] + 1)
    log_p, log_q = a.double().log_softmax(1), b.double().log_softmax(1)
    assert float((log_p.exp() * (log_p - log_q)).sum()) < 0, "the unclamped sum is negative here"
    assert bool((kl_per_sample(a, b) >= 0).all())

    class Fixed(nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("logits", logits)

        def forward(self, x):
            return self.logits + 0 * x.sum()

    drift = normswap.validate(Fixed(a), Fixed(b), torch.zeros(4, 3), measure=False)
    rows = (log_p.exp() * (log_p - log_q)).sum(1)
    assert drift.headline.kl_divergence == pytest.approx(float(rows.clamp_min(0).mean()), rel=1e-9, abs=1e-30)
    assert drift.headline.kl_divergence >= 0.0 and drift.headline.top1_agreement == 1.0


def test_greedy_iou_matching():
    square = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert box_iou(square, torch.tensor([[1.0, 0.0, 3.0, 2.0]])).item() == pytest.approx(1 / 3)
    ref_boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [10.0, 10.0, 12.0, 12.0], [20.0, 20.0, 22.0, 22.0]])
    new_boxes = torch.tensor([[10.0, 10.0, 12.0, 12.0], [0.0, 0.0, 2.0, 1.5], [20.0, 20.0, 22.0, 22.0]])
    ref = (ref_boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 2]))
    new = (new_boxes, torch.tensor([0.5, 0.6, 0.7]), torch.tensor([1, 1, 1]))
    # The third pair overlaps exactly but its labels differ: not a match.
    assert match_detections(ref, new) == [(0, 1, pytest.approx(0.75)), (1, 0, 1.0)]
    assert match_detections(ref, (new[0], new[1], None)) == [(0, 1, pytest.approx(0.75)), (1, 0, 1.0),
                                                            (2, 2, 1.0)], "without labels on one side"


@pytest.fixture(scope="module")
def detector():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
    )
    return model.eval(), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_a_torchvision_detector_converts_with_default_validation(detector):
    model, x = detector
    report = normswap.convert(model, "small-batch", example_inputs=x).report
    drift = report.drift
    (detections,) = drift.detections
    assert detections.name == "output[*]" and detections.images == 4
    assert detections.original_detections > 0 and detections.matched_share is not None
    assert all(f.kind in ("count", "empty") for f in drift.findings)
    assert all(o.top1_agreement is None for o in drift.outputs), "boxes, scores and labels are not class scores"
    # Train mode needs targets: the heads ran in eval mode, the backbone's norm layers in train mode.
    for stats in (drift.original, drift.converted):
        assert "targets should not be none" in stats.batch_dependence_note
        assert "except the model itself, rpn, roi_heads" in stats.batch_dependence_note
    assert drift.converted.batch_dependence == 0.0, "GroupNorm: each image's detections ignore the others"
    assert drift.original.batch_dependence is None and "changed shape" in drift.original.batch_dependence_note
    text = _rendered(report)
    assert "detections output[*]" in text and "per-site cumulative drift" in text
    assert Report.from_json(report.to_json()) == report


def test_fold_keeps_every_detection(detector):
    model, x = detector
    drift = normswap.convert(model, "fold", example_inputs=x).report.drift
    (detections,) = drift.detections
    assert detections.matched_share == 1.0 and detections.mean_iou == pytest.approx(1.0)
    assert detections.mean_score_abs_diff < 1e-5


class NumpyMasked(nn.Module):
    """No BatchNorm; train-mode masks drawn from numpy and Python's random, the same for every sample
    (as Wav2Vec2's time masks are drawn from numpy): its samples are independent."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x):
        if self.training:
            x = x * torch.from_numpy(np.random.rand(x.shape[1]) > 0.5).to(x) * random.random()
        return self.linear(x)


def test_batch_dependence_seeds_python_numpy_and_torch_and_restores_them():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    model = NumpyMasked()
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    result = measure_batch_dependence(model, x)
    assert result.value == 0.0 and result.note is None
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all() and torch.equal(torch.get_rng_state(), states[2])


def test_wav2vec2_without_batchnorm_is_batch_independent():
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        mask_time_prob=0.5, mask_time_length=2,
    )
    model = transformers.Wav2Vec2Model(config)
    x = torch.randn(3, 800, generator=torch.Generator().manual_seed(0))
    assert normswap.batch_dependence(model, x) < 1e-6


class RaisesWhileAnyPartTrains(_ConvBN):
    def forward(self, x):
        if self.conv.training:
            raise ValueError("needs targets while training")
        return self.features(x)


def test_a_model_that_cannot_run_in_train_mode_gets_a_reason_not_a_crash():
    result = measure_batch_dependence(RaisesWhileAnyPartTrains(), X)
    assert result.value is None
    assert result.note == ("not measurable: the train-mode forward raised in the model itself: "
                           "ValueError: needs targets while training")
    drift = normswap.validate(RaisesWhileAnyPartTrains().eval(), RaisesWhileAnyPartTrains().eval(), X, measure=False)
    assert drift.train_eval_gap is None and drift.train_eval_note.startswith("not measurable")
    with pytest.raises(normswap.NormswapError, match="needs targets while training"):
        normswap.batch_dependence(RaisesWhileAnyPartTrains(), X)


def test_train_eval_gap_leaves_dropout_out():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(num_classes=10).eval()  # dropout 0.2 before its classifier
    data = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    converted = normswap.convert(model, "small-batch", data[:1], validate=False).model
    assert normswap.validate(model, converted, data, measure=False).train_eval_gap == 0.0
    # The original against itself: its BatchNorm does differ between the modes.
    assert normswap.validate(model, model, data, measure=False).train_eval_gap > 0.1

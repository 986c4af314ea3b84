"""Comparing structured model outputs: tensors, tuples, lists, dicts, detection records.

A model's output is taken apart into named tensor leaves (``output``, ``output[0]['boxes']`` …). Leaves
whose shapes agree between the two models are compared element by element; anything else (a leaf
whose shape or count changed, a leaf only one side has, an empty leaf) becomes an
:class:`~normswap.types.OutputFinding`, never an exception, so a conversion that changes how many
boxes a detector returns is still reported rather than lost.

Classification figures (top-1, top-5, KL) are computed only on class-score leaves, decided by
:func:`is_class_scores`. Detection records (a dict with an N×4 ``boxes`` leaf and N ``scores``) are
also compared as detections: greedy IoU matching per image (:class:`DetectionStream`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .types import DetectionDrift, OutputDrift, OutputFinding

BOX_KEYS = ("boxes", "bboxes", "bbox", "pred_boxes")
SCORE_KEYS = ("scores", "score", "confidence", "conf")
LABEL_KEYS = ("labels", "label", "classes", "class_ids")
# A dict key holding one of these words names coordinates or geometry, never class scores.
GEOMETRY_WORDS = ("box", "coord", "point", "landmark", "anchor", "mask", "offset", "delta", "regress", "xy")
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class Leaf:
    """One tensor of an output, with the dict key that holds it and whether it sits in a detection
    record (a dict with boxes and scores)."""

    name: str
    key: str | None
    in_detection: bool
    tensor: torch.Tensor


def output_leaves(output: Any, name: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a model output (tuple, list, dict, timm features_only lists), named by path."""
    for leaf in leaves(output, name):
        yield leaf.name, leaf.tensor


def leaves(output: Any, name: str = "output", key: str | None = None, in_detection: bool = False) -> Iterator[Leaf]:
    if isinstance(output, torch.Tensor):
        yield Leaf(name, key, in_detection, output)
    elif isinstance(output, dict):
        detection = in_detection or detection_parts(output) is not None
        for k, value in output.items():
            yield from leaves(value, f"{name}[{k!r}]", str(k), detection)
    elif isinstance(output, (list, tuple)):
        for i, value in enumerate(output):
            yield from leaves(value, f"{name}[{i}]", key, in_detection)


def detection_records(output: Any, name: str = "output") -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Every detection record in an output: (its path, the dict)."""
    if isinstance(output, dict):
        if detection_parts(output) is not None:
            yield name, output
            return
        for k, value in output.items():
            yield from detection_records(value, f"{name}[{k!r}]")
    elif isinstance(output, (list, tuple)):
        for i, value in enumerate(output):
            yield from detection_records(value, f"{name}[{i}]")


def detection_parts(record: dict[Any, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(boxes K×4, scores K, labels K or None) when ``record`` is a detection record, else None."""
    boxes = next((record[k] for k in BOX_KEYS if isinstance(record.get(k), torch.Tensor)), None)
    scores = next((record[k] for k in SCORE_KEYS if isinstance(record.get(k), torch.Tensor)), None)
    if boxes is None or scores is None or boxes.ndim != 2 or boxes.shape[1] != 4 or scores.ndim != 1:
        return None
    if not boxes.is_floating_point() or scores.shape[0] != boxes.shape[0]:
        return None
    labels = next((record[k] for k in LABEL_KEYS if isinstance(record.get(k), torch.Tensor)), None)
    if labels is not None and labels.shape != scores.shape:
        labels = None
    return boxes, scores, labels


def is_class_scores(leaf: Leaf, samples: int) -> bool:
    """Whether a leaf holds class scores (logits), where top-1, top-5 and KL mean something.

    All of: a floating-point N×K tensor with K ≥ 2; N equal to the number of input samples (rows are
    samples, not detections, tokens or anchors); its dict key, if any, names no geometry (``boxes``,
    ``coords``, ``keypoints``, ``masks`` …, see ``GEOMETRY_WORDS``); and it is not part of a detection
    record. A bare N×4 tensor of box coordinates with N equal to the batch passes this test: give such
    outputs a name (a dict key) to keep them out of the class metrics."""
    t = leaf.tensor
    if not t.is_floating_point() or t.ndim != 2 or t.shape[1] < 2 or t.shape[0] != samples:
        return False
    if leaf.in_detection:
        return False
    key = (leaf.key or "").lower()
    return not any(word in key for word in GEOMETRY_WORDS)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor as double rows: one per leading index, one row for scalars and vectors."""
    t = t.detach().double()
    return t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)


@dataclass
class Stream:
    """Running sums for relative L2, per-row cosine and max abs error between two tensors."""

    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cos_sum: float = 0.0
    samples: int = 0
    max_abs: float = 0.0
    calls: int = 0
    # Calls whose two tensors differed in shape (a layer in a detection head sees as many rows as there
    # are proposals): nothing to compare element by element, so they add no figure.
    mismatched: int = 0

    def add(self, ref: torch.Tensor, new: torch.Tensor) -> None:
        self.calls += 1
        if ref.shape != new.shape:
            self.mismatched += 1
            return
        if ref.numel() == 0:  # nothing to compare: an empty leaf adds no figure
            return
        a = as_rows(ref)
        b = new.detach().double().reshape(a.shape)
        self.diff_sq += float((a - b).pow(2).sum())
        self.ref_sq += float(a.pow(2).sum())
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
        # Two all-zero samples (a zero-initialised gamma, say) are identical, not orthogonal.
        both_zero = (a.abs().amax(1) == 0) & (b.abs().amax(1) == 0)
        self.cos_sum += float(torch.where(both_zero, torch.ones_like(cos), cos).sum())
        self.samples += a.shape[0]
        self.max_abs = max(self.max_abs, float((a - b).abs().max()))

    @property
    def relative_l2(self) -> float | None:
        """None where undefined: the original is all zeros and the converted is not."""
        if self.ref_sq > 0:
            return (self.diff_sq / self.ref_sq) ** 0.5
        return 0.0 if self.diff_sq == 0 else None

    @property
    def cosine(self) -> float | None:
        return self.cos_sum / self.samples if self.samples else None


def kl_per_sample(ref: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) ‖ softmax(new)) per row, in double. KL is never negative; rounding can make
    the sum of p·(log p − log q) a few ulps below zero for identical rows, so it is clamped at 0."""
    log_p, log_q = ref.detach().double().log_softmax(1), new.detach().double().log_softmax(1)
    return (log_p.exp() * (log_p - log_q)).sum(1).clamp_min(0.0)


@dataclass
class OutputStream(Stream):
    shape: tuple[int, ...] = ()
    top1: float = 0.0
    top5: float = 0.0
    kl: float = 0.0
    class_rows: int = 0

    def add_leaf(self, ref: Leaf, new: torch.Tensor, samples: int) -> None:
        self.add(ref.tensor, new)
        self.shape = tuple(ref.tensor.shape)
        if is_class_scores(ref, samples):
            a, b = ref.tensor.detach().double(), new.detach().double()
            self.top1 += float((a.argmax(1) == b.argmax(1)).sum())
            k = min(5, b.shape[1])
            self.top5 += float((b.topk(k, dim=1).indices == a.argmax(1, keepdim=True)).any(1).sum())
            self.kl += float(kl_per_sample(a, b).sum())
            self.class_rows += a.shape[0]

    def result(self, name: str) -> OutputDrift:
        extra = {}
        if self.class_rows:
            extra = {
                "top1_agreement": self.top1 / self.class_rows,
                "top5_agreement": self.top5 / self.class_rows,
                "kl_divergence": self.kl / self.class_rows,
            }
        return OutputDrift(name, self.shape, self.relative_l2, self.cosine, self.max_abs, **extra)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``a`` (K×4, x1 y1 x2 y2) with every box in ``b`` (M×4): K×M."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp_min(0).prod(2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def match_detections(
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    threshold: float = IOU_THRESHOLD,
) -> list[tuple[int, int, float]]:
    """Greedy matching, the original's detections in falling score order: each takes the unmatched
    converted detection of the same label (where both give labels) with the highest IoU ≥ ``threshold``.
    Returns (original index, converted index, IoU) per match."""
    (boxes_a, scores_a, labels_a), (boxes_b, _, labels_b) = ref, new
    iou = box_iou(boxes_a.detach().double(), boxes_b.detach().double())
    if labels_a is not None and labels_b is not None:
        iou = torch.where(labels_a[:, None] == labels_b[None, :], iou, torch.zeros_like(iou))
    taken = torch.zeros(boxes_b.shape[0], dtype=torch.bool)
    matches = []
    for i in scores_a.detach().double().argsort(descending=True).tolist():
        row = torch.where(taken, torch.full_like(iou[i], -1.0), iou[i])
        j = int(row.argmax())
        if float(row[j]) >= threshold:
            taken[j] = True
            matches.append((i, j, float(row[j])))
    return matches


@dataclass
class DetectionStream:
    """Detection-level comparison of the records at one place of the output, over images and batches."""

    images: int = 0
    images_compared: int = 0
    original: int = 0
    converted: int = 0
    matched: int = 0
    iou_sum: float = 0.0
    score_diff_sum: float = 0.0

    def add(self, ref: dict[Any, Any], new: dict[Any, Any]) -> None:
        a, b = detection_parts(ref), detection_parts(new)
        if a is None or b is None:
            return
        self.images += 1
        self.original += int(a[0].shape[0])
        self.converted += int(b[0].shape[0])
        if not a[0].shape[0] or not b[0].shape[0]:
            return
        self.images_compared += 1
        for i, j, iou in match_detections(a, b):
            self.matched += 1
            self.iou_sum += iou
            self.score_diff_sum += abs(float(a[1][i]) - float(b[1][j]))

    def result(self, name: str) -> DetectionDrift:
        return DetectionDrift(
            name=name,
            images=self.images,
            images_compared=self.images_compared,
            original_detections=self.original,
            converted_detections=self.converted,
            matched=self.matched,
            matched_share=self.matched / self.original if self.original else None,
            mean_iou=self.iou_sum / self.matched if self.matched else None,
            mean_score_abs_diff=self.score_diff_sum / self.matched if self.matched else None,
            iou_threshold=IOU_THRESHOLD,
        )


def _group(name: str) -> str:
    """Detection records of every image at one place: list indices become ``[*]``."""
    return re.sub(r"\[\d+\]", "[*]", name)


@dataclass
class _Seen:
    kind: str
    original_shape: tuple[int, ...] | None
    converted_shape: tuple[int, ...] | None
    batches: int = 0


def _finding(name: str, seen: _Seen, total: int) -> OutputFinding:
    when = "in every batch" if seen.batches == total else f"in {seen.batches} of {total} batches"
    a, b = seen.original_shape, seen.converted_shape
    messages = {
        "count": f"count changed from {a} to {b} {when}; not compared element by element",
        "shape": f"shape changed from {a} to {b} {when}; not compared",
        "missing": f"only the original has this output leaf ({a}) {when}",
        "added": f"only the converted model has this output leaf ({b}) {when}",
        "empty": f"empty on both sides ({a}) {when}: nothing to compare",
    }
    return OutputFinding(name, seen.kind, a, b, seen.batches, messages[seen.kind])


@dataclass
class OutputComparison:
    """Original vs converted outputs over batches: streams per comparable leaf, findings for the rest,
    detection matching for detection records."""

    streams: dict[str, OutputStream] = field(default_factory=dict)
    detections: dict[str, DetectionStream] = field(default_factory=dict)
    seen: dict[tuple[str, str], _Seen] = field(default_factory=dict)
    batches: int = 0

    def add(self, ref: Any, new: Any, samples: int) -> None:
        self.batches += 1
        ref_leaves = {leaf.name: leaf for leaf in leaves(ref)}
        new_leaves = {leaf.name: leaf.tensor for leaf in leaves(new)}
        for name, leaf in ref_leaves.items():
            other = new_leaves.get(name)
            if other is None:
                self._note(name, "missing", tuple(leaf.tensor.shape), None)
            elif leaf.tensor.shape != other.shape:
                same_rows = leaf.tensor.ndim == other.ndim >= 1 and leaf.tensor.shape[1:] == other.shape[1:]
                self._note(name, "count" if same_rows else "shape", tuple(leaf.tensor.shape), tuple(other.shape))
            elif leaf.tensor.numel() == 0:
                self._note(name, "empty", tuple(leaf.tensor.shape), tuple(other.shape))
            else:
                self.streams.setdefault(name, OutputStream()).add_leaf(leaf, other, samples)
        for name, tensor in new_leaves.items():
            if name not in ref_leaves:
                self._note(name, "added", None, tuple(tensor.shape))
        new_records = dict(detection_records(new))
        for name, record in detection_records(ref):
            if name in new_records:
                self.detections.setdefault(_group(name), DetectionStream()).add(record, new_records[name])

    def _note(self, name: str, kind: str, a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> None:
        self.seen.setdefault((name, kind), _Seen(kind, a, b)).batches += 1

    def outputs(self) -> tuple[OutputDrift, ...]:
        return tuple(stream.result(name) for name, stream in self.streams.items() if stream.samples)

    def findings(self) -> tuple[OutputFinding, ...]:
        return tuple(_finding(name, seen, self.batches) for (name, _), seen in self.seen.items())

    def detection_results(self) -> tuple[DetectionDrift, ...]:
        return tuple(stream.result(name) for name, stream in self.detections.items() if stream.images)


def agreeing_leaves(a: Any, b: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """(pairs of leaves with the same name and shape, descriptions of those that differ)."""
    left = dict(output_leaves(a))
    right = dict(output_leaves(b))
    pairs, differ = [], []
    for name in [*left, *(n for n in right if n not in left)]:
        x, y = left.get(name), right.get(name)
        if x is not None and y is not None and x.shape == y.shape:
            pairs.append((x, y))
        else:
            shown = [tuple(t.shape) if t is not None else "absent" for t in (x, y)]
            differ.append(f"{name} {shown[0]} vs {shown[1]}")
    return pairs, differ

"""The few norm layers torch and timm lack in the form normswap needs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension (dim 1) at every position of an ``N×C×…`` input.

    For sequences ``N×C×L`` this normalizes each step on its own (nothing shared across time or
    batch); for images it is ConvNeXt's per-pixel LayerNorm. Parameters are named like
    ``nn.LayerNorm``'s, so state_dict keys stay ``weight``/``bias``.
    """

    def __init__(
        self, num_channels: int, eps: float = 1e-5, affine: bool = True, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # movedim keeps a channels-last input channels-last: the moved view is already contiguous.
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine, for inputs of any rank ``N×C×…``.

    Numerically the eval-mode BatchNorm it replaces, in train mode too, so small-batch fine-tuning
    never touches the statistics (detectron2 / torchvision ``FrozenBatchNorm2d``, which is 4-D only).
    Everything is a buffer, so nothing here is trained.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # BatchNorm checkpoints carry num_batches_tracked; it means nothing once frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The eval-mode kernel itself (training=False never touches the buffers), so a frozen layer
        # is bit-identical to the BatchNorm it replaces, not merely close.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class GroupRMSNorm(nn.Module):
    """Root-mean-square norm over groups of channels (and all positions) of each sample, without centring.

    ``y = x / sqrt(mean_g(x²) + eps) · weight_c + bias_c``. With one group it is RMSNorm over C×H×W: the
    per-sample scale is normalized as LayerNorm over C×H×W does, but nothing is subtracted. That is what a
    converted pretrained network can keep: LayerNorm's centring removes a per-sample mean that the layers
    after it relied on, and on EfficientNet-Lite1 no refit we tried put it back (BENCHMARKS.md). torch's
    ``RMSNorm`` and timm's ``RmsNorm2d`` normalize other dimensions (the trailing ones, or C per position)
    and have no bias, so neither is this layer.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **kw))
            self.bias = nn.Parameter(torch.zeros(num_channels, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = group_rms_norm(x, self.num_groups, self.eps)
        if self.weight is None:
            return y
        view = (1, -1) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.bias.view(view), y, self.weight.view(view))

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class GroupRMSNormAct(GroupRMSNorm):
    """:class:`GroupRMSNorm` followed by drop and activation, like timm's ``GroupNormAct``, so a timm
    norm+act site keeps its activation (and its ``act`` attribute) after conversion."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, **kw: Any) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kw)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def group_rms_norm(x: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """``x`` (N×C×…) divided by the root mean square of each sample's channel group, no affine."""
    if num_groups == 1 and x.ndim > 2 and not x.is_contiguous():
        moved = x.movedim(1, -1)
        if moved.is_contiguous():
            # One group is all of the sample, so any order of its elements will do: normalizing the
            # channels-last view keeps a channels-last model channels-last, with no copy.
            flat = moved.reshape(x.shape[0], -1)
            return F.rms_norm(flat, (flat.shape[-1],), eps=eps).view(moved.shape).movedim(-1, 1)
    grouped = x.reshape(x.shape[0], num_groups, -1)
    # torch's fused kernel over the trailing dimension (it accumulates in float32 for half inputs).
    return F.rms_norm(grouped, (grouped.shape[-1],), eps=eps).view(x.shape)

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

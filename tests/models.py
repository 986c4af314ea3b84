"""Hand-built models for the edge cases real models rarely show one at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalBN(nn.Module):
    """BatchNorm written as a functional call in forward code, not as a module."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.register_buffer("running_mean", 0.2 * torch.randn(c))
        self.register_buffer("running_var", 0.5 + torch.rand(c))
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(
            self.conv(x), self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5
        )
        return self.head(F.relu(y).mean((2, 3)))


class SharedBN(nn.Module):
    """One BatchNorm module called twice, and reachable under two names."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.alias = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.b(self.bn(self.a(x))))


class SequenceBN(nn.Module):
    """BatchNorm1d over N×C×L, the usual 1-D conv sequence model."""

    def __init__(self, c: int = 12) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.out = nn.Conv1d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.conv(x))))


class Variants(nn.Module):
    """affine=False, track_running_stats=False, SyncBatchNorm, BatchNorm3d and a Linear→BN1d pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.no_affine = nn.BatchNorm2d(8, affine=False)
        self.no_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.sync = nn.SyncBatchNorm(8)
        self.conv3d = nn.Conv3d(1, 4, 3, padding=1)
        self.bn3d = nn.BatchNorm3d(4)
        self.fc = nn.Linear(8 + 4, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sync(self.no_stats(self.no_affine(self.conv(x))))
        v = self.bn3d(self.conv3d(x[:, :1].unsqueeze(1)))
        feats = torch.cat([y.mean((2, 3)), v.mean((2, 3, 4))], 1)
        return self.bn1d(self.fc(feats))


class Untraceable(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y
        return -y


class SharedConv(nn.Module):
    """A conv whose output feeds a BatchNorm and something else: folding would change the other use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class ThirtyChannels(nn.Module):
    """30 channels: 32 groups cannot divide them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 30, 3, padding=1)
        self.bn = nn.BatchNorm2d(30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def trained_stats(model: nn.Module, *inputs: torch.Tensor, steps: int = 3) -> nn.Module:
    """Run a few train-mode batches so running statistics describe the inputs, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*inputs)
    return model.eval()

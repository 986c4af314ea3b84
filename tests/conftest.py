"""Shared fixtures: small real timm models with BatchNorm statistics that mean something."""

from __future__ import annotations

import hashlib

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Real timm architectures covering the structural cases: plain BN2d (resnet), BatchNormAct2d
# (efficientnet, mobilenetv3, regnet), BN1d on tokens plus an attention-bias cache (levit).
TIMM_CASES = {
    "resnet18": (3, 64, 64),
    "efficientnet_b0": (3, 64, 64),
    "mobilenetv3_small_050": (3, 64, 64),
    "regnetx_002": (3, 64, 64),
    "levit_128s": (3, 224, 224),
}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine and running statistics, as training would, so that
    transfer and folding are tested on numbers that differ from the defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def model_fingerprint(model: nn.Module) -> tuple[str, tuple[bool, ...], tuple[str, ...]]:
    """Hash of every parameter and buffer, the mode of every module, and every module's class."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), tuple(m.training for m in model.modules()), tuple(type(m).__name__ for m in model.modules())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


@pytest.fixture(scope="session")
def timm_model_factory():
    cache: dict[str, dict] = {}

    def make(name: str) -> tuple[nn.Module, torch.Tensor]:
        if name not in cache:
            torch.manual_seed(0)
            model = randomize_batchnorm(timm.create_model(name, pretrained=False)).eval()
            cache[name] = model.state_dict()
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(cache[name])
        x = torch.randn((2, *TIMM_CASES[name]), generator=torch.Generator().manual_seed(1))
        return model.eval(), x

    return make

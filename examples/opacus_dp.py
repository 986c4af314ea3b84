"""Opacus: DP-SGD on a timm model converted with the ``dp`` recipe, nothing changed by hand.

    python examples/opacus_dp.py
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

import normswap


def main(name: str = "resnet18", samples: int = 32, size: int = 32, steps: int = 2) -> float:
    torch.manual_seed(0)
    model = normswap.convert(timm.create_model(name, num_classes=4), "dp", torch.randn(2, 3, size, size),
                             validate=False).model.train()
    data = DataLoader(TensorDataset(torch.randn(samples, 3, size, size), torch.randint(0, 4, (samples,))),
                      batch_size=8)
    engine = PrivacyEngine()
    model, optimizer, data = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                                 data_loader=data, noise_multiplier=1.0, max_grad_norm=1.0)
    for _, (images, labels) in zip(range(steps), data, strict=False):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    epsilon = engine.get_epsilon(delta=1e-5)
    print(f"{name}: {steps} DP-SGD steps, ε = {epsilon:.2f} at δ = 1e-5")
    return epsilon


if __name__ == "__main__":
    main()

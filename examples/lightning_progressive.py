"""Lightning: fine-tune a timm ResNet while its BatchNorm turns into GroupNorm step by step.

The transition starts as the original network (α = 0) and reaches plain GroupNorm (α = 1) over
``steps`` optimizer steps; the callback counts optimizer steps (so gradient accumulation does not
speed it up), saves its progress in Lightning checkpoints and finalizes at the end.

    python examples/lightning_progressive.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import normswap
from normswap.integrations.lightning import TransitionCallback


class Classifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def main(samples: int = 64, size: int = 64, batch_size: int = 8, accumulate: int = 2, epochs: int = 2,
         steps: int = 6) -> normswap.Transition:
    torch.manual_seed(0)
    original = timm.create_model("resnet18", num_classes=10).eval()
    transition = normswap.progressive(original, "small-batch", steps=steps,
                                      example_inputs=torch.randn(2, 3, size, size))
    data = TensorDataset(torch.randn(samples, 3, size, size), torch.randint(0, 10, (samples,)))
    trainer = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[TransitionCallback(transition)])
    trainer.fit(Classifier(transition.model.train()), DataLoader(data, batch_size=batch_size))
    print(f"{trainer.global_step} optimizer steps; transition {transition.taken}/{transition.steps} steps, "
          f"finalized: {transition.finalized}")
    return transition


if __name__ == "__main__":
    main()

"""Hugging Face: a ``transformers.Trainer`` fine-tunes an image classifier while its BatchNorm turns
into GroupNorm; then recovery distils the result against the original on the same dict batches.

The model here is a tiny randomly initialised ``ResNetForImageClassification`` so that the script
runs offline; a pretrained one (``from_pretrained``) goes the same way.

    python examples/huggingface_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

import normswap
from normswap.integrations.huggingface import TransitionCallback


class Pictures(torch.utils.data.Dataset):
    """What an image pipeline yields: dicts of keyword inputs and labels."""

    def __init__(self, samples: int, size: int) -> None:
        self.pixels = torch.randn(samples, 3, size, size)
        self.labels = torch.randint(0, 3, (samples,))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def main(samples: int = 32, size: int = 32, max_steps: int = 8, transition_steps: int = 4) -> normswap.Transition:
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    original = ResNetForImageClassification(config).eval()
    transition = normswap.progressive(original, "small-batch", steps=transition_steps,
                                      example_inputs=torch.randn(2, 3, size, size))
    data = Pictures(samples, size)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True, report_to=[],
                                 disable_tqdm=True, save_strategy="no", logging_strategy="no")
        Trainer(model=transition.model, args=args, train_dataset=data,
                callbacks=[TransitionCallback(transition)]).train()
    # The same dict batches serve recovery (and calibrate / validate): the model gets model(**batch),
    # and of its ModelOutput the logits are compared.
    batches = torch.utils.data.DataLoader(data, batch_size=8)
    result = normswap.recover(original, transition.model, batches, steps=2, batch_size=8, progress=False)
    drift = normswap.validate(original, transition.model, batches, measure=False)
    print(f"transition finalized: {transition.finalized}; recovery loss {result.first_loss:.4g} → "
          f"{result.final_loss:.4g}; top-1 agreement {drift.headline.top1_agreement:.2f}")
    return transition


if __name__ == "__main__":
    main()

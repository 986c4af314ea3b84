"""normswap inside the trainers people use, as they come: Lightning, Hugging Face, Opacus; and the
plain-loop transition's state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normswap
from normswap.progressive import ProgressiveNorm


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # running statistics that are not the defaults, as after training
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def labelled(samples: int = 16, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(samples, 3, 8, 8, generator=generator), torch.randint(0, 4, (samples,), generator=generator))


def blend_alphas(model: nn.Module) -> list[float]:
    return [float(m.alpha) for m in model.modules() if isinstance(m, ProgressiveNorm)]


def test_a_plain_loop_transition_resumes_from_its_state_dict():
    first = normswap.progressive(tiny_cnn(), "small-batch", steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    first.step(4)
    saved = first.state_dict()
    again = normswap.progressive(tiny_cnn(), "small-batch", steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    again.load_state_dict(saved)
    assert again.taken == 4 and blend_alphas(again.model) == [pytest.approx(0.4)]
    assert again.step() == pytest.approx(0.5)
    other = normswap.progressive(tiny_cnn(), "small-batch", steps=20, example_inputs=torch.randn(2, 3, 8, 8))
    with pytest.raises(normswap.PlanError, match="steps=10"):
        other.load_state_dict(saved)
    first.finalize()
    done = normswap.progressive(tiny_cnn(), "small-batch", steps=10, example_inputs=torch.randn(2, 3, 8, 8))
    done.load_state_dict(first.state_dict())
    assert done.finalized and not blend_alphas(done.model)


# ------------------------------------------------------------------ Lightning

def _lightning_run(tmp_path, epochs: int, resume: str | None = None, save: str | None = None):
    pl = pytest.importorskip("lightning.pytorch")
    from normswap.integrations.lightning import TransitionCallback

    class Module(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model, self.seen = model, []

        def training_step(self, batch, _index):
            self.seen.append(blend_alphas(self.model)[0])
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    transition = normswap.progressive(tiny_cnn(), "small-batch", steps=12, example_inputs=torch.randn(2, 3, 8, 8))
    module = Module(transition.model)
    trainer = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[TransitionCallback(transition, finalize_at_end=False)])
    torch.manual_seed(0)
    trainer.fit(module, DataLoader(labelled(), batch_size=2), ckpt_path=resume)
    if save:
        trainer.save_checkpoint(save)
    return transition, module


def test_lightning_trainer_steps_the_transition_per_optimizer_step_and_resumes_it(tmp_path):
    # 8 batches an epoch, 2 accumulated: 4 optimizer steps an epoch; the transition takes 12
    whole, whole_module = _lightning_run(tmp_path, epochs=2)
    assert whole.taken == 8 and blend_alphas(whole.model) == [pytest.approx(8 / 12)]
    assert whole_module.seen == [pytest.approx(i // 2 / 12) for i in range(16)]  # α moves every second batch
    checkpoint = str(tmp_path / "mid.ckpt")
    half, _ = _lightning_run(tmp_path, epochs=1, save=checkpoint)
    assert half.taken == 4
    resumed, resumed_module = _lightning_run(tmp_path, epochs=2, resume=checkpoint)
    assert resumed.taken == whole.taken and blend_alphas(resumed.model) == blend_alphas(whole.model)
    assert resumed_module.seen == whole_module.seen[8:]  # from the first resumed batch on
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    assert [v["transition"]["taken"] for v in saved.values()] == [4]


def test_lightning_finalizes_at_the_end_into_a_plain_conversion(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from normswap.integrations.lightning import TransitionCallback

    class Module(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, _index):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    transition = normswap.progressive(tiny_cnn(), "small-batch", steps=2, example_inputs=torch.randn(2, 3, 8, 8))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[TransitionCallback(transition)])
    trainer.fit(Module(transition.model), DataLoader(labelled(), batch_size=2))
    assert transition.finalized and not blend_alphas(transition.model)
    plain = normswap.convert(tiny_cnn(), "small-batch", torch.randn(2, 3, 8, 8), validate=False).model
    plain.load_state_dict(transition.model.state_dict())  # strict: the same modules as a plain conversion
    with pytest.raises(normswap.PlanError, match="integrations.lightning"):
        pl.Trainer(callbacks=[normswap.TransitionCallback(transition)], accelerator="cpu", logger=False,
                   enable_progress_bar=False, max_steps=1).fit(Module(transition.model),
                                                               DataLoader(labelled(), batch_size=2))


# ------------------------------------------------------------------ Hugging Face

def tiny_hf_resnet():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3)
    return transformers.ResNetForImageClassification(config).eval()


class _Pictures(torch.utils.data.Dataset):
    """What a Hugging Face image pipeline yields: dicts of keyword inputs and labels."""

    def __init__(self, samples: int = 16) -> None:
        generator = torch.Generator().manual_seed(2)
        self.x = torch.randn(samples, 3, 16, 16, generator=generator)
        self.y = torch.randint(0, 3, (samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _hf_run(tmp_path, max_steps: int, resume: str | None = None):
    transformers = pytest.importorskip("transformers")
    from normswap.integrations.huggingface import TransitionCallback

    seen: list[float] = []

    class Record(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(blend_alphas(transition.model)[0])

    transition = normswap.progressive(tiny_hf_resnet(), "small-batch", steps=12,
                                      example_inputs=torch.randn(2, 3, 16, 16))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-3, save_strategy="steps", save_steps=4, use_cpu=True,
        report_to=[], disable_tqdm=True, logging_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=transition.model, args=args, train_dataset=_Pictures(),
                                   callbacks=[TransitionCallback(transition, finalize_at_end=False), Record()])
    trainer.train(resume_from_checkpoint=resume)
    return transition, seen


def test_hugging_face_trainer_steps_the_transition_per_optimizer_step_and_resumes_it(tmp_path):
    whole, whole_seen = _hf_run(tmp_path / "whole", max_steps=8)
    assert whole.taken == 8 and whole_seen == [pytest.approx(i / 12) for i in range(8)]
    _hf_run(tmp_path / "half", max_steps=4)
    resumed, resumed_seen = _hf_run(tmp_path / "half", max_steps=8,
                                    resume=str(tmp_path / "half" / "run" / "checkpoint-4"))
    assert resumed.taken == 8 and resumed_seen == whole_seen[4:]
    assert blend_alphas(resumed.model) == blend_alphas(whole.model)


def test_calibrate_recover_and_validate_take_keyword_batches_of_a_hugging_face_model():
    original = tiny_hf_resnet()
    x, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    converted = normswap.convert(original, "small-batch", x[:2], validate=False).model
    batches = [{"pixel_values": x[:4], "labels": labels[:4]}, {"pixel_values": x[4:], "labels": labels[4:]}]
    before = normswap.validate(original, converted, batches, measure=False)
    assert before.num_samples == 8 and before.headline.kl_divergence > 0  # logits compared, not the loss
    calibrated = normswap.calibrate(original, converted, batches)
    assert calibrated.samples == 8 and calibrated.output_error[-1] < calibrated.output_error[0]
    result = normswap.recover(original, converted, DataLoader(_Pictures(8), batch_size=4), steps=3, batch_size=4,
                              progress=False)
    assert result.steps == 3 and result.final_loss < result.first_loss

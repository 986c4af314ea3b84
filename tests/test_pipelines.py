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
    return TensorDataset(torch.randn(samples, 3, 8, 8, generator=generator),
                         torch.randint(0, 4, (samples,), generator=generator))


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


# ------------------------------------------------------------------ Opacus

@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_opacus_trains_a_timm_model_converted_with_dp_as_it_comes(name):
    pytest.importorskip("opacus")
    import timm
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    conversion = normswap.convert(timm.create_model(name, num_classes=4), "dp", torch.randn(2, 3, 32, 32),
                                  validate=False)
    model = conversion.model.train()
    assert ModuleValidator.validate(model, strict=False) == []
    assert not [p for p, m in model.named_modules() if getattr(m, "inplace", False)]
    rewritten = [w for w in conversion.report.warnings if "rewritten" in w]
    if name == "resnet18":  # timm ResNet's `x += shortcut` after each block's last norm
        assert rewritten and rewritten[0].count("`x += shortcut` on the output of bn2") == 8
        assert type(model).__name__ == "ResNet" and not isinstance(model, torch.fx.GraphModule), \
            "only the blocks that hold the op are rewritten: the model keeps its class and methods"
        assert model.forward_features(torch.randn(1, 3, 32, 32)).ndim == 4
        assert isinstance(model.layer1[0], torch.fx.GraphModule) and type(model.layer1[0]).__name__ == "BasicBlock"
    else:
        assert not rewritten and not isinstance(model, torch.fx.GraphModule)
    generator = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=generator),
                                    torch.randint(0, 4, (8,), generator=generator)), batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=1.0, max_grad_norm=1.0)
    for step, (x, y) in zip(range(2), loader, strict=False):
        optimizer.zero_grad()
        F.cross_entropy(private(x), y).backward()
        assert all(p.grad_sample is not None for p in model.parameters() if p.requires_grad and len(y)), step
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace this
            y = self.norm(self.conv(x))
            y += 1
            return y
        return x


class _InPlaceMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        y.mul_(2)
        return self.head(y.mean((2, 3)))


def test_dp_rewrites_an_in_place_method_and_names_the_line_where_the_model_does_not_trace():
    model = _InPlaceMethod().eval()
    conversion = normswap.convert(model, "dp", torch.randn(2, 3, 8, 8), validate=False)
    assert any("mul_ on the output of norm → mul" in w for w in conversion.report.warnings)
    x = torch.randn(2, 3, 8, 8)
    import dataclasses

    eager = normswap.apply_plan(model, dataclasses.replace(conversion.plan, ensure=()))  # not rewritten
    assert not isinstance(eager, torch.fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(conversion.model(x), eager(x)), "the rewrite computes what the forward did"
    hooked = conversion.model.train()
    for module in hooked.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.register_full_backward_hook(lambda *_: None)
    hooked(x).sum().backward()  # what failed before the rewrite
    named = r"test_pipelines.py:\d+ `y \+= 1`, in the model's own forward \(.*_Untraceable\)"
    with pytest.raises(normswap.PlanError, match=named):
        normswap.convert(_Untraceable().eval(), "dp", torch.randn(2, 3, 8, 8), validate=False)


# ------------------------------------------------------------------ reproducible recovery

def _dropout_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def _noisy(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An augmentation that draws from Python's, numpy's and torch's global generators."""
    import random

    import numpy as np

    scale = random.uniform(0.9, 1.1) * float(np.random.uniform(0.9, 1.1))
    return batch * scale + 0.1 * torch.randn_like(batch)


def test_recovery_resumed_from_its_checkpoint_equals_an_uninterrupted_run_with_dropout(tmp_path):
    original, x = _dropout_cnn(), torch.randn(32, 3, 8, 8)

    def run(directory, callback=None):
        converted = normswap.convert(original, "small-batch", x[:2], validate=False).model
        normswap.recover(original, converted, x, steps=8, batch_size=8, lr=1e-2, progress=False, augment=_noisy,
                         checkpoint_dir=directory, checkpoint_every=2, callback=callback)
        return converted.state_dict()

    def seed(value: int) -> None:
        import random

        import numpy as np

        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)

    seed(5)
    whole = run(tmp_path / "whole")

    def stop(step, _loss):
        if step == 4:
            raise KeyboardInterrupt

    seed(5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop)
    seed(99)  # whatever ran in between moved every generator
    resumed = run(tmp_path / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "bit for bit"
    saved = torch.load(tmp_path / "cut" / "recover-checkpoint.pt", weights_only=True)
    assert saved["step"] == 8 and set(saved["random_states"][0]) >= {"python", "numpy", "torch", "sampler"}


# ------------------------------------------------------------------ the data rule

class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = tiny_cnn(1), tiny_cnn(2)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.a(left) + self.b(right)


def test_every_accepted_data_form_gives_the_same_samples_to_calibrate_recover_and_validate(tmp_path):
    model = tiny_cnn()
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    torch.save(x, tmp_path / "x.pt")
    forms = {
        "tensor": x,
        "list of tensors": [x[:4], x[4:8], x[8:]],
        "tuple (input, target)": (x, y),
        "list of (input, target)": [(x[:6], y[:6]), (x[6:], y[6:])],
        "list of [input, target]": [[x[:6], y[:6]], [x[6:], y[6:]]],
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=5),
        "generator": (b for b in (x[:7], x[7:])),
        "dict": {"input": x},
        "list of dicts": [{"input": x[:6]}, {"input": x[6:]}],
        "(dict, target)": ({"input": x}, y),
        "tensor file": tmp_path / "x.pt",
    }
    def given(name):  # a generator is read once: a new one each time
        return (b for b in (x[:7], x[7:])) if name == "generator" else forms[name]

    def fresh():
        return normswap.convert(model, "small-batch", x[:2], validate=False).model

    converted = fresh()
    calibrated = normswap.calibrate(model, converted, x)
    for name in forms:
        inputs = normswap.load_inputs(model, given(name), batch_size=4)
        assert torch.equal(inputs.joined()[0], x) and len(inputs.batches) == 3, name
        assert normswap.calibrate(model, fresh(), given(name)).output_error == calibrated.output_error, name
    for name in ("list of tensors", "tuple (input, target)", "list of dicts", "DataLoader"):
        assert normswap.validate(model, converted, forms[name], measure=False).num_samples == 12, name
        assert normswap.recover(model, fresh(), forms[name], steps=1, batch_size=4, progress=False).steps == 1


def test_a_tuple_is_one_call_of_as_many_inputs_as_the_forward_takes():
    model = _TwoInputs().eval()
    a, b, y = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8), torch.arange(6)
    inputs = normswap.load_inputs(model, (a, b, y), batch_size=4)  # two inputs, then the target
    assert len(inputs.first) == 2 and torch.equal(inputs.joined()[1], b)
    batches = normswap.load_inputs(model, [(a[:3], b[:3], y[:3]), (a[3:], b[3:], y[3:])], batch_size=6)
    assert torch.equal(batches.joined()[0], a) and len(batches.batches) == 1
    with pytest.raises(normswap.DataError, match="_TwoInputs's positional inputs \\(2 required"):
        normswap.load_inputs(model, (a,))


def test_ambiguous_or_wrong_data_fails_with_what_to_do_instead():
    model, x = tiny_cnn(), torch.randn(8, 3, 8, 8)
    failures = {
        "several batches given as a tuple": ((x[:4], x[4:]), "For several batches give a list"),
        "one (input, target) batch given as a list": ([x, torch.arange(8)], "not floating point"),
        "a keyword the forward does not take": ({"image": x}, "takes no 'image'"),
        "a target of another length": ([(x[:4], torch.arange(3))], None),
        "batches of different shapes": ([x, x[:, :, :4]], "different shapes"),
        "nothing": ([], "empty"),
        "a number": (3, "got int"),
    }
    for data, message in failures.values():  # the keys say what each case is
        if message is None:  # an (input, target) batch whose target length differs: the target is not read
            assert normswap.load_inputs(model, data).num_samples == 4
            continue
        with pytest.raises(normswap.DataError, match=message):
            normswap.load_inputs(model, data)
        with pytest.raises(normswap.DataError, match=message):
            normswap.calibrate(model, model, data)


def test_dp_names_the_in_place_line_of_a_hugging_face_model_that_does_not_trace():
    model = tiny_hf_resnet()
    with pytest.raises(normswap.PlanError, match=r"modeling_resnet.py:\d+ `hidden_state \+= residual`, in the "
                                                 r"forward of resnet.encoder.stages.0.layers.0 "):
        normswap.convert(model, "dp", torch.randn(2, 3, 16, 16), validate=False)

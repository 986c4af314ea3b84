"""Every layer normswap produces goes through every deployment path: both ONNX exporters (checked in
onnxruntime), torch.export (strict), TorchScript (script and trace) and torch.compile; so does a model
in the middle of a progressive transition, and the ``normswap export`` command."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import FrozenBatchNormAct2d, GroupNorm1Act, GroupNormAct, LayerNormAct2d
from torch import nn

import normswap
from normswap.cli import main
from normswap.errors import ExportError, OutputExistsError
from normswap.export import export_onnx
from normswap.layers import (
    AnnealedGroupNorm,
    AnnealedGroupNormAct,
    ChannelLayerNorm,
    FrozenBatchNorm,
    FrozenBatchNormAct,
    GroupRMSNorm,
    GroupRMSNormAct,
)

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning", "ignore::FutureWarning")

TOLERANCE = 1e-4


def _with_act(module: nn.Module) -> nn.Module:
    module.act = nn.SiLU()
    return module


# Every module a normswap target builds (normswap.targets), timm's norm+act replacements included, each
# with its activation where it has one.
LAYERS: dict[str, Callable[[], nn.Module]] = {
    "GroupRMSNorm": lambda: GroupRMSNorm(1, 8),
    "GroupRMSNorm-4-groups": lambda: GroupRMSNorm(4, 8),
    "GroupRMSNorm-no-affine": lambda: GroupRMSNorm(1, 8, affine=False),
    "GroupRMSNormAct": lambda: _with_act(GroupRMSNormAct(1, 8)),
    "ChannelLayerNorm": lambda: ChannelLayerNorm(8),
    "FrozenBatchNorm": lambda: FrozenBatchNorm(8),
    "FrozenBatchNormAct": lambda: _with_act(FrozenBatchNormAct(8)),
    "timm-GroupNormAct": lambda: GroupNormAct(8, 4, act_layer=nn.SiLU),
    "timm-LayerNormAct2d": lambda: LayerNormAct2d(8, act_layer=nn.SiLU),
    "timm-FrozenBatchNormAct2d": lambda: FrozenBatchNormAct2d(8, act_layer=nn.SiLU),
    "timm-GroupNorm1Act": lambda: GroupNorm1Act(8, act_layer=nn.SiLU),
    "ProgressiveNorm-mid-transition": lambda: _blend(0.3),
    # As converted (the frozen original), part-way and at the end of its anneal (anneal_steps 0: at the first
    # train-mode forward, so train-mode checks see the same layer on every call).
    "AnnealedGroupNorm-as-converted": lambda: AnnealedGroupNorm(4, 8, anneal_steps=0),
    "AnnealedGroupNorm-part-way": lambda: _annealed(AnnealedGroupNorm(4, 8, anneal_steps=10), 3),
    "AnnealedGroupNormAct-annealed-rms": lambda: _annealed(_with_act(AnnealedGroupNormAct(1, 8, centre=False,
                                                                                          anneal_steps=0)), 1),
}


def _annealed(layer: nn.Module, steps: int) -> nn.Module:
    layer.train()
    with torch.no_grad():
        for _ in range(steps):
            layer(torch.randn(2, 8, 3, 3))
    return layer.eval()


def _blend(alpha: float) -> nn.Module:
    blend = normswap.ProgressiveNorm(FrozenBatchNorm(8), GroupRMSNorm(1, 8), nn.Identity(), nn.SiLU())
    blend.alpha.fill_(alpha)
    return blend


def _layer(name: str) -> nn.Module:
    """The layer with affine and statistics far from their defaults, so a dropped term shows."""
    module = LAYERS[name]()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() and t.ndim == 1:
                positive = key.endswith(("weight", "var"))
                t.copy_(0.5 + torch.rand(t.shape, generator=g) if positive else torch.randn(t.shape, generator=g))
    return module.eval()


def _input(channels_last: bool = False) -> torch.Tensor:
    x = 2 + 3 * torch.randn(3, 8, 5, 6, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel <= TOLERANCE, rel


@pytest.mark.parametrize("name", LAYERS)
def test_legacy_onnx_export_runs_in_onnxruntime_and_matches(name, tmp_path):
    pytest.importorskip("onnxruntime")
    layer = _layer(name)
    result = export_onnx(layer, _input(), tmp_path / "m.onnx", exporter="legacy")
    assert result.checked and result.opset == 17 and result.path.is_file()
    assert result.max_rel_error is not None and result.max_rel_error <= TOLERANCE
    # The batch axis is dynamic: another batch size runs and matches too.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    other = _input()[:1] * 0.5
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        _assert_close(torch.from_numpy(got), layer(other))


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERS)
def test_dynamo_onnx_export_runs_in_onnxruntime_and_matches(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = export_onnx(_layer(name), _input(), tmp_path / "m.onnx", exporter="dynamo")
    assert result.checked and result.max_rel_error is not None and result.max_rel_error <= TOLERANCE


def test_dynamo_onnx_export_of_every_layer_at_once(tmp_path):
    """One dynamo export (seconds each) of a chain of every layer keeps the default suite fast."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    chain = nn.Sequential(*(_layer(name) for name in LAYERS)).eval()
    result = export_onnx(chain, _input(), tmp_path / "m.onnx", exporter="dynamo")
    assert result.checked and result.opset == 18
    assert result.max_rel_error is not None and result.max_rel_error <= TOLERANCE


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("name", LAYERS)
def test_torch_export_strict_matches_eager(name, channels_last):
    layer, x = _layer(name), _input(channels_last)
    program = torch.export.export(layer, (x,), strict=True)
    with torch.no_grad():
        _assert_close(program.module()(x), layer(x))


@pytest.mark.parametrize("name", LAYERS)
def test_torchscript_script_and_trace_match_eager(name):
    layer, x = _layer(name), _input()
    with torch.no_grad():
        expected = layer(x)
        _assert_close(torch.jit.script(layer)(x), expected)
        _assert_close(torch.jit.trace(layer, x)(x), expected)


@pytest.mark.parametrize("name", LAYERS)
def test_torch_compile_graph_capture_matches_eager(name):
    """Dynamo's graph capture and AOT autograd, forward and backward, without inductor's C++ build (slow
    test below)."""
    torch._dynamo.reset()
    layer, x = _layer(name).train(), _input().requires_grad_()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    # Both calls start from the same buffers (a train-mode forward may move them: AnnealedGroupNorm's schedule).
    saved = {k: v.clone() for k, v in layer.named_buffers()}
    got = compiled(x)
    (grad_got,) = torch.autograd.grad(got.sin().sum(), x)
    after = {k: v.clone() for k, v in layer.named_buffers()}
    with torch.no_grad():
        for key, value in layer.named_buffers():
            value.copy_(saved[key])
    expected = layer(x)
    (grad_expected,) = torch.autograd.grad(expected.sin().sum(), x)
    for key, value in layer.named_buffers():  # the compiled graph moved the buffers as eager does
        torch.testing.assert_close(after[key], value)
    _assert_close(got.detach(), expected.detach())
    _assert_close(grad_got, grad_expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERS)
def test_torch_compile_inductor_matches_eager(name):
    torch._dynamo.reset()
    layer, x = _layer(name), _input(channels_last=True)
    with torch.no_grad():
        _assert_close(torch.compile(layer)(x), layer(x))


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_group_rms_norm_eager_kernel_matches_the_exported_formula_with_gradients(groups, channels_last):
    """Eagerly GroupRMSNorm runs a fused kernel; graphs record the portable formula. Both must agree,
    outputs and gradients, and the eager kernel keeps a channels-last input channels-last."""
    layer = _layer("GroupRMSNorm-4-groups" if groups == 4 else "GroupRMSNorm").double().train()
    x = _input(channels_last).double().requires_grad_()
    eager = layer(x)
    traced = torch.jit.trace(layer, x.detach())(x)  # the portable formula
    assert eager.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(eager, traced)
    eager_grads = torch.autograd.grad(eager.sin().sum(), (x, layer.weight, layer.bias))
    traced_grads = torch.autograd.grad(traced.sin().sum(), (x, layer.weight, layer.bias))
    for got, expected in zip(eager_grads, traced_grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["GroupRMSNorm-4-groups", "GroupRMSNormAct", "ChannelLayerNorm", "FrozenBatchNormAct"])
def test_sequence_inputs_export_too(name, tmp_path):
    """N×C×L, as after a Conv1d (the sequence and features recipes)."""
    pytest.importorskip("onnxruntime")
    x = torch.randn(3, 8, 11, generator=torch.Generator().manual_seed(3))
    result = export_onnx(_layer(name), x, tmp_path / "m.onnx", exporter="legacy")
    assert result.checked and result.max_rel_error is not None and result.max_rel_error <= TOLERANCE
    program = torch.export.export(_layer(name), (x,), strict=True)
    with torch.no_grad():
        _assert_close(program.module()(x), _layer(name)(x))


def test_channel_layernorm_exports_without_negative_permutation(tmp_path):
    pytest.importorskip("onnx")
    import onnx

    result = export_onnx(_layer("ChannelLayerNorm"), _input(), tmp_path / "m.onnx", exporter="legacy",
                         tolerance=None)
    perms = [list(a.ints) for n in onnx.load(str(result.path)).graph.node if n.op_type == "Transpose"
             for a in n.attribute if a.name == "perm"]
    assert perms and all(min(p) >= 0 for p in perms)


def test_frozen_target_keeps_the_activation_in_one_module():
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    converted = normswap.convert(model, "freeze", x[:1], validate=False).model.eval()
    frozen = [m for m in converted.modules() if isinstance(m, FrozenBatchNorm)]
    assert any(isinstance(m, FrozenBatchNormAct) and not isinstance(m.act, nn.Identity) for m in frozen)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def mid_transition() -> tuple[nn.Module, torch.Tensor]:
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    transition = normswap.progressive(model, "pretrained-small-batch", steps=4, example_inputs=x[:1])
    transition.step(2)
    return transition.model.eval(), x


def test_a_model_mid_transition_goes_through_torch_export_and_torchscript(mid_transition):
    model, x = mid_transition
    with torch.no_grad():
        expected = model(x)
        _assert_close(torch.export.export(model, (x,), strict=True).module()(x), expected)
        _assert_close(torch.jit.script(model)(x), expected)
        _assert_close(torch.jit.trace(model, x)(x), expected)


def test_a_model_mid_transition_exports_to_onnx(mid_transition, tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = mid_transition
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter="legacy")
    assert result.checked and result.max_rel_error is not None and result.max_rel_error <= TOLERANCE


def test_the_blend_is_exact_at_both_ends_eagerly():
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    transition = normswap.progressive(model, "small-batch", steps=2, example_inputs=x[:1])
    with torch.no_grad():
        start = transition.model.eval()(x)
        torch.testing.assert_close(start, model(x))
        transition.step(2)
        end = transition.model(x)
        target = normswap.convert(model, "small-batch", x[:1], validate=False).model.eval()(x)
    torch.testing.assert_close(end, target)


class _MovedimLayerNorm(nn.LayerNorm):
    """What ChannelLayerNorm used to be: movedim exports (legacy) as perm {0, -1, 1, 2}, which
    onnxruntime refuses to load."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def test_a_file_onnxruntime_refuses_is_never_written(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="onnxruntime"):
        export_onnx(_MovedimLayerNorm(8).eval(), _input(), path, exporter="legacy")
    assert list(tmp_path.iterdir()) == []


def test_a_file_beyond_the_tolerance_is_not_written_and_an_existing_one_is_kept(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(OutputExistsError):
        export_onnx(_layer("GroupRMSNormAct"), _input(), path)
    with pytest.raises(ExportError, match="tolerance"):
        export_onnx(_layer("GroupRMSNormAct"), _input(), path, tolerance=0.0, force=True)
    assert path.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_export_leaves_the_model_in_its_mode(tmp_path):
    layer = _layer("GroupRMSNormAct").train()
    export_onnx(layer, _input(), tmp_path / "m.onnx", tolerance=None)
    assert all(m.training for m in layer.modules())


def test_normswap_export_cli_round_trip(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    saved, onnx_file = tmp_path / "converted", tmp_path / "model.onnx"
    assert main(["convert", "resnet18", "-r", "pretrained-small-batch", "--input-size", "3,32,32",
                 "--no-validate", "-o", str(saved)]) == 0
    capsys.readouterr()
    assert main(["export", str(saved), "--input-size", "3,32,32", "-o", str(onnx_file)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    converted = normswap.load(saved).eval()
    x = torch.randn(3, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        _assert_close(torch.from_numpy(got), converted(x))
    assert main(["export", str(saved), "--input-size", "3,32,32", "-o", str(onnx_file)]) == OutputExistsError.exit_code
    code = main(["export", str(saved), "--input-size", "3,32,32", "-o", str(tmp_path / "x.onnx"), "--tolerance", "0"])
    assert code == ExportError.exit_code and not (tmp_path / "x.onnx").exists()
    assert "nothing written" in capsys.readouterr().err


class _FusedRMSNorm(nn.Module):
    """What GroupRMSNorm used to record: aten::rms_norm, which the legacy exporter cannot export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x.flatten(1), (x[0].numel(),)).view_as(x)


def test_nothing_is_written_when_the_exporter_fails(tmp_path):
    with pytest.raises(ExportError, match="legacy exporter"):
        export_onnx(_FusedRMSNorm(), _input(), tmp_path / "m.onnx", exporter="legacy")
    assert list(Path(tmp_path).iterdir()) == []

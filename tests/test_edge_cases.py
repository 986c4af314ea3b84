"""Hand-built edge cases: functional calls, sharing, sequences, BN variants, tracing failures."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from normswap.apply import batchnorm_left

from .conftest import model_fingerprint, relative_error
from .models import FunctionalBN, SequenceBN, SharedBN, SharedConv, ThirtyChannels, Untraceable, Variants, trained_stats


def test_functional_batch_norm_is_found_and_rewritten():
    torch.manual_seed(0)
    model = FunctionalBN().eval()
    x = torch.randn(4, 3, 8, 8)
    plan = normswap.plan(model, "small-batch", x[:1])
    [site] = [e.site for e in plan.entries]
    assert site.kind == "functional" and site.input_shape == (1, 8, 8, 8) and site.layout == "image"
    conversion = normswap.convert(model, "small-batch", x[:1])
    assert isinstance(conversion.model, torch.fx.GraphModule)
    assert batchnorm_left(conversion.model) == []
    assert "running_mean" not in dict(conversion.model.named_buffers())
    assert conversion.model(x).shape == model(x).shape
    assert normswap.batch_dependence(conversion.model, x) < 1e-6
    assert any("GraphModule" in w for w in conversion.report.warnings)


def test_a_nested_functional_call_is_named_after_the_module_making_it():
    model = nn.Sequential(nn.Identity(), nn.Sequential(FunctionalBN())).eval()
    [site] = [e.site for e in normswap.plan(model, "small-batch", torch.randn(1, 3, 8, 8)).entries]
    assert site.kind == "functional" and site.path == f"1.0.{site.node}"
    converted = normswap.convert(model, "small-batch", torch.randn(1, 3, 8, 8)).model
    assert isinstance(converted.get_submodule(site.path), nn.GroupNorm)


def test_functional_fold_falls_back_and_stays_exact():
    torch.manual_seed(0)
    model = FunctionalBN().eval()
    x = torch.randn(2, 3, 8, 8)
    conversion = normswap.convert(model, "fold", x[:1])
    assert conversion.plan.entries[0].target == "frozen"
    with torch.no_grad():
        assert relative_error(model(x), conversion.model(x)) < 1e-6


def test_shared_module_is_one_site_called_twice_and_replaced_everywhere():
    model = trained_stats(SharedBN(), torch.randn(8, 3, 8, 8) * 0.1)  # keep the second call in range
    x = torch.randn(2, 3, 8, 8)
    plan = normswap.plan(model, "small-batch", x[:1])
    [entry] = plan.entries
    assert entry.site.call_count == 2 and entry.site.aliases == ("alias",)
    assert not entry.site.producer_exclusive, "a module called twice cannot be folded"
    converted = normswap.convert(model, "small-batch", x[:1]).model
    assert converted.bn is converted.alias and isinstance(converted.bn, nn.GroupNorm)
    assert normswap.batch_dependence(converted, x) < 1e-6


def test_sequence_batchnorm1d_becomes_layernorm_at_each_step():
    torch.manual_seed(0)
    model = trained_stats(SequenceBN(), torch.randn(16, 4, 20))
    x = torch.randn(3, 4, 20)
    conversion = normswap.convert(model, "sequence", x[:1])
    entry = conversion.plan.entries[0]
    # Features or sequence, the recipe makes it a LayerNorm over C: the layout is left a guess, unrun.
    assert entry.site.layout_inferred and entry.site.input_shape is None and entry.target == "layernorm"
    seen = normswap.plan(model, "sequence", x[:1], shapes="always").entries[0]
    assert seen.site.layout == "sequence" and not seen.site.layout_inferred and seen.target == "layernorm"
    converted = conversion.model.train()
    # Nothing shared across time: changing the future leaves earlier steps' norm output unchanged.
    bn = converted.bn
    h = converted.conv(x)
    edited = h.clone()
    edited[:, :, 10:] += 5 * torch.randn_like(edited[:, :, 10:])
    assert torch.allclose(bn(h)[:, :, :10], bn(edited)[:, :, :10])
    # Nothing shared across the batch either.
    assert normswap.batch_dependence(converted, x) < 1e-6
    # And each step is normalized over C: zero mean before the affine.
    with torch.no_grad():
        raw = (bn(h) - bn.bias[None, :, None]) / bn.weight[None, :, None]
    assert raw.mean(1).abs().max() < 1e-5


@pytest.mark.parametrize("recipe", ["small-batch", "dp", "layernorm", "layernorm-chw", "rmsnorm-chw", "detection"])
def test_batchnorm_variants_convert(recipe):
    torch.manual_seed(0)
    model = Variants().eval()
    x = torch.randn(4, 3, 8, 8)
    conversion = normswap.convert(model, recipe, x[:1])
    sites = {e.site.path: e for e in conversion.plan.entries}
    assert sites["no_stats"].options["transfer"] == "affine"
    assert sites["no_affine"].site.affine is False
    assert sites["bn3d"].site.layout == "volume" and sites["bn1d"].site.layout == "features"
    assert batchnorm_left(conversion.model) == []
    assert conversion.model(x).shape == model(x).shape
    assert normswap.batch_dependence(conversion.model, x) < 1e-5
    if recipe == "dp":
        assert not [n for n, _ in conversion.model.named_buffers() if "running" in n]


def test_untraceable_model_converts_from_forward_hooks():
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = normswap.plan(model, "small-batch", x[:1])
    assert plan.trace == "eager" and "TraceError" in (plan.trace_error or "")
    assert plan.entries[0].site.learned_by == "eager" and plan.entries[0].site.input_shape == (1, 8, 8, 8)
    conversion = normswap.convert(model, "small-batch", x[:1])
    assert batchnorm_left(conversion.model) == []
    assert any("did not trace" in w for w in conversion.report.warnings)


def test_batchnorm_inside_a_leaf_module_is_found_and_converted():
    from timm.layers import register_notrace_module

    @register_notrace_module
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(x)

    calls = []
    model = nn.Sequential(nn.Conv2d(3, 8, 1), Opaque()).eval()
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    # The graph does not see inside the leaf, but a BatchNorm2d's input is an image: no forward needed.
    [entry] = normswap.plan(model, "small-batch", torch.randn(1, 3, 4, 4)).entries
    assert entry.site.path == "1.bn" and entry.site.learned_by == "class" and entry.site.layout == "image"
    assert calls == [] and not entry.site.layout_inferred
    # Asked to record shapes, the forward's hooks see it called.
    [seen] = normswap.plan(model, "small-batch", torch.randn(1, 3, 4, 4), shapes="always").entries
    assert seen.site.learned_by == "eager" and seen.site.input_shape == (1, 8, 4, 4) and seen.site.call_count == 1
    assert seen.target == entry.target and seen.options == entry.options
    assert batchnorm_left(normswap.convert(model, "small-batch", torch.randn(1, 3, 4, 4)).model) == []


def test_fold_is_exact_on_conv_and_linear_and_refuses_a_shared_producer():
    torch.manual_seed(0)
    model = trained_stats(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 5, bias=False),
            nn.BatchNorm1d(5),
        ),
        torch.randn(16, 3, 8, 8),
    )
    x = torch.randn(4, 3, 8, 8)
    conversion = normswap.convert(model, "fold", x[:1])
    assert [e.target for e in conversion.plan.entries] == ["fold", "fold"]
    assert not any(isinstance(m, (_BatchNorm, normswap.FrozenBatchNorm)) for m in conversion.model.modules())
    with torch.no_grad():
        assert relative_error(model(x), conversion.model(x)) <= 1e-6

    shared = trained_stats(SharedConv(), torch.randn(8, 3, 8, 8))
    entry = normswap.plan(shared, "fold", x[:1]).entries[0]
    assert entry.target == "frozen" and "shared or feeds other nodes" in entry.reason


def test_statistics_aware_transfer_matches_batchnorm_on_its_own_distribution():
    """Inputs drawn from the running statistics: the statistics-aware GroupNorm reproduces the BN
    output, the affine copy does not."""
    torch.manual_seed(0)
    c = 64
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(2 * torch.randn(c))
        bn.running_var.copy_(0.2 + 3 * torch.rand(c))
        bn.weight.copy_(1 + 0.3 * torch.randn(c))
        bn.bias.copy_(0.3 * torch.randn(c))
    x = bn.running_mean[None, :, None, None] + bn.running_var.sqrt()[None, :, None, None] * torch.randn(4, c, 32, 32)
    model = nn.Sequential(bn)
    errors = {}
    for transfer in ("statistics", "affine"):
        recipe = {"rules": [{"name": "gn", "target": "groupnorm", "options": {"groups": 8, "transfer": transfer}}]}
        converted = normswap.convert(model, recipe, x[:1]).model
        with torch.no_grad():
            errors[transfer] = relative_error(bn(x), converted(x))
    assert errors["statistics"] < 0.02
    assert errors["affine"] > 10 * errors["statistics"]


def test_standardize_transfer_folds_the_statistics_into_the_producer():
    """The producer's output becomes (x − μ)/s, and the GroupNorm reproduces BatchNorm exactly on a
    sample whose per-channel moments are the running statistics; without a conv of its own, a site falls
    back to the statistics-aware transfer, and the plan replays."""
    torch.manual_seed(0)
    c = 32
    model = nn.Sequential(nn.Conv2d(3, c, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.BatchNorm2d(c)).eval()
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        z = model[0](x)
        model[1].running_mean.copy_(z.mean((0, 2, 3)))
        model[1].running_var.copy_(z.var((0, 2, 3), unbiased=False))
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    recipe = {"rules": [{"name": "gn", "target": "groupnorm", "options": {"groups": 4, "transfer": "standardize"}}]}
    conversion = normswap.convert(model, recipe, x)
    first, second = conversion.plan.entries
    assert first.options["transfer"] == "standardize" and first.options["producer"] == "0"
    assert second.options["transfer"] == "statistics"  # its producer is a ReLU
    converted = conversion.model
    bn = model[1]
    with torch.no_grad():
        standardized = (z - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1)
        assert relative_error(standardized, converted[0](x)) < 1e-5
        assert relative_error(bn(z), converted[1](converted[0](x))) < 1e-4
    assert model[0].bias is None  # the user's conv is untouched
    replayed = normswap.apply_plan(model, normswap.Plan.from_json(conversion.plan.to_json()))
    replayed.load_state_dict(converted.state_dict())
    with torch.no_grad():
        assert torch.equal(replayed(x), converted(x))


@pytest.mark.parametrize("transfer", ["statistics", "standardize"])
def test_rmsnorm_chw_reproduces_batchnorm_in_expectation_and_keeps_the_sample_mean(transfer):
    """RMSNorm over C×H×W divides each sample by its root mean square and subtracts nothing. Its
    transfers (statistics-aware, or standardize: folded into the conv) reproduce BatchNorm exactly on a
    sample whose per-channel moments are the running statistics, as the centring norms' do."""
    from normswap.layers import GroupRMSNorm

    torch.manual_seed(0)
    c = 16
    model = nn.Sequential(nn.Conv2d(3, c, 3), nn.BatchNorm2d(c), nn.ReLU()).eval()
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-1, 2, c))  # channel means far from 0
        z = model[0](x)
        model[1].running_mean.copy_(z.mean((0, 2, 3)))
        model[1].running_var.copy_(z.var((0, 2, 3), unbiased=False))
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    recipe = {"rules": [{"name": "rms", "target": "rmsnorm-chw", "options": {"transfer": transfer, "eps": 2.0}}]}
    conversion = normswap.convert(model, recipe, x)
    layer = conversion.model[1]
    assert isinstance(layer, GroupRMSNorm) and layer.num_groups == 1 and layer.eps == 2.0
    with torch.no_grad():
        assert relative_error(model(x), conversion.model(x)) < 1e-4
        # Per sample: a sample scaled up is normalized back (eps is small against its mean square)...
        bare = GroupRMSNorm(1, c, eps=1e-8, affine=False)
        assert relative_error(bare(z), bare(7.0 * z)) < 1e-5
        # ...and its mean over C×H×W survives, where LayerNorm's would be 0.
        assert float(bare(z).mean()) > 0.3
        # A channels-last model stays channels-last.
        last = bare(z.contiguous(memory_format=torch.channels_last))
        assert last.is_contiguous(memory_format=torch.channels_last) and relative_error(bare(z), last) < 1e-6
        assert normswap.batch_dependence(conversion.model, torch.randn(4, 3, 12, 12)) < 1e-6
    replayed = normswap.apply_plan(model, normswap.Plan.from_json(conversion.plan.to_json()))
    replayed.load_state_dict(conversion.model.state_dict())
    with torch.no_grad():
        assert torch.equal(replayed(x), conversion.model(x))
    # Planning the converted model again sees the new layer as a norm of its own, not a site.
    again = normswap.plan(conversion.model, "small-batch", x)
    assert not again.entries and [o.path for o in again.other_norms] == ["1"]


def test_norm_eps_option_is_used_by_the_layer_and_its_transfer():
    from normswap.transfer import NormState, statistics_aware_affine

    torch.manual_seed(0)
    model = trained_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), torch.randn(8, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    recipe = {"rules": [{"name": "gn", "target": "groupnorm", "options": {"groups": 2, "eps": 4}}]}
    conversion = normswap.convert(model, recipe, x)
    layer = conversion.model[1]
    assert conversion.plan.entries[0].options["eps"] == 4.0 and layer.eps == 4.0
    gamma, beta = statistics_aware_affine(NormState.from_module(model[1]), 2, 4.0)
    assert torch.allclose(layer.weight, gamma) and torch.allclose(layer.bias, beta)
    bad = {"rules": [{"name": "gn", "target": "groupnorm", "options": {"eps": 0}}]}
    with pytest.raises(normswap.PlanError, match="eps must be positive"):
        normswap.plan(model, bad, x)


def test_groups_that_do_not_divide_are_adjusted_or_refused():
    model = ThirtyChannels().eval()
    x = torch.randn(1, 3, 4, 4)
    entry = normswap.plan(model, "small-batch", x).entries[0]
    assert entry.options["groups"] == 30  # largest divisor of 30 not above 32
    strict = {"rules": [{"name": "strict", "target": "groupnorm", "options": {"groups": 32, "adjust": "error"}}]}
    with pytest.raises(normswap.PlanError, match=r"bn: .*groups=32 does not divide 30 channels"):
        normswap.plan(model, strict, x)


def test_failed_conversion_leaves_the_model_untouched_also_inplace():
    torch.manual_seed(0)
    model = trained_stats(SharedConv(), torch.randn(8, 3, 8, 8))
    before = model_fingerprint(model)
    recipe = {"rules": [{"name": "fold-or-die", "target": "fold"}]}
    for inplace in (False, True):
        with pytest.raises(normswap.PlanError, match="fold-or-die"):
            normswap.convert(model, recipe, torch.randn(1, 3, 8, 8), inplace=inplace)
        assert model_fingerprint(model) == before


def test_dtype_device_mode_and_requires_grad_are_preserved():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)).to(torch.bfloat16).train()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    converted = normswap.convert(model, "small-batch", x).model
    gn = converted[1]
    assert gn.weight.dtype == torch.bfloat16 and gn.training and not gn.weight.requires_grad
    assert model.training and all(m.training for m in model.modules()), "discovery restores train mode"


def test_channels_last_input_keeps_its_memory_format():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    for recipe in ("layernorm", "fold"):
        conversion = normswap.convert(model, recipe, x, shapes="always")
        assert conversion.plan.entries[0].site.memory_format == "channels_last"
        out = conversion.model(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(model(x), normswap.convert(model, "fold", x).model(x)) < 1e-6


def test_lazy_batchnorm_is_refused_until_initialised_and_then_converts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d()).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(normswap.TraceError, match="lazy"):
        normswap.plan(model, "small-batch", x)
    assert isinstance(model[1], nn.LazyBatchNorm2d), "normswap must not initialise the user's lazy modules"
    model(x)
    assert batchnorm_left(normswap.convert(model, "small-batch", x).model) == []


def test_plan_for_another_architecture_is_refused_with_names():
    plan = normswap.plan(SequenceBN().eval(), "sequence", torch.randn(1, 4, 10))
    with pytest.raises(normswap.PlanError, match=r"bn: is torch.nn.modules.batchnorm.BatchNorm2d"):
        normswap.apply_plan(ThirtyChannels(), plan)


def test_plan_is_deterministic_and_prints():
    model = Variants().eval()
    x = torch.randn(1, 3, 8, 8)
    first, second = (normswap.plan(model, "small-batch", x) for _ in range(2))
    assert first.to_json() == second.to_json()
    text = str(first)
    assert "no_affine" in text and "groupnorm" in text
    a = normswap.convert(model, "small-batch", x).model.state_dict()
    b = normswap.convert(model, "small-batch", x).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dropout_noise_is_not_counted_as_batch_dependence():
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    assert normswap.batch_dependence(model, torch.randn(4, 6)) == 0.0
    with_bn = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.Linear(16, 3))
    assert normswap.batch_dependence(with_bn, torch.randn(4, 6)) > 1e-3


def _count_real_calls(model: nn.Module) -> list[int]:
    calls = [0]
    model[0].register_forward_pre_hook(lambda _m, _a: calls.__setitem__(0, calls[0] + 1))  # fx tracing skips hooks
    return calls


def test_the_model_runs_only_when_a_layout_depends_on_it():
    # BatchNorm2d only takes 4-d input: the trace decides the plan, so conversion costs no forward pass.
    image = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    calls = _count_real_calls(image)
    x = torch.randn(1, 3, 8, 8)
    plan = normswap.plan(image, "small-batch", x)
    site = plan.entries[0].site
    assert calls == [0]
    assert site.input_shape is None and site.layout == "image" and not site.layout_inferred and site.call_count == 1
    always = normswap.plan(image, "small-batch", x, shapes="always")
    assert calls == [1] and always.entries[0].site.input_shape == (1, 8, 6, 6)
    assert [e.target for e in plan.entries] == [e.target for e in always.entries]
    # BatchNorm1d takes (N, C) and (N, C, L). Where the recipe treats both alike (LayerNorm over C either
    # way) the layout stays a guess; where it does not (InstanceNorm needs steps), the model runs.
    sequence = nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8)).eval()
    calls = _count_real_calls(sequence)
    alike = normswap.plan(sequence, "sequence", torch.randn(1, 4, 16)).entries[0]
    assert calls == [0] and alike.site.layout_inferred and alike.target == "layernorm"
    differ = normswap.plan(sequence, "style-transfer", torch.randn(1, 4, 16)).entries[0]
    assert calls == [1] and differ.site.layout == "sequence" and differ.site.input_shape == (1, 8, 14)
    assert differ.target == "instancenorm"
    features = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    calls = _count_real_calls(features)
    seen = normswap.plan(features, "style-transfer", torch.randn(1, 4)).entries[0]
    assert calls == [1] and seen.site.layout == "features" and seen.target == "layernorm"
    with pytest.raises(normswap.UnknownNameError, match="always"):
        normswap.plan(image, "small-batch", x, shapes="never")


AFFINE_COPY = {"rules": [{"name": "gn-affine", "target": "groupnorm", "options": {"transfer": "affine"}}]}


@pytest.mark.parametrize("recipe", ["small-batch", "freeze", "fold", "layernorm-chw", "rmsnorm-chw", AFFINE_COPY])
def test_converted_model_shares_no_tensor_with_the_original(recipe):
    """The copy borrows the replaced BatchNorms' tensors while it is built (they are read, never kept):
    none may end up in the converted model, and training it must leave the original alone."""
    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    converted = normswap.convert(model, recipe, x, validate=False, batch_size=2).model
    storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not [n for n, t in (*converted.named_parameters(), *converted.named_buffers())
                if t.untyped_storage().data_ptr() in storages]
    # Nor with each other (batched transfers compute all sites together): safetensors refuses shared storage.
    tensors = [*converted.parameters(), *converted.buffers()]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    before = model_fingerprint(model)
    with torch.no_grad():
        for t in (*converted.parameters(), *converted.buffers()):
            if t.is_floating_point():
                t.add_(1.0)
    assert model_fingerprint(model) == before


class _Unpacking(nn.Module):
    """Every way a forward unpacks a traced value: a shape, a slice of one, a proxy, a nested unpack."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        b, c, h, w = x.shape
        n, ch = x.flatten(2).shape[:2]
        left, right = x.chunk(2, dim=1)
        (first, second), _ = x.split(1, dim=0)[0].shape[:2], None
        y = self.bn(torch.cat([right, left], dim=1))
        return y.reshape(b, c * h * w) * (n + ch + first + second)


def test_unpacking_traces_as_in_fx():
    # The tracer answers unpacking without fx's per-call disassembly; the graph must not change.
    from normswap.tracing import trace_graph

    model = _Unpacking().eval()
    ours = trace_graph(model).python_code("self").src
    assert ours == torch.fx.symbolic_trace(model).graph.python_code("self").src
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(torch.fx.GraphModule(model, trace_graph(model))(x), model(x))


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("offset", torch.zeros(1))
        self.table = torch.arange(4.0).view(1, 4, 1, 1)  # a plain tensor attribute: a constant in the graph

    def forward(self, x):
        return x * self.scale + self.offset + self.table


class _ScaledBN(_Scaled):  # a subclass of another class in the model: both get the wrappers
    def forward(self, x):
        return super().forward(x) * 2


class _OwnCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def __call__(self, *args, **kwargs):  # fx's patch of nn.Module still sees super().__call__
        return super().__call__(*args, **kwargs)

    def forward(self, x):
        return self.bn(x)


@pytest.mark.parametrize("extra", [[], [_OwnCall()]], ids=["own-trace", "fx-trace"])
def test_tracing_gives_fxs_graph_and_leaves_every_class_as_it_was(extra):
    from normswap.tracing import trace_graph

    model = nn.Sequential(nn.Conv2d(4, 4, 1), _Scaled(), nn.BatchNorm2d(4), _ScaledBN(), *extra).eval()
    classes = {type(m) for m in model.modules()} | {nn.Module}
    before = {c: dict(vars(c)) for c in classes}
    ours = trace_graph(model)
    assert ours.python_code("self").src == torch.fx.symbolic_trace(model).graph.python_code("self").src
    assert {c: dict(vars(c)) for c in classes} == before
    assert sum(n.op == "call_module" and n.target == "2" for n in ours.nodes) == 1  # BatchNorm stays a leaf
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(torch.fx.GraphModule(model, ours)(x), model(x))


def test_fold_copies_no_weight_it_replaces_and_a_target_must_build_what_it_declares(monkeypatch):
    from normswap import apply as apply_module
    from normswap import targets

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    plan = normswap.plan(model, "fold", torch.randn(1, 3, 8, 8))
    # The folded conv and the BatchNorm are read, never kept: the copy borrows their tensors.
    assert {id(m) for m in apply_module._replaced(model, plan)} == {id(model[0]), id(model[1])}

    class Forgetful(targets.IdentityTarget):
        name = "forgetful"

        def replaces(self, site, options):
            return (site.path, "0")  # claims the conv too, but builds only the site

    monkeypatch.setitem(targets._REGISTRY, "forgetful", Forgetful())
    recipe = {"rules": [{"name": "all", "target": "forgetful"}]}
    before = model_fingerprint(model)
    with pytest.raises(normswap.PlanError, match="declares it replaces"):
        normswap.convert(model, recipe, torch.randn(1, 3, 8, 8), validate=False)
    assert model_fingerprint(model) == before

"""clone_model must give what copy.deepcopy gives: equal outputs, nothing shared, aliasing kept."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.fx as fx
from torch import nn

from normswap.cloning import clone_model

from .conftest import TIMM_CASES, randomize_batchnorm


def tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def assert_independent_copy(original: nn.Module, copied: nn.Module) -> None:
    assert type(copied).__qualname__ == type(original).__qualname__  # a GraphModule gets a class of its own
    assert list(copied.state_dict()) == list(original.state_dict())
    originals = {t.untyped_storage().data_ptr() for t in tensors(original)}
    assert not any(t.untyped_storage().data_ptr() in originals for t in tensors(copied)), "no storage shared"
    assert not {id(m) for m in copied.modules()} & {id(m) for m in original.modules()}, "no module shared"
    for a, b in zip(original.parameters(), copied.parameters(), strict=True):
        assert type(a) is type(b) and a.requires_grad == b.requires_grad and torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_clone_equals_deepcopy_on_timm_models(name):
    model = randomize_batchnorm(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(2, *TIMM_CASES[name])
    copied = clone_model(model)
    assert_independent_copy(model, copied)
    with torch.no_grad():
        assert torch.equal(model(x), copied(x))
        reference = copy.deepcopy(model)(x)
        assert torch.equal(reference, copied(x))
    with torch.no_grad():
        next(copied.parameters()).add_(1.0)
    with torch.no_grad():
        assert torch.equal(model(x), reference), "changing the copy leaves the original alone"


class Tied(nn.Module):
    """A shared module, a tied parameter, a plain tensor attribute, a list of modules and a hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.again = self.conv
        self.head = nn.Linear(4, 4)
        self.tail = nn.Linear(4, 4)
        self.tail.weight = self.head.weight
        self.scale = torch.tensor(2.0)  # not registered: deepcopy still copies it
        self.register_buffer("whole", torch.arange(6.0))
        self.register_buffer("view", self.whole[2:])  # shares the storage: the copies must too
        self.order = [self.head, self.tail]
        self.rnn = nn.GRU(4, 4)  # customises __setstate__: goes through deepcopy
        self.seen: list[int] = []
        self.conv.register_forward_hook(lambda _m, _i, _o: self.seen.append(1))

    def forward(self, x):
        y = self.again(self.conv(x[:, :3]).repeat(1, 1, 1, 1)[:, :3]).mean((2, 3))
        return self.tail(self.head(y)) * self.scale + self.rnn(y.unsqueeze(0))[0][0]


def test_clone_keeps_aliasing_and_handles_custom_copy_hooks():
    model = Tied().eval()
    copied = clone_model(model)
    assert copied.again is copied.conv and copied.tail.weight is copied.head.weight
    assert copied.order[0] is copied.head and copied.order[1] is copied.tail
    assert copied.scale is not model.scale and torch.equal(copied.scale, model.scale)
    copied.whole[3] = 100.0
    assert copied.view[1] == 100.0 and model.view[1] == 3.0
    assert copied.rnn is not model.rnn and copied.rnn._flat_weights[0] is copied.rnn.weight_ih_l0
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(model(x), copied(x))
    assert len(copied._forward_hooks) == len(model._forward_hooks) == 0
    assert len(copied.conv._forward_hooks) == 1 and copied.conv._forward_hooks is not model.conv._forward_hooks


def test_clone_of_a_graph_module_is_a_graph_module():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval())
    copied = clone_model(gm)
    assert isinstance(copied, fx.GraphModule) and copied.graph is not gm.graph
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(gm(x), copied(x))
    assert_independent_copy(gm, copied)


class Lending(nn.Module):
    """A BatchNorm whose weight another module also holds, and a plain list holding its bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.BatchNorm2d(4)
        self.other.weight = self.bn.weight
        self.refs = [self.bn.bias]  # a plain list: not registered anywhere


def test_borrowed_tensors_are_only_those_no_one_else_holds():
    model = Lending()
    copied = clone_model(model, borrow=[model.bn])
    assert copied.bn.bias is model.bn.bias and copied.bn.running_mean is model.bn.running_mean, "lent"
    assert copied.bn.weight is not model.bn.weight, "also held by another module: copied"
    assert copied.bn.weight is copied.other.weight, "and still tied in the copy"
    assert copied.refs[0] is not model.bn.bias and torch.equal(copied.refs[0], model.bn.bias), "plain list: copied"
    assert copied.conv.weight is not model.conv.weight

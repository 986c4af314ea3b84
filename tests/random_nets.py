"""Random networks for property-based tests: every structural case a BatchNorm swap meets.

A network is a list of block specs applied to an input of a given layout. Blocks: conv(+BN)(+act),
residual adds, concatenated branches, one BN module shared by two calls, functional batch_norm,
nested Sequential/ModuleList/ModuleDict; BN with and without affine, running stats, momentum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

NDIM = {"features": 1, "sequence": 1, "image": 2, "volume": 3}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass(frozen=True)
class BNSpec:
    affine: bool
    track: bool
    momentum: float | None
    sync: bool


@dataclass(frozen=True)
class Block:
    kind: str  # conv | residual | concat | shared | functional | nested
    channels: int
    bn: BNSpec
    act: bool
    container: str = "sequential"


@dataclass(frozen=True)
class NetSpec:
    layout: str
    in_channels: int
    blocks: tuple[Block, ...]
    head_bn: BNSpec | None
    batch: int = 3
    traceable: bool = True


def bn_specs() -> st.SearchStrategy[BNSpec]:
    return st.builds(BNSpec, affine=st.booleans(), track=st.booleans(),
                     momentum=st.sampled_from([0.1, None, 0.5]), sync=st.booleans())


def blocks() -> st.SearchStrategy[Block]:
    return st.builds(Block, kind=st.sampled_from(["conv", "residual", "concat", "shared", "functional", "nested"]),
                     channels=st.sampled_from([1, 2, 3, 6, 8, 12, 30, 32, 48, 64]), bn=bn_specs(), act=st.booleans(),
                     container=st.sampled_from(["sequential", "modulelist", "moduledict"]))


def net_specs() -> st.SearchStrategy[NetSpec]:
    return st.builds(NetSpec, layout=st.sampled_from(["features", "sequence", "image", "volume"]),
                     in_channels=st.sampled_from([1, 3, 4]),
                     blocks=st.lists(blocks(), min_size=1, max_size=4).map(tuple),
                     head_bn=st.none() | bn_specs(), batch=st.sampled_from([2, 3]),
                     traceable=st.booleans())


def make_bn(dims: int, channels: int, spec: BNSpec) -> nn.Module:
    if spec.sync:
        return nn.SyncBatchNorm(channels, affine=spec.affine, track_running_stats=spec.track, momentum=spec.momentum)
    return BN[dims](channels, affine=spec.affine, track_running_stats=spec.track, momentum=spec.momentum)


def make_layer(dims: int, cin: int, cout: int, features: bool) -> nn.Module:
    return nn.Linear(cin, cout) if features else CONV[dims](cin, cout, 3, padding=1)


class ConvBN(nn.Module):
    def __init__(self, dims: int, cin: int, block: Block, features: bool) -> None:
        super().__init__()
        self.layer = make_layer(dims, cin, block.channels, features)
        self.bn = make_bn(dims, block.channels, block.bn)
        self.act = nn.ReLU() if block.act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.layer(x)))


class Residual(nn.Module):
    def __init__(self, dims: int, cin: int, block: Block, features: bool) -> None:
        super().__init__()
        self.proj = make_layer(dims, cin, block.channels, features)
        self.body = ConvBN(dims, block.channels, block, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return x + self.body(x)


def out_channels(block: Block) -> int:
    return max(block.channels, 2) if block.kind == "concat" else block.channels


class Concat(nn.Module):
    def __init__(self, dims: int, cin: int, block: Block, features: bool) -> None:
        super().__init__()
        total = out_channels(block)
        half = total // 2
        self.a = ConvBN(dims, cin, Block("conv", half, block.bn, block.act), features)
        self.b = ConvBN(dims, cin, Block("conv", total - half, block.bn, False), features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class Shared(nn.Module):
    """One BN module called twice (and reachable under a second name)."""

    def __init__(self, dims: int, cin: int, block: Block, features: bool) -> None:
        super().__init__()
        self.first = make_layer(dims, cin, block.channels, features)
        self.second = make_layer(dims, block.channels, block.channels, features)
        self.bn = make_bn(dims, block.channels, block.bn)
        self.same_bn = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.second(torch.tanh(self.bn(self.first(x)))))


class Functional(nn.Module):
    """BatchNorm as a call in forward code, with its tensors as parameters and buffers."""

    def __init__(self, dims: int, cin: int, block: Block, features: bool) -> None:
        super().__init__()
        c = block.channels
        self.layer = make_layer(dims, cin, c, features)
        self.weight = nn.Parameter(torch.ones(c)) if block.bn.affine else None
        self.bias = nn.Parameter(torch.zeros(c)) if block.bn.affine else None
        self.register_buffer("running_mean", torch.zeros(c) if block.bn.track else None)
        self.register_buffer("running_var", torch.ones(c) if block.bn.track else None)
        self.momentum = block.bn.momentum or 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training or self.running_mean is None
        return F.batch_norm(self.layer(x), self.running_mean, self.running_var, self.weight, self.bias,
                            training, self.momentum, 1e-5)


class Nested(nn.Module):
    def __init__(self, dims: int, cin: int, block: Block, features: bool) -> None:
        super().__init__()
        inner = [ConvBN(dims, cin, block, features), ConvBN(dims, block.channels, block, features)]
        self.container = block.container
        if block.container == "modulelist":
            self.inner = nn.ModuleList(inner)
        elif block.container == "moduledict":
            self.inner = nn.ModuleDict({"first": inner[0], "second": inner[1]})
        else:
            self.inner = nn.Sequential(nn.Sequential(inner[0]), inner[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.inner.values() if isinstance(self.inner, nn.ModuleDict) else self.inner
        for layer in layers:
            x = layer(x)
        return x


BLOCKS = {"conv": ConvBN, "residual": Residual, "concat": Concat, "shared": Shared, "functional": Functional,
          "nested": Nested}


class RandomNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        dims, features = NDIM[spec.layout], spec.layout == "features"
        self.spec = spec
        layers, c = [], spec.in_channels
        for block in spec.blocks:
            layers.append(BLOCKS[block.kind](dims, c, block, features))
            c = out_channels(block)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 5)
        self.head_bn = nn.BatchNorm1d(5, affine=spec.head_bn.affine, track_running_stats=spec.head_bn.track) \
            if spec.head_bn is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        # The untraceable variant branches on a tensor's shape, which torch.fx cannot follow.
        pool = y.ndim > 2 if not self.spec.traceable else self.spec.layout != "features"
        if pool:
            y = y.flatten(2).mean(2)
        return self.head_bn(self.head(y))


def example_input(spec: NetSpec, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    spatial = {"features": (), "sequence": (7,), "image": (6, 5), "volume": (4, 3, 3)}[spec.layout]
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch or spec.batch, spec.in_channels, *spatial), generator=g)


def build(spec: NetSpec, seed: int = 0) -> RandomNet:
    """The network with statistics that look trained: a few train-mode batches, then eval."""
    torch.manual_seed(seed)
    net = RandomNet(spec)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        net.train()
        for step in range(2):
            net(example_input(spec, batch=4, seed=100 + step))
    return net.eval()

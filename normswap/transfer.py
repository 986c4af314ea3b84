"""Parameter transfer from a BatchNorm site to its replacement.

Four transfers exist: ``affine`` copies gamma/beta per channel; ``statistics`` (the default where
running statistics exist) also uses them so the new layer's expected output equals BatchNorm's;
``standardize`` folds BatchNorm's standardization by its running statistics into the producing
conv/linear, so the new layer normalizes channels of equal scale, and keeps gamma/beta; ``none``
starts fresh (what Opacus does). Folding into the producing conv/linear lives here too, since
it is the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .cloning import shallow_copy
from .tracing import functional_arguments, resolve_attr, site_features

TRANSFERS = ("auto", "statistics", "standardize", "affine", "none")
R = TypeVar("R")


@dataclass(frozen=True)
class NormState:
    """A BatchNorm site's numbers, whether it is a module or a functional call."""

    num_features: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    eps: float
    training: bool
    requires_grad: bool
    device: torch.device
    dtype: torch.dtype
    act: nn.Module | None = None
    drop: nn.Module | None = None

    @property
    def has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    @classmethod
    def from_module(cls, m: nn.Module) -> NormState:
        """A BatchNorm module's numbers, or a frozen BatchNorm's (``tracing.is_frozen_batchnorm``),
        whose weight and bias are buffers."""
        # Read from the tables nn.Module keeps them in: attribute access goes through its __getattr__,
        # a third of this for the hundred-odd sites of a small network.
        params, buffers, children = m._parameters, m._buffers, m._modules
        frozen = not isinstance(m, _BatchNorm)
        affine = buffers if frozen else params
        weight, running_mean = affine.get("weight"), buffers.get("running_mean")
        ref = weight if weight is not None else running_mean
        act, drop = children.get("act"), children.get("drop")
        return cls(
            num_features=site_features(m),
            weight=_data(weight),
            bias=_data(affine.get("bias")),
            running_mean=_data(running_mean),
            running_var=_data(buffers.get("running_var")),
            eps=float(m.eps),
            training=m.training,
            # A frozen layer's affine is fixed by its kind, not by a choice to stop training it: the
            # layer that replaces it (GroupNorm for training at batch 2, say) trains like any other.
            requires_grad=frozen or bool(weight is not None and weight.requires_grad),
            device=ref.device if ref is not None else torch.device("cpu"),
            dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32,
            act=act if isinstance(act, nn.Module) else _plain_module(m, "act"),
            drop=drop if isinstance(drop, nn.Module) else _plain_module(m, "drop"),
        )

    @classmethod
    def from_functional(cls, model: nn.Module, node: fx.Node, num_features: int, training: bool) -> NormState:
        args = functional_arguments(node)
        tensors = {k: _attr(model, args.get(k)) for k in ("weight", "bias", "running_mean", "running_var")}
        ref = next((t for t in tensors.values() if t is not None), None)
        weight = tensors["weight"]
        return cls(
            num_features=num_features,
            weight=_data(weight),
            bias=_data(tensors["bias"]),
            running_mean=_data(tensors["running_mean"]),
            running_var=_data(tensors["running_var"]),
            eps=float(args.get("eps", 1e-5)),
            training=training,
            requires_grad=bool(weight is not None and weight.requires_grad),
            device=ref.device if ref is not None else torch.device("cpu"),
            dtype=ref.dtype if ref is not None else torch.float32,
        )


def _plain_module(m: nn.Module, name: str) -> nn.Module | None:
    """A module kept as a plain attribute (not registered), as ``getattr`` would find it."""
    value = m.__dict__.get(name)
    return value if isinstance(value, nn.Module) else None


def _data(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _attr(model: nn.Module, arg: object) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = resolve_attr(model, str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def resolve_transfer(requested: str, has_running_stats: bool) -> str:
    if requested == "auto":
        return "statistics" if has_running_stats else "affine"
    return requested


def affine_copy(state: NormState) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma and beta as they are (ones/zeros where BatchNorm had no affine)."""
    ones = torch.ones(state.num_features, device=state.device, dtype=state.dtype)
    weight = state.weight if state.weight is not None else ones
    bias = state.bias if state.bias is not None else torch.zeros_like(ones)
    return weight.clone(), bias.clone()


def statistics_aware_affine(
    state: NormState, groups: int, eps: float, centred: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Affine for a group-statistics norm (GroupNorm, LayerNorm, InstanceNorm) whose expected output
    equals the eval-mode BatchNorm's.

    BatchNorm in eval computes, per channel :math:`c`,
    :math:`y = \gamma_c (x - \mu_c)/s_c + \beta_c` with :math:`s_c = \sqrt{\sigma_c^2 + \epsilon}` from
    the running statistics. Treat the running statistics as the distribution of :math:`x_c`. A norm
    over a group :math:`g` of channels (and positions) subtracts the group mean and divides by the group
    standard deviation; for inputs from that distribution their expectations are the mixture moments

    .. math:: m_g = \frac{1}{|g|}\sum_{c \in g}\mu_c, \qquad
              v_g = \frac{1}{|g|}\sum_{c \in g}(\sigma_c^2 + \mu_c^2) - m_g^2 .

    The new layer computes :math:`y' = \gamma'_c (x - m_g)/t_g + \beta'_c` with
    :math:`t_g = \sqrt{v_g + \epsilon'}`. Both are affine in :math:`x`; equating slope and intercept gives

    .. math:: \gamma'_c = \gamma_c\, t_g / s_c, \qquad \beta'_c = \beta_c + \gamma_c (m_g - \mu_c)/s_c ,

    so :math:`y' = y` whenever a sample's group moments equal their expectations. With one channel per
    group (InstanceNorm) :math:`m_g = \mu_c` and :math:`v_g = \sigma_c^2`, and it reduces to the affine copy:
    the running variance mixes between-sample and within-sample spread, which the statistics cannot
    separate. A norm that does not centre (``centred=False``, :class:`~normswap.layers.GroupRMSNorm`)
    divides by the root mean square instead: :math:`m_g = 0` and :math:`v_g` is the group's mean of
    :math:`\sigma_c^2 + \mu_c^2`. Computed in float64, returned in the layer's dtype.
    """
    return statistics_aware_affines([state], [groups], [eps], [centred])[0]


def statistics_aware_affines(
    states: Sequence[NormState],
    groups: Sequence[int],
    eps: Sequence[float],
    centred: Sequence[bool] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`statistics_aware_affine` for many sites at once: one computation over all their channels
    (per device), where one per site cost a tenth of a small network's conversion in NumPy's and
    torch's per-call overhead."""
    centres = [True] * len(states) if centred is None else list(centred)
    return _per_device(states, lambda ix: _statistics_aware_on_one_device(
        [states[i] for i in ix], [groups[i] for i in ix], [eps[i] for i in ix], [centres[i] for i in ix]
    ))


def _per_device(states: Sequence[NormState], run: Callable[[list[int]], list[R]]) -> list[R]:
    """``run(indices)`` once for the sites on each device; the answers in the sites' order."""
    out: list[R] = [None] * len(states)  # type: ignore[list-item]
    by_device: dict[torch.device, list[int]] = {}
    for i, state in enumerate(states):
        by_device.setdefault(state.device, []).append(i)
    for indices in by_device.values():
        for i, answer in zip(indices, run(indices), strict=True):
            out[i] = answer
    return out


def _statistics_aware_on_one_device(
    states: list[NormState], groups: list[int], eps: list[float], centred: list[bool]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    for state in states:
        assert state.running_mean is not None and state.running_var is not None  # resolve_transfer guarantees
    sizes = np.array([state.num_features for state in states])
    group_counts = np.array(groups)
    per_group = np.repeat(sizes // group_counts, group_counts)  # channels in each group, all sites in a row
    starts = np.concatenate(([0], np.cumsum(per_group)[:-1]))
    mu = _float64_concat([state.running_mean for state in states])
    var = np.maximum(_float64_concat([state.running_var for state in states]), 0)
    gamma = _float64_concat([state.weight if state.weight is not None else _filled(state, 1.0) for state in states])
    beta = _float64_concat([state.bias if state.bias is not None else _filled(state, 0.0) for state in states])
    s_c = np.sqrt(var + np.repeat([state.eps for state in states], sizes))
    m_g = np.add.reduceat(mu, starts) / per_group * np.repeat(np.asarray(centred, dtype=np.float64), group_counts)
    v_g = np.maximum(np.add.reduceat(var + mu * mu, starts) / per_group - m_g * m_g, 0)
    t_g = np.sqrt(v_g + np.repeat(np.asarray(eps, dtype=np.float64), group_counts))
    weight = gamma * np.repeat(t_g, per_group) / s_c
    bias = beta + gamma * (np.repeat(m_g, per_group) - mu) / s_c
    bounds = np.cumsum(sizes)[:-1]
    return [
        (_as_layer_tensor(w, state), _as_layer_tensor(b, state))
        for state, w, b in zip(states, np.split(weight, bounds), np.split(bias, bounds), strict=True)
    ]


def _filled(state: NormState, value: float) -> torch.Tensor:
    assert state.running_mean is not None
    return torch.full((state.num_features,), value, dtype=torch.float64, device=state.running_mean.device)


def _float64_concat(tensors: list[torch.Tensor]) -> np.ndarray:
    if len(tensors) == 1:
        return _float64(tensors[0])
    return torch.cat([t.reshape(-1) for t in tensors]).to("cpu", torch.float64).numpy()


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _float64(t: torch.Tensor) -> np.ndarray:
    if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad:
        return t.numpy().astype(np.float64)  # one conversion instead of two torch operations
    return t.detach().to("cpu", torch.float64).numpy()


def _as_layer_tensor(values: np.ndarray, state: NormState) -> torch.Tensor:
    """A tensor with storage of its own (``values`` may be a view into all sites' channels)."""
    values = values.reshape(-1)
    if state.device.type == "cpu" and state.dtype in _NUMPY_DTYPES:
        return torch.from_numpy(values.astype(_NUMPY_DTYPES[state.dtype]))  # astype copies
    return torch.from_numpy(values.copy()).to(device=state.device, dtype=state.dtype)


def transferred_affines(
    states: Sequence[NormState],
    transfers: Sequence[str],
    groups: Sequence[int],
    eps: Sequence[float],
    centred: Sequence[bool],
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each new layer's (weight, bias) for its resolved transfer; None leaves the fresh initialisation.
    The statistics-aware ones are computed together; ``standardize`` is the statistics-aware affine of
    the standardized site (its producer is rebuilt by :func:`standardize_all`)."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [
        affine_copy(state) if transfer == "affine" else None for state, transfer in zip(states, transfers, strict=True)
    ]
    aware = [i for i, transfer in enumerate(transfers) if transfer in ("statistics", "standardize")]
    pairs = statistics_aware_affines(
        [state_after(states[i], transfers[i]) for i in aware],
        [groups[i] for i in aware],
        [eps[i] for i in aware],
        [centred[i] for i in aware],
    )
    for i, pair in zip(aware, pairs, strict=True):
        out[i] = pair
    return out


def state_after(state: NormState, transfer: str) -> NormState:
    """The site's BatchNorm as the converted network computes it: with ``standardize`` its statistics
    are already folded into the producer (:func:`standardized_state`), otherwise it is unchanged."""
    return standardized_state(state) if transfer == "standardize" else state


def standardized_state(state: NormState) -> NormState:
    """The site as the new layer sees it once :func:`standardize_all` has folded ``(x − μ)/s`` into the
    producer: every channel has mean 0 and variance r = σ²/(σ² + ε), and BatchNorm's output is γ·x + β.
    Written as a BatchNorm of those statistics (weight γ·√(r + ε′), tiny ε′) so that
    :func:`statistics_aware_affines` of it gives the affine that reproduces BatchNorm in expectation."""
    assert state.running_var is not None
    tiny = 1e-12
    var = state.running_var.double().clamp_min(0)
    ratio = var / (var + state.eps)
    gamma = state.weight.double() if state.weight is not None else torch.ones_like(ratio)
    return replace(
        state,
        running_mean=torch.zeros_like(state.running_var),
        running_var=ratio.to(state.running_var.dtype),
        eps=tiny,
        weight=(gamma * (ratio + tiny).sqrt()).to(state.dtype),
    )


def standardize_all(producers: Sequence[nn.Module], states: Sequence[NormState]) -> list[nn.Module]:
    """Copies of the producers whose outputs are standardized by the BatchNorm running statistics that
    follow them, ``(x − μ)/s``: folding without the affine."""
    return fold_all(producers, [replace(state, weight=None, bias=None) for state in states])


def fold_into(producer: nn.Module, state: NormState) -> nn.Module:
    """A copy of ``producer`` (Conv1d/2d/3d, Linear, or ConvTranspose with one group) with the
    eval-mode BatchNorm that follows it folded in: ``W' = W·γ/s``, ``b' = (b − μ)·γ/s + β``."""
    return fold_all([producer], [state])[0]


def fold_all(producers: Sequence[nn.Module], states: Sequence[NormState]) -> list[nn.Module]:
    """:func:`fold_into` for many sites: the per-channel factors of all sites on a device are computed
    together (a dozen tensor operations per site were a sixth of a small network's conversion)."""
    for state in states:
        assert state.running_mean is not None and state.running_var is not None  # the fold target checks

    def fold(indices: list[int]) -> list[nn.Module]:
        factors = _fold_factors([producers[i] for i in indices], [states[i] for i in indices])
        return [_fused(producers[i], scale, bias) for i, (scale, bias) in zip(indices, factors, strict=True)]

    return _per_device(states, fold)


def _fold_factors(producers: list[nn.Module], states: list[NormState]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per site, in float64: ``γ/s`` and ``(b − μ)·γ/s + β`` (elementwise, so computing them over all
    sites' channels at once gives each the numbers it would get alone)."""
    def column(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1).double() for v in values])

    gamma, beta = (column(list(pair)) for pair in zip(*(affine_copy(state) for state in states), strict=True))
    var = column([state.running_var for state in states])  # type: ignore[misc]
    mean = column([state.running_mean for state in states])  # type: ignore[misc]
    eps = torch.cat([torch.full((s.num_features,), s.eps, dtype=torch.float64, device=mean.device) for s in states])
    old_bias = column([p.bias if p.bias is not None else torch.zeros_like(s.running_mean, dtype=torch.float64)
                       for p, s in zip(producers, states, strict=True)])  # type: ignore[arg-type]
    scale = gamma / (var + eps).sqrt()
    bias = (old_bias - mean) * scale + beta
    sizes = [state.num_features for state in states]
    return list(zip(scale.split(sizes), bias.split(sizes), strict=True))


def _fused(producer: nn.Module, scale: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    fused = _copy_without_parameters(producer)
    old = producer.weight
    # The weight product in at least float32, where one rounding per element is already exact to the
    # dtype (and resnet50's 25M weights stay cheap); the factors came in float64.
    compute = torch.promote_types(old.dtype, torch.float32)
    out_dim = 1 if isinstance(producer, nn.modules.conv._ConvTransposeNd) else 0
    shape = [1] * old.ndim
    shape[out_dim] = -1
    with torch.no_grad():
        weight = old.detach().to(compute) * scale.to(compute).view(shape)
        if weight.dtype != old.dtype or weight.stride() != old.stride():
            # empty_like keeps the original weight's memory format (channels-last convs stay channels-last).
            weight = torch.empty_like(old).copy_(weight)
        fused.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    # copy: ``bias`` is a view into all sites' factors
    fused.bias = nn.Parameter(bias.to(old.dtype, copy=True), requires_grad=old.requires_grad)
    return fused


def _copy_without_parameters(module: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter table; the new parameters are set by the caller. Much
    cheaper than deepcopy, and the original stays untouched."""
    clone = shallow_copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _known_linear_in_weight() -> tuple[type[nn.Module], ...]:
    """Conv subclasses whose forward uses ``self.weight`` and ``self.bias`` linearly, so folding into
    them is exact. Others (timm's StdConv2d re-standardizes its weight) are not folded into."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return ()
    return (Conv2dSame,)


def inherits_linear_forward(module: nn.Module) -> bool:
    """A subclass of a torch conv/linear that computes exactly what its base does: neither ``forward``
    nor ``_conv_forward`` overridden, and no parametrized weight (Hugging Face's
    ``EfficientNetDepthwiseConv2d`` only sets ``groups``). Folding into it is as exact as into the base."""
    cls = type(module)
    base = next((b for b in cls.__mro__ if b in _FOLDABLE), None)
    if base is None or cls is base or hasattr(module, "parametrizations"):
        return False
    return cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)


def foldable_out_channels(producer: nn.Module) -> int | None:
    """Output channels of a producer normswap can fold into exactly, else None."""
    if type(producer) not in _FOLDABLE and type(producer) not in _known_linear_in_weight() \
            and not inherits_linear_forward(producer):
        return None
    if isinstance(producer, nn.modules.conv._ConvTransposeNd):
        return producer.out_channels if producer.groups == 1 else None
    if isinstance(producer, nn.modules.conv._ConvNd):
        return producer.out_channels
    return producer.out_features

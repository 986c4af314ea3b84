"""What a BatchNorm site can become: a registry of named targets users can extend.

A target does two things. ``resolve`` checks that it applies to a site and fills in every option
(groups, transfer, …), so a plan entry is complete and replays the same way on a fresh model; it raises
:class:`NotApplicable` with the reason when it does not apply, and the rule's ``fallback`` decides what
happens then. ``build`` makes the replacement modules from the site's numbers. timm norm+activation
modules keep their activation and drop layer.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import PlanError, RecipeError, unknown_name
from .layers import (
    AnnealedGroupNorm,
    AnnealedGroupNormAct,
    ChannelLayerNorm,
    FrozenBatchNorm,
    FrozenBatchNormAct,
    GroupRMSNorm,
    GroupRMSNormAct,
)
from .tracing import set_mode
from .transfer import (
    TRANSFERS,
    NormState,
    affine_copy,
    fold_all,
    foldable_out_channels,
    resolve_transfer,
    standardize_all,
    transferred_affines,
)
from .types import Site


BuildItem = tuple[Site, NormState, Mapping[str, Any]]


class NotApplicable(Exception):
    """A target does not apply to a site; the message is the reason shown in the plan."""


@dataclass(frozen=True)
class Option:
    """One target option: its type, default and (optionally) the allowed values."""

    kind: type | tuple[type, ...]
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None

    def check(self, value: Any, where: str) -> Any:
        if isinstance(value, bool) and self.kind is int:
            raise RecipeError(f"{where}: expected an integer, got {value!r}.")
        if value is not None and not isinstance(value, self.kind):
            names = self.kind.__name__ if isinstance(self.kind, type) else "/".join(k.__name__ for k in self.kind)
            raise RecipeError(f"{where}: expected {names}, got {type(value).__name__} {value!r}.")
        if self.choices is not None and value not in self.choices:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, self.choices))}.")
        return value


_TRANSFER_OPTION = Option(
    str,
    "auto",
    "affine | statistics | standardize | none; auto = statistics where running statistics exist, else affine; "
    "standardize folds the running statistics into the producing conv/linear (statistics where there is none)",
    TRANSFERS,
)
_EPS_OPTION = Option(
    (float, int, type(None)),
    None,
    "the new layer's eps (None: the BatchNorm's). After transfer 'standardize' channels have unit variance, so "
    "eps ≥ 1 damps the per-sample rescaling",
)


class Target(abc.ABC):
    """A replacement for BatchNorm sites. Subclass, then :func:`register_target` an instance."""

    name: ClassVar[str]
    description: ClassVar[str]
    removes_batchnorm: ClassVar[bool] = True
    keeps_running_stats: ClassVar[bool] = False
    options: ClassVar[Mapping[str, Option]] = {}

    def check_options(self, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Validate option names and types (recipe load time); returns them with defaults filled."""
        for key in options:
            if key not in self.options:
                raise unknown_name(f"option of target {self.name!r}", key, self.options, where)
        return {k: spec.check(options.get(k, spec.default), f"{where}.{k}") for k, spec in self.options.items()}

    @abc.abstractmethod
    def resolve(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        """Complete options for this site, or raise NotApplicable."""

    @abc.abstractmethod
    def build(self, model: nn.Module, site: Site, state: NormState, options: Mapping[str, Any]) -> dict[str, nn.Module]:
        """Replacement modules by path (the site's own path, and for folding the producer's)."""

    def build_all(self, model: nn.Module, items: Sequence[BuildItem]) -> list[dict[str, nn.Module]]:
        """``build`` for several sites, in order. Targets whose work is cheaper done together override it."""
        return [self.build(model, site, state, options) for site, state, options in items]

    def replaces(self, site: Site, options: Mapping[str, Any]) -> tuple[str, ...]:
        """Paths ``build`` always returns a replacement for. Conversion copies the model without copying
        their tensors (they are read, then dropped), so a target must build every path it names here."""
        return (site.path,)


def finish(module: nn.Module, state: NormState) -> nn.Module:
    """Put a new module on the old one's device and dtype, mode and trainability."""
    if any(t.device != state.device or t.dtype != state.dtype for t in _own_tensors(module)):
        module.to(device=state.device, dtype=state.dtype)
    for p in module._parameters.values():
        if p is not None:
            p.requires_grad_(state.requires_grad)
    set_mode(module, state.training)
    return module


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def set_affine(module: nn.Module, values: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Install (weight, bias) as the module's affine parameters; they already have its dtype and device."""
    if values is None or getattr(module, "weight", None) is None:
        return
    for name, value in zip(("weight", "bias"), values, strict=True):
        old = module._parameters[name]
        assert old is not None and old.shape == value.shape and old.dtype == value.dtype
        # Written into the parameter table directly: setattr's checks cost more than the rest of the
        # build on a network of hundreds of small norms, and this module is fresh, with no hooks yet.
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)


def copy_batchnorm_numbers(module: nn.Module, state: NormState) -> None:
    """Copy the BatchNorm's affine (ones/zeros where it had none) and running statistics into the
    same-named tensors of a layer that keeps them (frozen, annealed)."""
    assert state.running_mean is not None and state.running_var is not None
    weight, bias = affine_copy(state)
    with torch.no_grad():
        for name, value in (("weight", weight), ("bias", bias), ("running_mean", state.running_mean),
                            ("running_var", state.running_var)):
            getattr(module, name).copy_(value)


def with_activation(norm: nn.Module, state: NormState) -> nn.Module:
    """timm norm+act modules: reuse the original activation and drop layer objects."""
    if state.act is not None:
        norm.act = state.act
    if state.drop is not None:
        norm.drop = state.drop
    return norm


def activation_only(state: NormState) -> nn.Module:
    """What remains of a norm+act module once the norm is gone (folded or removed)."""
    parts = [m for m in (state.drop, state.act) if m is not None and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _unfoldable(site: Site) -> str:
    """Why the BatchNorm's numbers cannot be folded into its producer ('' when they can)."""
    if site.kind != "module":
        return "only module sites are folded"
    if site.producer is None or not site.producer_foldable:
        what = f"{site.producer} ({site.producer_cls})" if site.producer else "unknown"
        return f"producer {what} is not a conv/linear with {site.num_features} outputs to fold into"
    if not site.producer_exclusive:
        return f"producer {site.producer} is shared or feeds other nodes too"
    if site.producer_cls == "Linear" and site.layout != "features":
        return "a Linear folds only into BatchNorm over N×C features"
    return ""


def _producer_module(model: nn.Module, site: Site, options: Mapping[str, Any]) -> nn.Module:
    from .tracing import resolve_attr

    producer = resolve_attr(model, options["producer"])
    channels = foldable_out_channels(producer)
    if channels != site.num_features:
        raise PlanError(
            f"{site.path}: cannot fold into {options['producer']} ({type(producer).__name__}, "
            f"{channels} output channels) — it needs a conv/linear with {site.num_features}."
        )
    return producer


class _GroupStatNorm(Target):
    """Targets that normalize by per-sample statistics over groups of channels."""

    options: ClassVar[Mapping[str, Option]] = {"transfer": _TRANSFER_OPTION, "eps": _EPS_OPTION}
    # Whether the norm subtracts the group mean (all but the RMS norms do).
    centres: ClassVar[bool] = True

    def resolve(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        self.check_layout(site)
        transfer = resolve_transfer(options.get("transfer", "auto"), site.has_running_stats)
        if transfer in ("statistics", "standardize") and not site.has_running_stats:
            raise NotApplicable(f"transfer {transfer!r} needs running statistics and this site has none")
        standardize = {}
        if transfer == "standardize":
            # Where there is no conv/linear of this site's own to fold into, the statistics-aware transfer
            # is the next best; the plan shows which one each site got.
            if _unfoldable(site):
                transfer = "statistics"
            else:
                standardize = {"producer": site.producer}
        # The statistics-aware transfers need an affine to carry their correction.
        affine = site.affine or transfer in ("statistics", "standardize")
        eps = options.get("eps")
        if eps is not None and not eps > 0:
            raise PlanError(f"{site.path}: eps must be positive, got {eps!r}.")
        chosen = {"eps": float(eps)} if eps is not None else {}
        return {"transfer": transfer, "affine": affine} | standardize | chosen | self.extra(site, options)

    def replaces(self, site: Site, options: Mapping[str, Any]) -> tuple[str, ...]:
        if options.get("transfer") == "standardize":
            return (site.path, str(options["producer"]))
        return (site.path,)

    def check_layout(self, site: Site) -> None:
        if site.num_features < 1:
            raise NotApplicable("the number of channels is unknown")

    def extra(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def groups(self, site: Site, options: Mapping[str, Any]) -> int:
        raise NotImplementedError

    @abc.abstractmethod
    def make(self, site: Site, state: NormState, options: Mapping[str, Any]) -> nn.Module:
        """The bare new norm module (activation handled by the caller)."""

    def build(self, model: nn.Module, site: Site, state: NormState, options: Mapping[str, Any]) -> dict[str, nn.Module]:
        return self.build_all(model, [(site, state, options)])[0]

    def build_all(self, model: nn.Module, items: Sequence[BuildItem]) -> list[dict[str, nn.Module]]:
        affines = transferred_affines(
            [state for _, state, _ in items],
            [options["transfer"] for _, _, options in items],
            [self.groups(site, options) for site, _, options in items],
            [norm_eps(state, options) for _, state, options in items],
            [self.centres] * len(items),
        )
        built = []
        for (site, state, options), affine in zip(items, affines, strict=True):
            module = finish(self.make(site, state, options), state)
            set_affine(module, affine)
            built.append({site.path: with_activation(module, state)})
        standardized = [i for i, (_, _, options) in enumerate(items) if options["transfer"] == "standardize"]
        producers = standardize_all(
            [_producer_module(model, items[i][0], items[i][2]) for i in standardized],
            [items[i][1] for i in standardized],
        )
        for i, producer in zip(standardized, producers, strict=True):
            built[i][str(items[i][2]["producer"])] = producer
        return built


def norm_eps(state: NormState, options: Mapping[str, Any]) -> float:
    eps = options.get("eps")
    return state.eps if eps is None else float(eps)


def largest_divisor_at_most(n: int, limit: int) -> int:
    return next(d for d in range(min(n, max(limit, 1)), 0, -1) if n % d == 0)


class GroupNormTarget(_GroupStatNorm):
    name = "groupnorm"
    description = "GroupNorm (Wu & He 2018): groups of channels per sample; 32 groups by default"
    options = {
        "groups": Option(int, 32, "number of groups (Wu & He: 32 best)"),
        "channels_per_group": Option((int, type(None)), None, "channels per group instead of groups"),
        "adjust": Option(
            str, "largest-divisor", "when groups do not divide C: largest-divisor | error", ("largest-divisor", "error")
        ),
        "transfer": _TRANSFER_OPTION,
        "eps": _EPS_OPTION,
    }

    def extra(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        c = site.num_features
        per = options.get("channels_per_group")
        if (per is not None and per < 1) or options.get("groups", 32) < 1:
            raise PlanError(f"{site.path}: groups and channels_per_group must be positive integers.")
        wanted = max(c // per, 1) if per else options.get("groups", 32)
        divides = (c % per == 0) if per else (c % wanted == 0)
        if divides:
            return {"groups": wanted}
        if options.get("adjust", "largest-divisor") == "error":
            what = f"channels_per_group={per}" if per else f"groups={wanted}"
            valid = [d for d in range(1, min(c, 64) + 1) if c % d == 0]
            raise NotApplicable(f"{what} does not divide {c} channels (divisors up to 64: {valid})")
        return {"groups": largest_divisor_at_most(c, max(wanted, 1))}

    def groups(self, site: Site, options: Mapping[str, Any]) -> int:
        return int(options["groups"])

    def make(self, site: Site, state: NormState, options: Mapping[str, Any]) -> nn.Module:
        eps = norm_eps(state, options)
        if state.act is not None:
            from timm.layers import GroupNormAct

            return GroupNormAct(
                site.num_features, int(options["groups"]), eps=eps, affine=options["affine"], apply_act=False
            )
        return nn.GroupNorm(int(options["groups"]), site.num_features, eps=eps, affine=options["affine"])


class LayerNormTarget(_GroupStatNorm):
    name = "layernorm"
    description = "LayerNorm over C at each position: per token/step for sequences, per pixel for images"

    def groups(self, site: Site, options: Mapping[str, Any]) -> int:
        return 1

    def make(self, site: Site, state: NormState, options: Mapping[str, Any]) -> nn.Module:
        eps = norm_eps(state, options)
        c, affine = site.num_features, options["affine"]
        if state.act is not None:
            from timm.layers import LayerNormAct2d

            return LayerNormAct2d(c, eps=eps, affine=affine, apply_act=False)
        if site.layout == "features" and not site.layout_inferred:
            return nn.LayerNorm(c, eps=eps, elementwise_affine=affine)
        # Over dim 1 whatever the rank, so also right for a BatchNorm1d whose layout was only guessed.
        return ChannelLayerNorm(c, eps=eps, affine=affine)


class LayerNormCHWTarget(_GroupStatNorm):
    name = "layernorm-chw"
    description = "LayerNorm over C×H×W (all of a sample): GroupNorm with one group"

    def groups(self, site: Site, options: Mapping[str, Any]) -> int:
        return 1

    def make(self, site: Site, state: NormState, options: Mapping[str, Any]) -> nn.Module:
        eps = norm_eps(state, options)
        if state.act is not None:
            from timm.layers import GroupNorm1Act

            return GroupNorm1Act(site.num_features, eps=eps, affine=options["affine"], apply_act=False)
        return nn.GroupNorm(1, site.num_features, eps=eps, affine=options["affine"])


class RMSNormCHWTarget(_GroupStatNorm):
    name = "rmsnorm-chw"
    description = (
        "RMSNorm over C×H×W (all of a sample), per-channel affine: LayerNorm over C×H×W without the centring"
    )
    centres = False

    def groups(self, site: Site, options: Mapping[str, Any]) -> int:
        return 1

    def make(self, site: Site, state: NormState, options: Mapping[str, Any]) -> nn.Module:
        layer = GroupRMSNormAct if state.act is not None else GroupRMSNorm
        return layer(1, site.num_features, eps=norm_eps(state, options), affine=options["affine"])


_INSTANCE_NORMS: dict[str, type[nn.Module]] = {
    "sequence": nn.InstanceNorm1d,
    "image": nn.InstanceNorm2d,
    "volume": nn.InstanceNorm3d,
}


class InstanceNormTarget(_GroupStatNorm):
    name = "instancenorm"
    description = "InstanceNorm with affine: each channel of each sample over its positions (style transfer, GANs)"

    def check_layout(self, site: Site) -> None:
        if site.layout not in _INSTANCE_NORMS:
            raise NotApplicable(f"instancenorm needs positions to normalize over; layout is {site.layout}")

    def resolve(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        resolved = super().resolve(site, options)
        return resolved | {"affine": True}

    def groups(self, site: Site, options: Mapping[str, Any]) -> int:
        return site.num_features

    def make(self, site: Site, state: NormState, options: Mapping[str, Any]) -> nn.Module:
        eps = norm_eps(state, options)
        if state.act is not None:
            from timm.layers import GroupNormAct  # GroupNorm with C groups is InstanceNorm with affine

            return GroupNormAct(site.num_features, site.num_features, eps=eps, affine=True, apply_act=False)
        return _INSTANCE_NORMS[site.layout](site.num_features, eps=eps, affine=True)


class AnnealedGroupNormTarget(Target):
    name = "annealed-groupnorm"
    description = (
        "the BatchNorm frozen as it is, becoming GroupNorm as the network trains: statistics kept as buffers, "
        "eps annealed from eps_start (keeps the original) to eps_end and the group mean subtracted (centre) over "
        "the first anneal_steps train-mode forwards"
    )
    options = {
        "groups": Option(int, 32, "channel groups (Wu & He: 32)"),
        "adjust": Option(str, "one-group", "when groups do not divide C: one-group (all of C×H×W, what was "
                                           "measured) | largest-divisor (narrow layers get groups of one or two "
                                           "channels)", ("one-group", "largest-divisor")),
        "eps_start": Option((float, int), 100.0, "eps at the first train step, relative to unit channel variance "
                                                 "(before it the layer is the frozen BatchNorm exactly)"),
        "eps_end": Option((float, int), 1e-3, "eps once annealed: small normalizes each sample's groups"),
        "anneal_steps": Option(int, 200, "train-mode forwards over which the layer moves from the frozen "
                                         "BatchNorm to the group norm; 0 moves at the first"),
        "centre": Option(bool, True, "subtract the group mean at the end (GroupNorm); false: an RMS norm"),
    }

    def resolve(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        if not site.has_running_stats:
            raise NotApplicable("no running statistics to start from")
        if site.num_features < 1:
            raise NotApplicable("the number of channels is unknown")
        eps_start, eps_end = float(options.get("eps_start", 100.0)), float(options.get("eps_end", 1e-3))
        steps, groups = int(options.get("anneal_steps", 200)), int(options.get("groups", 32))
        if not (eps_start > 0 and eps_end > 0):
            raise PlanError(f"{site.path}: eps_start and eps_end must be positive, got {eps_start} and {eps_end}.")
        if steps < 0 or groups < 1:
            raise PlanError(f"{site.path}: anneal_steps must be ≥ 0 and groups ≥ 1, got {steps} and {groups}.")
        c = site.num_features
        if c % groups:
            groups = largest_divisor_at_most(c, groups) if options.get("adjust") == "largest-divisor" else 1
        return {"groups": groups, "eps_start": eps_start,
                "eps_end": eps_end, "anneal_steps": steps, "centre": bool(options.get("centre", True)),
                "transfer": "exact"}

    def build(self, model: nn.Module, site: Site, state: NormState, options: Mapping[str, Any]) -> dict[str, nn.Module]:
        layer = AnnealedGroupNormAct if state.act is not None else AnnealedGroupNorm
        module = layer(int(options["groups"]), site.num_features, eps_start=float(options["eps_start"]),
                       eps_end=float(options["eps_end"]), anneal_steps=int(options["anneal_steps"]),
                       centre=bool(options["centre"]), bn_eps=state.eps)
        copy_batchnorm_numbers(finish(module, state), state)
        return {site.path: with_activation(module, state)}


class FrozenTarget(Target):
    name = "frozen"
    description = "FrozenBatchNorm: running statistics and affine fixed; eval-mode BN in every mode"
    keeps_running_stats = True

    def resolve(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        if not site.has_running_stats:
            raise NotApplicable("no running statistics to freeze")
        if site.frozen:
            raise NotApplicable(f"{site.short_cls} is frozen already")
        return {"transfer": "exact"}

    def build(self, model: nn.Module, site: Site, state: NormState, options: Mapping[str, Any]) -> dict[str, nn.Module]:
        assert state.running_mean is not None and state.running_var is not None
        # Any rank, the site's activation kept (timm's FrozenBatchNormAct2d is 4-D and two passes).
        layer = FrozenBatchNormAct if state.act is not None else FrozenBatchNorm
        module: nn.Module = layer(site.num_features, eps=state.eps)
        module.to(device=state.device, dtype=state.dtype).train(state.training)
        copy_batchnorm_numbers(module, state)
        return {site.path: with_activation(module, state) if state.act is not None else module}


class FoldTarget(Target):
    name = "fold"
    description = "fold into the producing conv/linear for inference (exact); BatchNorm disappears"

    def resolve(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        if not site.has_running_stats:
            raise NotApplicable("no running statistics to fold")
        reason = _unfoldable(site)
        if reason:
            raise NotApplicable(reason)
        return {"producer": site.producer, "transfer": "fold"}

    def replaces(self, site: Site, options: Mapping[str, Any]) -> tuple[str, ...]:
        return (site.path, str(options["producer"]))

    def build(self, model: nn.Module, site: Site, state: NormState, options: Mapping[str, Any]) -> dict[str, nn.Module]:
        return self.build_all(model, [(site, state, options)])[0]

    def build_all(self, model: nn.Module, items: Sequence[BuildItem]) -> list[dict[str, nn.Module]]:
        producers = [_producer_module(model, site, options) for site, _, options in items]
        fused = fold_all(producers, [state for _, state, _ in items])
        return [
            {options["producer"]: conv, site.path: activation_only(state)}
            for (site, state, options), conv in zip(items, fused, strict=True)
        ]


class IdentityTarget(Target):
    name = "identity"
    description = "remove the norm (its activation, if any, stays)"

    def resolve(self, site: Site, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"transfer": "none"}

    def build(self, model: nn.Module, site: Site, state: NormState, options: Mapping[str, Any]) -> dict[str, nn.Module]:
        return {site.path: activation_only(state)}


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target, *, overwrite: bool = False) -> Target:
    """Make ``target`` usable by name in recipes and the API."""
    if not isinstance(target, Target):
        raise TypeError(f"register_target expects a Target instance, got {type(target).__name__}.")
    if target.name in _REGISTRY and not overwrite:
        raise PlanError(f"target {target.name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[target.name] = target
    return target


def get_target(name: str, where: str = "") -> Target:
    """The registered target called ``name``; an unknown name raises ``UnknownNameError`` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise unknown_name("target", name, _REGISTRY, where) from None


def list_targets() -> list[str]:
    """The names of the registered targets, built-in and added by :func:`register_target`."""
    return sorted(_REGISTRY)


for _t in (
    GroupNormTarget(),
    LayerNormTarget(),
    LayerNormCHWTarget(),
    RMSNormCHWTarget(),
    InstanceNormTarget(),
    AnnealedGroupNormTarget(),
    FrozenTarget(),
    FoldTarget(),
    IdentityTarget(),
):
    register_target(_t)

"""Copying a model for conversion, faster than ``copy.deepcopy``.

``copy.deepcopy`` reconstructs every module through ``__reduce_ex__``, which costs more than a
batch-1 forward pass for small networks. A plain ``nn.Module`` (one that customises none of the copy
or pickle hooks) is copied here by duplicating its ``__dict__`` directly: parameters and buffers are
deep-copied as ``deepcopy`` would, child modules recursively, immutable values shared and anything
else deep-copied with the same memo, so aliasing (a module or tensor reachable twice) is kept. A
module with its own copy or pickle hooks (an ``fx.GraphModule``, an RNN) goes through ``deepcopy``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Collection
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

_IMMUTABLE = frozenset(
    (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, torch.layout, type)
)
_COPY_HOOKS = ("__deepcopy__", "__copy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")
# torch's own hooks that only fill in attributes missing from old pickles: on a live module, whose
# __dict__ has them all, they do what nn.Module's do (convolutions are the common case).
_DEFAULTS_ONLY_SETSTATE = frozenset(
    cls.__dict__["__setstate__"] for cls in (nn.modules.conv._ConvNd, nn.Softmax, nn.Softmin, nn.LogSoftmax)
)
_PLAIN: dict[type, bool] = {}
_CONTAINERS = frozenset((dict, OrderedDict, set, list))


def clone_model(model: M, borrow: Collection[nn.Module] = ()) -> M:
    """What ``copy.deepcopy(model)`` gives: no tensor, module or container shared with ``model``.

    ``borrow``: modules about to be replaced in the copy, whose own parameters and buffers the copy
    may share with ``model`` instead of copying them (a tensor also held by any other module is still
    copied). The caller must replace every such module in the copy and empty the replaced copies
    (``apply_plan`` does). In a small network BatchNorm holds most of the tensors, all thrown away.
    """
    # deepcopy keeps what it copied alive under memo[id(memo)], so no id is reused during the copy.
    memo: dict[int, Any] = {}
    memo[id(memo)] = []
    lent = _clone_tensors(model, memo, {id(m) for m in borrow})
    return _clone(model, memo, lent)


def shallow_copy(module: M) -> M:
    """``copy.copy(module)``: the same attribute values in a new object. For a plain module (one with
    none of the copy or pickle hooks of its own) without ``copy``'s trip through ``__reduce_ex__``,
    which costs several times as much."""
    cls = type(module)
    if not _is_plain(cls):
        return copy.copy(module)
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _clone_tensors(model: nn.Module, memo: dict[int, Any], lent: set[int]) -> frozenset[int]:
    """Parameters and buffers that own their storage alone are cloned directly into the memo, the
    way ``deepcopy`` would copy them, at a tenth of its cost; tensors sharing a storage (views,
    tied storages) and anything unusual are left to ``deepcopy``, which keeps the sharing. Returns
    the ids of the tensors held only by modules in ``lent``: those stay out of the memo and are shared
    only where those modules hold them (a plain attribute pointing at one still gets a copy)."""
    tensors: dict[int, torch.Tensor] = {}
    only_lent: dict[int, bool] = {}
    for m in model.modules():
        in_lent = id(m) in lent
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                key = id(t)
                tensors[key] = t
                only_lent[key] = only_lent.get(key, True) and in_lent
    storages: dict[int, int] = {}
    for t in tensors.values():
        if t.layout == torch.strided and not t.is_meta:
            key = t.untyped_storage().data_ptr()
            storages[key] = storages.get(key, 0) + 1
    for key, t in tensors.items():
        if not only_lent[key] and _plain_tensor(t) and storages.get(t.untyped_storage().data_ptr()) == 1:
            memo[key] = _clone_tensor(t)
            memo[id(memo)].append(t)
    return frozenset(key for key, only in only_lent.items() if only)


def _plain_tensor(t: torch.Tensor) -> bool:
    kind = type(t)
    return (
        (kind is torch.Tensor or kind is nn.Parameter)
        and t.layout == torch.strided
        and not t.is_meta
        and t.is_leaf
        and t.grad is None
        and not t.__dict__
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _clone_tensor(t: torch.Tensor) -> torch.Tensor:
    data = t.detach().clone(memory_format=torch.preserve_format)
    if type(t) is nn.Parameter:
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data.requires_grad_(t.requires_grad)


def _is_plain(cls: type) -> bool:
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = all(_module_default(cls, hook) for hook in _COPY_HOOKS) and not any(
            "__slots__" in vars(c) for c in cls.__mro__ if c is not object
        )
        _PLAIN[cls] = plain
    return plain


def _module_default(cls: type, hook: str) -> bool:
    own = getattr(cls, hook, None)
    return own is getattr(nn.Module, hook, None) or (hook == "__setstate__" and own in _DEFAULTS_ONLY_SETSTATE)


def _clone(module: Any, memo: dict[int, Any], lent: frozenset[int] = frozenset()) -> Any:
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if not _is_plain(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    memo[id(memo)].append(module)
    state = module.__dict__.copy()  # immutable values (most of a module's attributes) stay as copied
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _IMMUTABLE:
            continue
        if kind in _CONTAINERS and not value:  # its many empty hook tables
            state[key] = kind()
        elif key == "_modules":
            state[key] = kind((n, None if c is None else _clone(c, memo, lent)) for n, c in value.items())
        elif key in ("_parameters", "_buffers"):
            state[key] = kind((n, None if t is None else _tensor(t, memo, lent)) for n, t in value.items())
        else:
            state[key] = _value(value, memo)
    new.__dict__.update(state)
    return new


def _tensor(t: torch.Tensor, memo: dict[int, Any], lent: frozenset[int]) -> torch.Tensor:
    if id(t) in lent:
        return t
    done = memo.get(id(t))
    return done if done is not None else copy.deepcopy(t, memo)


def _value(value: Any, memo: dict[int, Any]) -> Any:
    """An attribute that is neither immutable nor an empty container (``_clone`` answers those inline)."""
    kind = type(value)
    if kind is tuple and all(type(v) in _IMMUTABLE for v in value):
        return value
    if kind is set and all(type(v) is str for v in value):  # _non_persistent_buffers_set
        return set(value)
    return copy.deepcopy(value, memo)

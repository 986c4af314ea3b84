"""Learning each site's context: a timm-aware fx trace for structure, one forward pass for shapes.

The trace gives the graph (producer, consumers, functional ``batch_norm`` calls); forward pre-hooks on
every BatchNorm module give input shape, dtype, memory format and call count, also for modules that
sit inside leaf modules the tracer does not enter. When the model will not trace whole (a detector's
top-level control flow), the largest submodules that do trace are traced instead (see
:func:`trace_parts`), and only what lies outside them is known from the hooks alone; the plan says
which sites were learned which way.

Sites are BatchNorm modules, functional ``batch_norm`` calls, and frozen BatchNorm layers from any
library (see :func:`is_frozen_batchnorm`).
"""

from __future__ import annotations

import bisect
import dataclasses
import dis
import functools
import inspect
import re
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _st
import torch.nn.functional as F
from torch import nn
from torch.fx.immutable_collections import immutable_dict
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.overrides import TorchFunctionMode

from .errors import TraceError, unknown_name
from .layers import AnnealedGroupNorm, GroupRMSNorm
from .types import LAYOUT_BY_NDIM, OtherNorm, Site

FUNCTIONAL_BATCH_NORMS: tuple[Callable[..., Any], ...] = (F.batch_norm, torch.batch_norm)
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
OWNER_META = "normswap_owner"  # node.meta key: the module a functional batch_norm call is made in
_OTHER_NORM_TYPES = (
    nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm, GroupRMSNorm, AnnealedGroupNorm,
)
# Norm layers from other libraries (timm RmsNorm, torchvision FrozenBatchNorm2d); not wrappers such as
# levit's ConvNorm, which merely contain a norm.
_OTHER_NORM_NAME = re.compile(r"^(Group|Layer|Instance|Rms|RMS|Frozen\w*Batch|Batch\w*Renorm)Norm")


FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_FROZEN_CHILDREN = frozenset(("act", "drop"))  # timm's FrozenBatchNormAct2d keeps its activation


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """Whether ``m`` is a frozen BatchNorm: a layer that normalizes with fixed per-channel statistics.

    The rule, whatever library the class comes from (torchvision's and timm's ``FrozenBatchNorm2d``,
    timm's ``FrozenBatchNormAct2d``, normswap's ``FrozenBatchNorm``, detectron2-style copies): not a
    torch BatchNorm; ``weight``, ``bias``, ``running_mean`` and ``running_var`` all buffers (so nothing
    is trained), 1-D and of one length C ≥ 1; no parameters; a numeric ``eps``; nothing that updates
    statistics (no ``momentum``, no ``num_batches_tracked``); no submodules but ``act``/``drop``. Such a
    layer computes the eval-mode BatchNorm of those buffers in every mode, which is what fold, the
    statistics-aware transfers and freezing rely on.
    """
    buffers = m._buffers
    mean = buffers.get("running_mean")
    if mean is None or isinstance(m, _BatchNorm):
        return False
    if any(buffers.get(n) is None or buffers[n].shape != mean.shape for n in FROZEN_BUFFERS):
        return False
    if mean.ndim != 1 or mean.numel() < 1 or "num_batches_tracked" in buffers:
        return False
    if any(p is not None for p in m._parameters.values()) or "momentum" in m.__dict__:
        return False
    eps = m.__dict__.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return False
    return all(name in _FROZEN_CHILDREN for name in m._modules)


def is_site_module(m: nn.Module) -> bool:
    """A module that is a site: a torch BatchNorm or a frozen BatchNorm."""
    return isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)


def site_features(m: nn.Module) -> int:
    """The channels a site module normalizes."""
    if isinstance(m, _BatchNorm):
        return int(m.num_features)
    return int(m._buffers["running_mean"].numel())  # type: ignore[union-attr]


def qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _timm_leaves() -> tuple[list[type[nn.Module]], list[Any]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is a dependency, but tracing plain torch models must not need it
        return [], []
    return list(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


@functools.lru_cache(maxsize=4096)
def _instructions(code: types.CodeType) -> tuple[tuple[int, ...], tuple[dis.Instruction, ...]]:
    found = tuple(dis.get_instructions(code))
    return tuple(i.offset for i in found), found


class _Proxy(fx.Proxy):
    """fx's Proxy, except that unpacking (``B, N, C = x.shape``) disassembles each function once:
    fx disassembles the caller at every unpack, a third of the trace time of levit-like models."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:
            return super().__iter__()
        offsets, found = _instructions(caller.f_code)
        index = bisect.bisect_left(offsets, caller.f_lasti)
        if index < len(found) and found[index].opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(found[index].argval))
        return self.tracer.iter(self)

    def __getattr__(self, k: str) -> fx.Proxy:
        # fx's own returns its Attribute, whose unpacking (``B, C, H, W = x.shape``, the common case)
        # went back to the slow path; same lazy node, same method-call peephole.
        return _Attribute(self, k)


class _Attribute(fx.proxy.Attribute, _Proxy):
    """fx's Attribute with :class:`_Proxy`'s unpacking."""


_PLAIN_ARGUMENTS = frozenset((int, float, bool, str, complex, type(None), type(...), torch.dtype, torch.device,
                              torch.memory_format, torch.layout))


class NormswapTracer(fx.Tracer):
    """fx tracer that keeps every site module (and timm's registered no-trace modules) as a leaf, and
    wraps timm's no-trace functions, so ``BatchNormAct2d`` stays one call_module node instead of
    dissolving into a functional call."""

    def __init__(self) -> None:
        leaves, functions = _timm_leaves()
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self._leaf_types = tuple(leaves)
        self._owners: list[str] = []  # paths of the modules being traced through, innermost last
        self._names_root: nn.Module | None = None  # the root the name tables below were built for
        self._names_by_id: dict[str, dict[int, str]] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """fx's ``Tracer.trace`` for a module, with two of its fixed costs gone (together a third of a
        small network's trace, where timm has 1,348 ``nn.Module`` subclasses loaded):

        - fx intercepts module calls and attribute reads by patching ``nn.Module.__call__`` and
          ``__getattr__``, and every assignment to a class attribute re-derives the slots of each
          subclass (~0.9 ms per trace). Here the same wrappers are set on the model's own module
          classes instead, which have few subclasses; where a class has its own ``__call__`` or
          ``__getattr__`` (or fx's internals are not the expected ones) fx's own ``trace`` runs.
        - fx maps every plain tensor attribute of every module to its name before tracing; here
          the table is built the first time a traced forward uses such a tensor, which most never do.

        Everything else is fx's, in fx's order; the graphs are the same (see tests).
        """
        own = _OWN_TRACE and isinstance(root, nn.Module)
        named = list(root.named_modules()) if own else []  # type: ignore[union-attr]
        classes = _module_classes(root, named) if own else None
        if classes is None:
            return super().trace(root, concrete_args)
        assert isinstance(root, nn.Module)
        was_tracing = _st._get_is_fx_tracing()
        _st._set_is_fx_tracing(True)
        try:
            return self._trace_module(root, classes, named, concrete_args)
        finally:
            _st._set_is_fx_tracing(was_tracing)

    def _trace_module(
        self, root: nn.Module, classes: list[type[nn.Module]], named: list[tuple[str, nn.Module]],
        concrete_args: dict[str, Any] | None = None,
    ) -> fx.Graph:
        from torch.fx._lazy_graph_module import _LazyGraphModule

        _LazyGraphModule.force_recompile(root)
        self.root = root
        fn = getattr(type(root), self.traced_func_name)
        self.root_module_name = root._get_name()
        self.submodule_paths = {mod: name for name, mod in named}
        self.graph = fx.Graph(tracer_cls=type(self))
        code = fn.__code__
        self.graph._co_fields = {
            "co_name": code.co_name, "co_filename": code.co_filename, "co_firstlineno": code.co_firstlineno,
        }
        self.tensor_attrs = _TensorAttributes(root)
        fn_globals = fn.__globals__  # before it is patched
        fn, args = self.create_args_for_root(fn, True, concrete_args)
        parameter_proxy_cache: dict[str, fx.Proxy] = {}

        def module_getattr_wrapper(mod: nn.Module, attr: str) -> Any:
            return self.getattr(attr, _st._orig_module_getattr(mod, attr), parameter_proxy_cache)

        def module_call_wrapper(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                return _st._orig_module_call(mod, *args, **kwargs)

            forward_globals = getattr(getattr(mod, "forward", mod), "__globals__", {})
            _autowrap_check(patcher, forward_globals, self._autowrap_function_ids)
            return self.call_module(mod, forward, args, kwargs)

        with _st._new_patcher() as patcher:
            for cls in classes:
                for name, wrapper in (("__getattr__", module_getattr_wrapper), ("__call__", module_call_wrapper)):
                    patcher.patches_made.append(_PatchedClassAttribute(cls, name, None, wrapper))
                    patcher.patches_made[-1].patch()
            _st._patch_wrapped_functions(patcher)
            _autowrap_check(patcher, fn_globals, self._autowrap_function_ids)
            for module in self._autowrap_search:
                _autowrap_check(patcher, module.__dict__, self._autowrap_function_ids)
            ann = inspect.get_annotations(inspect.unwrap(fn))
            self.create_node("output", "output", (self.create_arg(fn(*args)),), {}, type_expr=ann.get("return"))
        self.submodule_paths = None
        return self.graph

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_site_module(m) or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if isinstance(m, _LINEAR_BASES):  # a conv/linear subclass that only configures its base stays one call
            from .transfer import inherits_linear_forward

            if inherits_linear_forward(m):
                return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # fx's own keeps a scope, a module stack and call counts at every module call, for node metadata
        # normswap does not read; only the path of the module being traced through is kept here.
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return self.create_proxy("call_module", path, args, kwargs)
        self._owners.append(path)
        try:
            return forward(*args, **kwargs)
        finally:
            self._owners.pop()

    def create_arg(self, a: Any) -> Any:
        # fx's own fast path keys on the exact class fx.Proxy, which our proxies are not, so every
        # argument went through its chain of isinstance checks; the common cases, answered the same way:
        kind = type(a)
        if kind is _Proxy:
            return a.node
        if kind in _PLAIN_ARGUMENTS:
            return a
        if kind is tuple:
            return tuple(self.create_arg(x) for x in a)
        if kind is list:
            return [self.create_arg(x) for x in a]
        if kind is dict and all(type(k) is str for k in a):  # kwargs; fx checks other keys for proxies
            return {k: self.create_arg(v) for k, v in a.items()}
        return super().create_arg(a)

    def create_node(
        self,
        kind: str,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
    ) -> fx.Node:
        # fx copies its module stack into every node (and a scope table besides); normswap needs only
        # the module a functional batch_norm call is made in, to name the site.
        graph = self.graph
        if _LEAN_NODES and graph.owning_module is None:
            node = _append_node(graph, kind, target, args, kwargs, name, type_expr)
        else:
            node = graph.create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "call_function" and target in FUNCTIONAL_BATCH_NORMS:
            node.meta[OWNER_META] = self._owners[-1] if self._owners else ""
        return node

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # fx finds a tensor attribute's name by scanning all the model's parameters, then all its buffers,
        # at every access (every tensor attribute a traced forward reads that is not a parameter costs a
        # walk over the whole model); tables built once turn those walks into lookups. Same answers:
        # a parameter by its first name, else a buffer by its first name, else the value itself.
        if self.param_shapes_constant or not isinstance(attr_val, torch.Tensor):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name = self._names("parameters").get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = self._names("buffers").get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def _names(self, kind: str) -> dict[int, str]:
        """Tensor id -> first name, of the root's parameters or buffers, built at the first lookup."""
        if self._names_root is not self.root:
            self._names_root, self._names_by_id = self.root, {}
        table = self._names_by_id.get(kind)
        if table is None:
            tensors = self.root.named_parameters() if kind == "parameters" else self.root.named_buffers()
            table = self._names_by_id[kind] = {id(t): n for n, t in tensors}
        return table


_FX_TRACE_INTERNALS = ("_get_is_fx_tracing", "_set_is_fx_tracing", "_orig_module_call", "_orig_module_getattr",
                       "_autowrap_check", "_new_patcher", "_patch_wrapped_functions", "_PatchedFn",
                       "_constant_attribute_types", "_create_wrapped_func")
_OWN_TRACE = all(hasattr(_st, name) for name in _FX_TRACE_INTERNALS) and all(
    hasattr(fx.Tracer(), a) for a in ("_autowrap_search", "_autowrap_function_ids", "traced_func_name")
)


_WRAPPERS: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}  # id(function) -> (function, wrapper)


def _autowrap_check(patcher: Any, frame_dict: dict[str, Any], function_ids: set[int]) -> None:
    """fx's ``_autowrap_check`` (wrap the functions fx records as calls, ``math.sqrt`` and timm's
    no-trace functions, wherever traced code finds them), with each wrapper made once per function
    instead of once per trace: fx's re-wraps all of ``math`` at every trace, 3 ms, more than tracing a
    small block costs, and tracing by parts traces many. A wrapper holds nothing but its function
    (the tracer is found from the proxies it is called with), so reusing it changes nothing."""
    if patcher.visit_once(frame_dict):
        for name, value in frame_dict.items():
            if callable(value) and id(value) in function_ids:  # by identity, so private helpers too
                known = _WRAPPERS.get(id(value))
                if known is None or known[0] is not value:
                    known = _WRAPPERS[id(value)] = (value, _st._create_wrapped_func(value))
                patcher.patch(frame_dict, name, known[1])


def _module_classes(root: nn.Module, named: list[tuple[str, nn.Module]]) -> list[type[nn.Module]] | None:
    """The distinct classes of ``root``'s modules (``named``), or None where the per-class patch would
    not do what fx's patch of ``nn.Module`` does: a class with its own ``__call__`` or ``__getattr__``."""
    if type(root).forward is nn.Module.forward:
        return None
    classes = list(dict.fromkeys(type(m) for _, m in named))
    for cls in classes:
        if cls.__call__ is not nn.Module.__call__ or cls.__getattr__ is not nn.Module.__getattr__:
            return None
        if "__call__" in vars(cls) or "__getattr__" in vars(cls):
            return None
    return classes


if _OWN_TRACE:

    class _PatchedClassAttribute(_st._PatchedFn):  # type: ignore[misc, name-defined]
        """A wrapper set on a class that inherits the attribute: undone by deleting it, so the class
        inherits ``nn.Module``'s again (fx's ``_PatchedFnSetAttr`` would leave the wrapper it read
        from a patched base class behind)."""

        def revert(self) -> None:
            delattr(self.frame_dict, self.fn_name)

        def patch(self) -> None:
            setattr(self.frame_dict, self.fn_name, self.new_fn)


class _TensorAttributes(dict):  # type: ignore[type-arg]
    """fx's table of the plain tensor attributes of every module (tensor -> dotted name), filled in
    fx's order on first use."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root: nn.Module | None = root

    def _fill(self) -> None:
        root, self._root = self._root, None
        if root is None:
            return
        kinds = _st._constant_attribute_types

        def collect(m: nn.Module, prefix: list[str]) -> None:
            for k, v in m.__dict__.items():
                if isinstance(v, kinds):
                    super(_TensorAttributes, self).__setitem__(v, ".".join([*prefix, k]))
            for k, child in m.named_children():
                collect(child, [*prefix, k])

        collect(root, [])

    def get(self, key: Any, default: Any = None) -> Any:
        self._fill()
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self._fill()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._fill()
        return super().__contains__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._fill()
        super().__setitem__(key, value)


def _lean_nodes_supported() -> bool:
    graph = fx.Graph()
    return all(hasattr(graph, a) for a in ("_target_to_str", "_graph_namespace", "_insert", "_find_nodes_lookup_table",
                                             "_len", "owning_module"))


# Graph.create_node walks every node's arguments looking for symbolic ints (a check for tracing with
# symbolic shapes, which this tracer never does): a seventh of a small network's trace. The lean path
# does what create_node does otherwise, through the same fx internals, and is used only where they exist.
_LEAN_NODES = _lean_nodes_supported()


def _append_node(
    graph: fx.Graph, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None,
    type_expr: Any,
) -> fx.Node:
    candidate = name if name is not None else graph._target_to_str(target)
    name = graph._graph_namespace.create_name(candidate, None)
    node = fx.Node(graph, name, kind, target, args or (), kwargs or immutable_dict(), type_expr)
    graph._graph_namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node


@contextmanager
def model_state_guard(
    model: nn.Module, eval_mode: bool = True, modules: Sequence[nn.Module] | None = None
) -> Iterator[None]:
    """Put the model in eval mode (for discovery) and afterwards restore every module's mode and every
    plain attribute it had, so nothing of the trace stays behind.

    Tracing levit or efficientformer writes fx Proxy objects into their ``attention_bias_cache``
    dicts, after which ``torch.save(model)`` fails; an eval forward fills the same caches with real
    tensors. Both are undone here. ``modules``: the model's modules, each once, where the caller has them.
    """
    snapshots = [_snapshot(m) for m in (model.modules() if modules is None else modules)]
    try:
        if eval_mode:
            set_mode(model, False)
        yield
    finally:
        for snapshot in snapshots:
            _restore(*snapshot)


_Snapshot = tuple[nn.Module, dict[str, Any], tuple[str, ...], dict[str, dict[Any, Any]]]


def _snapshot(m: nn.Module) -> _Snapshot:
    attrs = m.__dict__.copy()  # includes ``training``
    plain = tuple(k for k in attrs if k not in _MODULE_INTERNALS)
    return m, attrs, plain, {k: dict(attrs[k]) for k in plain if isinstance(attrs[k], dict)}


def _restore(m: nn.Module, attrs: dict[str, Any], plain: tuple[str, ...], dicts: dict[str, dict[Any, Any]]) -> None:
    # The module's own __dict__ is written directly: these are plain attributes (``training``, caches),
    # never parameters, buffers or submodules, which nn.Module.__setattr__ would route elsewhere.
    current = m.__dict__
    current["training"] = attrs["training"]
    if current.keys() != attrs.keys():
        for key in current.keys() - attrs.keys():
            if key not in _MODULE_INTERNALS:
                del current[key]
    for key in plain:
        value = attrs[key]
        if current.get(key) is not value:
            current[key] = value
    for key, content in dicts.items():
        now = current[key]
        if now.keys() != content.keys() or any(now[k] is not v for k, v in content.items()):
            now.clear()
            now.update(content)


def set_mode(module: nn.Module, training: bool) -> None:
    """``module.train(training)``, with the flag written directly into modules that keep nn.Module's
    ``train`` (which sets it through ``__setattr__``: a tenth of a small network's discovery time, and
    of building a small norm layer)."""
    if type(module).train is not nn.Module.train:
        module.train(training)
        return
    module.__dict__["training"] = training
    for child in module._modules.values():
        if child is not None:
            set_mode(child, training)


_LINEAR_BASES = (nn.modules.conv._ConvNd, nn.Linear)
_OWN_DIR = Path(__file__).resolve().parent


def library_frame(filename: str) -> bool:
    """A frame of torch's or normswap's own code, not of the model's."""
    return "/torch/" in filename or Path(filename).parent == _OWN_DIR


def trace_graph(model: nn.Module) -> fx.Graph:
    """Trace with :class:`NormswapTracer`. The caller guards the model's state."""
    return NormswapTracer().trace(model)


def is_functional_batch_norm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORMS


def functional_arguments(node: fx.Node) -> dict[str, Any]:
    """F.batch_norm's arguments by name (torch.batch_norm shares the leading positional order)."""
    if node.target is torch.batch_norm:
        names = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"]
        return dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    bound = _BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def functional_owner(node: fx.Node) -> str:
    """The path of the module whose forward makes this call ("" for the model's own)."""
    return str(node.meta.get(OWNER_META, ""))


def functional_site_path(node: fx.Node) -> str:
    owner = functional_owner(node)
    return f"{owner}.{node.name}" if owner else node.name


def resolve_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A seeded batch-1 input from timm's ``pretrained_cfg['input_size']``, in the model's dtype and
    device. Models without that config need ``example_inputs``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        raise TraceError(
            f"{type(model).__name__} has no timm pretrained_cfg['input_size'], so normswap cannot guess "
            f"an input. Pass example_inputs=torch.randn(1, C, H, W) (API) or --input-size C,H,W (CLI)."
        )
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return (torch.randn((1, *size), generator=generator).to(device=device, dtype=dtype),)


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TraceError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}.")


def _memory_format(x: torch.Tensor) -> str:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "contiguous"


@dataclass
class _Observed:
    """What one forward pass saw at a site."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    memory_format: str | None = None
    calls: int = 0

    def record(self, x: Any) -> None:
        self.calls += 1
        if self.shape is None and isinstance(x, torch.Tensor):
            self.shape = tuple(x.shape)
            self.dtype = str(x.dtype).replace("torch.", "")
            self.memory_format = _memory_format(x)


class _FunctionalRecorder(fx.Interpreter):
    """Runs the traced graph and records the input of each functional batch_norm node."""

    def __init__(self, gm: fx.GraphModule, nodes: set[str]) -> None:
        super().__init__(gm)
        self.watch = nodes
        self.seen: dict[str, _Observed] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.watch:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.seen.setdefault(n.name, _Observed()).record(args[0])
        return super().run_node(n)


@dataclass
class Discovery:
    """Everything discovery learned: sites, other norms, the graph (when it traced)."""

    sites: list[Site]
    other_norms: list[OtherNorm]
    graph: fx.Graph | None
    trace_error: str | None
    input_shapes: tuple[tuple[int, ...], ...] = field(default_factory=tuple)
    parts: tuple[Part, ...] = ()  # where the whole model did not trace: the submodules that did

    @property
    def trace(self) -> str:
        """fx: the whole model traced; parts: some submodules traced (:func:`trace_parts`); eager: none."""
        if self.graph is not None:
            return "fx"
        return "parts" if self.parts else "eager"


@dataclass(frozen=True)
class Part:
    """A submodule traced on its own because the whole model did not trace. Its graph's
    ``call_module`` and ``get_attr`` targets are qualified with ``path``, so they are paths of the
    whole model; ``calls`` is how often the forward pass ran the submodule."""

    path: str
    graph: fx.Graph
    calls: int


@dataclass
class ModuleRuns:
    """What the hooked forward pass saw of every module: how often each ran (by id) and the arguments
    of its first call, for tracing it on its own, with every tensor replaced by fx's placeholder
    ``fx.PH``: keeping each module's input alive to the end of the forward would keep the allocator
    from reusing its memory, which made the forward half as slow again."""

    calls: dict[int, int] = field(default_factory=dict)
    first: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = id(module)
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        if not count:
            self.first[key] = (tuple(_skeleton(a) for a in args), {k: _skeleton(v) for k, v in kwargs.items()})


def _skeleton(value: Any) -> Any:
    """``value`` with ``fx.PH`` for each tensor, in containers too; other values as they are."""
    if isinstance(value, torch.Tensor):
        return fx.PH
    if isinstance(value, (list, tuple, dict)):
        return torch.utils._pytree.tree_map(lambda v: fx.PH if isinstance(v, torch.Tensor) else v, value)
    return value


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every path under which each module object is reachable (a shared module has several)."""
    return ModuleIndex.of(model).aliases


@dataclass(frozen=True)
class ModuleIndex:
    """One walk over a model's modules, for the lookups discovery makes per site."""

    by_path: dict[str, nn.Module]  # every path, a shared module under each of its paths
    aliases: dict[int, list[str]]
    unique: list[tuple[str, nn.Module]]  # what ``named_modules()`` gives: each module once, first path

    @classmethod
    def of(cls, model: nn.Module) -> ModuleIndex:
        by_path = dict(model.named_modules(remove_duplicate=False))
        aliases: dict[int, list[str]] = {}
        unique = []
        for path, m in by_path.items():
            known = aliases.get(id(m))
            if known is None:
                aliases[id(m)] = [path]
                unique.append((path, m))
            else:
                known.append(path)
        return cls(by_path, aliases, unique)


SHAPE_MODES = ("auto", "always")


def discover(
    model: nn.Module, example_inputs: Any = None, shapes: str = "auto", *, traced: Discovery | None = None
) -> Discovery:
    """Find every BatchNorm site in ``model`` and learn its context. The model is left as it was.

    The fx trace tells structure; a forward pass tells shapes. With ``shapes="auto"`` the model runs
    only when the trace cannot bound a site's layout (any-rank norms such as SyncBatchNorm, functional
    calls, models that do not trace): a BatchNorm2d/3d input is image/volume by construction, also
    inside a leaf module, and a BatchNorm1d's is features or sequence, left as a guess (``features``,
    ``layout_inferred``) for the planner, which asks for the forward when the recipe would treat the
    two differently (``normswap.plan``). Sites then carry no input shape, and conversion costs a trace
    instead of a forward. ``shapes="always"`` runs the forward regardless. ``traced``, an earlier
    discovery of the same model, lends its trace, so asking again for shapes costs only the forward.
    """
    if shapes not in SHAPE_MODES:
        raise unknown_name("shapes mode", shapes, SHAPE_MODES, "shapes=")
    index = ModuleIndex.of(model)
    _refuse_uninitialized(index)
    inputs = as_input_tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    bn_modules = [(p, m) for p, m in index.unique if is_site_module(m)]
    parts: tuple[Part, ...] = ()
    runs = ModuleRuns()
    with model_state_guard(model, modules=[m for _, m in index.unique]):
        graph, trace_error = _trace(model) if traced is None else (traced.graph, traced.trace_error)
        ran = shapes == "always" or _needs_forward(graph, bn_modules)
        if ran:
            # Without a whole graph, the forward pass also records every module's calls and first
            # arguments: what tracing by parts, and checking what the parts show, need.
            watch = graph is None and bool(bn_modules)
            observed, functional_seen, eager_calls = _observe(model, graph, inputs, bn_modules,
                                                              runs if watch else None, index)
        else:
            observed, functional_seen, eager_calls = _from_graph(bn_modules, _module_nodes([graph]))
        if graph is None and bn_modules:
            parts = traced.parts if traced is not None else trace_parts(model, index, runs)
    node_index = _module_nodes([graph] if graph is not None else [p.graph for p in parts])
    context = _Context(node_index, index, ran, _part_of(parts), runs if graph is None else None)
    sites = [_module_site(path, m, observed[id(m)], context) for path, m in bn_modules]
    if graph is not None:
        sites += [
            _functional_site(n, functional_seen.get(n.name, _Observed()), model, node_index, index)
            for n in graph.nodes
            if is_functional_batch_norm(n)
        ]
    else:
        sites += eager_calls
    others = [OtherNorm(p, qualname(m)) for p, m in index.unique if _is_other_norm(m)]
    shapes_seen = tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor))
    return Discovery(sites, others, graph, trace_error, shapes_seen, parts)


def trace_parts(model: nn.Module, index: ModuleIndex, runs: ModuleRuns) -> tuple[Part, ...]:
    """The largest submodules holding sites that trace on their own, outermost first.

    One top-level statement fx cannot follow (a detector's ``if self.training``, a loop over the
    images of a list) costs the whole model its graph, yet its backbone, neck and heads are mostly
    plain modules. Each child of the model is traced; where it fails, its children are tried, and so
    on down to the sites. A submodule whose arguments were containers of tensors (an FPN's dict of
    feature maps, a head's list of levels) is traced with those containers unrolled as they were in
    the forward pass (``runs``), the other arguments fixed to the values seen. A submodule that never
    ran as a whole (a ModuleList, say) is not traced: its graph would not show how its children are
    used. The part graphs are for learning context only; nothing runs them.
    """
    holders = _site_holders(index)
    parts: list[Part] = []
    seen: set[int] = set()

    def visit(path: str, m: nn.Module) -> None:
        if id(m) in seen or id(m) not in holders or is_site_module(m):
            return
        seen.add(id(m))
        calls = runs.calls.get(id(m), 0)
        graph = _trace_part(m, path, runs.first.get(id(m))) if calls else None
        if graph is not None:
            parts.append(Part(path, graph, calls))
            return
        for name, child in m._modules.items():
            if child is not None:
                visit(f"{path}.{name}", child)

    for name, child in model._modules.items():
        if child is not None:
            visit(name, child)
    return tuple(parts)


def _site_holders(index: ModuleIndex) -> set[int]:
    """Ids of the modules that hold a site somewhere below them."""
    holders: set[int] = set()
    for path, m in index.by_path.items():
        if path and is_site_module(m):
            parts = path.split(".")
            for i in range(1, len(parts)):
                holders.add(id(index.by_path[".".join(parts[:i])]))
    return holders


def _trace_part(m: nn.Module, path: str, first: tuple[tuple[Any, ...], dict[str, Any]] | None) -> fx.Graph | None:
    """The part's graph, or None where it does not trace. Where the plain trace fails, the part is
    traced once more as the forward pass called it: containers unrolled, non-tensor arguments fixed
    (a flag such as ``output_hidden_states`` no longer stops the trace)."""
    graph = _trace_wrapping_failures(m, None)
    if graph is None:  # the part is traced as it was called, or split further
        concrete = _concrete_args(m, first)
        graph = _trace_wrapping_failures(m, concrete) if concrete is not None else None
        if graph is None:
            return None
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = f"{path}.{node.target}"
    return graph


def _trace_wrapping_failures(m: nn.Module, concrete: dict[str, Any] | None, attempts: int = 3) -> fx.Graph | None:
    """``m``'s graph; where the trace fails inside a plain function of the model's own code (shape
    arithmetic in Python, such as Hugging Face's TF-style padding before each conv), traced again with
    that function recorded as one call, as fx records ``math.sqrt``. Parts' graphs are read for their
    structure (which module feeds which), never run, so the call need not be traceable. None where
    the trace still fails."""
    wrapped: set[int] = set()
    for _ in range(attempts + 1):
        tracer = NormswapTracer()
        tracer._autowrap_function_ids |= wrapped
        try:
            return tracer.trace(m, concrete)
        except Exception as exc:  # any failure: perhaps a function to wrap, else no graph
            function = _failing_function(exc)
            if function is None or id(function) in wrapped:
                return None
            wrapped.add(id(function))
    return None


def _failing_function(exc: BaseException) -> types.FunctionType | None:
    """The innermost plain (module-level) function of the model's code on ``exc``'s traceback."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        candidate = tb.tb_frame.f_globals.get(code.co_name)
        if isinstance(candidate, types.FunctionType) and candidate.__code__ is code \
                and not library_frame(code.co_filename):
            found = candidate
        tb = tb.tb_next
    return found


def _concrete_args(m: nn.Module, first: tuple[tuple[Any, ...], dict[str, Any]] | None) -> dict[str, Any] | None:
    """fx ``concrete_args`` for tracing ``m`` as it was first called (``first``, from
    :class:`ModuleRuns`): containers of tensors unrolled (a placeholder per tensor), other non-tensor
    arguments fixed; None where every argument is a tensor (a plain trace) or where the call cannot be
    bound to ``forward``'s signature."""
    if first is None:
        return None
    try:
        bound = inspect.signature(m.forward).bind(*first[0], **first[1])
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    concrete: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            return None
        if value is not fx.PH:  # a tensor stays a plain placeholder
            concrete[name] = value
    return concrete or None


def _trace(model: nn.Module) -> tuple[fx.Graph | None, str | None]:
    try:
        return trace_graph(model), None
    except Exception as exc:  # any tracing failure means: fall back to eager hooks
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# Classes whose input rank is fixed, so the layout needs no forward pass (BatchNorm1d takes (N, C)
# and (N, C, L); SyncBatchNorm and plain _BatchNorm subclasses take any rank).
_FIXED_RANK = ((nn.BatchNorm2d, "image"), (nn.BatchNorm3d, "volume"))


def _fixed_layout(m: nn.Module) -> str | None:
    fixed = next((layout for cls, layout in _FIXED_RANK if isinstance(m, cls)), None)
    if fixed is None and is_frozen_batchnorm(m):
        # torchvision's and timm's FrozenBatchNorm2d reshape to (1, C, 1, 1): 4-d only, like BatchNorm2d.
        name = type(m).__name__
        fixed = "image" if name.endswith("2d") else "volume" if name.endswith("3d") else None
    return fixed


def _needs_forward(graph: fx.Graph | None, bn_modules: list[tuple[str, nn.Module]]) -> bool:
    """Whether discovery must run the model. A BatchNorm2d/3d inside a leaf module is not in the graph,
    but its class fixes its layout; the forward would only add its call count. A BatchNorm1d takes
    (N, C) and (N, C, L): its layout is guessed ("features", marked inferred) and the planner asks for
    the forward only if the recipe would treat the two differently (see ``planner.layout_matters``)."""
    if graph is None or any(is_functional_batch_norm(n) for n in graph.nodes):
        return True
    return any(_fixed_layout(m) is None and not isinstance(m, nn.BatchNorm1d) for _, m in bn_modules)


def _from_graph(bn_modules: list[tuple[str, nn.Module]], node_index: dict[str, list[fx.Node]]) -> Observation:
    """Sites as the graph alone tells them: called as often as the graph calls them, shape unknown."""
    observed = {id(m): _Observed(calls=len(node_index.get(path, []))) for path, m in bn_modules}
    return observed, {}, []


Observation = tuple[dict[int, "_Observed"], dict[str, "_Observed"], list[Site]]


def _observe(
    model: nn.Module, graph: fx.Graph | None, inputs: Sequence[Any], bn_modules: list[tuple[str, nn.Module]],
    runs: ModuleRuns | None = None, index: ModuleIndex | None = None,
) -> Observation:
    """Run the forward pass with the recording hooks.

    A BatchNorm without running statistics normalizes with batch statistics even in eval mode and
    cannot run on one sample per channel; a failing batch-1 example is retried repeated to two samples.
    """
    try:
        return _observe_once(model, graph, inputs, bn_modules, runs, index)
    except Exception as first:
        doubled = _as_batch_of_two(inputs)
        if doubled is not None:
            try:
                if runs is not None:
                    runs.calls.clear()
                    runs.first.clear()
                return _observe_once(model, graph, doubled, bn_modules, runs, index)
            except Exception:  # report the failure on the inputs the user gave
                pass
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        raise TraceError(
            f"{type(model).__name__} failed on example inputs of shape {shapes}: {type(first).__name__}: "
            f"{str(first).splitlines()[0] if str(first) else ''}. Give inputs the model accepts: "
            f"example_inputs=... (API) or --input-size C,H,W (CLI)."
        ) from first


def _observe_once(
    model: nn.Module, graph: fx.Graph | None, inputs: Sequence[Any], bn_modules: list[tuple[str, nn.Module]],
    runs: ModuleRuns | None = None, index: ModuleIndex | None = None,
) -> Observation:
    observed = {id(m): _Observed() for _, m in bn_modules}
    handles = [m.register_forward_pre_hook(_recording_hook(observed[id(m)])) for _, m in bn_modules]
    modules = index.unique if index is not None else None
    eager_calls = _EagerFunctionalCalls(model, runs, modules) if graph is None else None
    try:
        if eager_calls is None:
            functional_seen = _run_forward(model, graph, inputs)
        else:
            with eager_calls:
                functional_seen = _run_forward(model, graph, inputs)
    finally:
        for h in handles:
            h.remove()
    return observed, functional_seen, eager_calls.sites if eager_calls is not None else []


class _EagerFunctionalCalls(TorchFunctionMode):
    """Without a graph, functional ``batch_norm`` calls are still seen at run time: a torch-function
    mode notes every call made outside a BatchNorm module, with the module it was made in. Such a site
    cannot be rewritten (that needs the graph), but the plan shows it and recipes that promise no
    BatchNorm refuse to pretend otherwise. The same hooks count module calls into ``runs``, where
    given (one hook per module instead of two: hooks are most of what a small model's forward costs
    here)."""

    def __init__(
        self, model: nn.Module, runs: ModuleRuns | None = None, modules: list[tuple[str, nn.Module]] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.runs = runs
        self.modules = modules  # the model's (path, module) pairs, each module once, where the caller has them
        self.stack: list[tuple[str, bool]] = []
        self.sites: list[Site] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _EagerFunctionalCalls:
        runs = self.runs

        def push(path: str, is_bn: bool) -> Callable[..., None]:
            entry = (path, is_bn)
            if runs is None:
                def hook(*_: Any) -> None:
                    self.stack.append(entry)

                return hook

            def counting(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self.stack.append(entry)
                runs.hook(module, args, kwargs)

            return counting

        def pop(*_: Any) -> None:  # a forward hook that returned a value would replace the output
            if self.stack:
                self.stack.pop()

        for path, m in self.modules if self.modules is not None else self.model.named_modules():
            hook = push(path, is_site_module(m))
            self.handles.append(m.register_forward_pre_hook(hook, with_kwargs=runs is not None))
            self.handles.append(m.register_forward_hook(pop))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in FUNCTIONAL_BATCH_NORMS and not (self.stack and self.stack[-1][1]):
            self._record(args, kwargs)
        return func(*args, **kwargs)

    def _record(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        x = a["input"]
        owner = self.stack[-1][0] if self.stack else ""
        name = "batch_norm" + (f"_{len(self.sites)}" if self.sites else "")
        obs = _Observed()
        obs.record(x)
        has_stats = a["running_mean"] is not None and a["running_var"] is not None
        path = f"{owner}.{name}" if owner else name
        channels = int(x.shape[1]) if x.ndim > 1 else 0
        self.sites.append(_call_site(path, a, obs, channels, has_stats, _Structure(), "eager", None))


def _refuse_uninitialized(index: ModuleIndex) -> None:
    """A forward pass would materialise lazy modules (and change their class) on the user's model."""
    lazy = [p for p, m in index.unique if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise TraceError(
            f"{len(lazy)} lazy module(s) are not initialised yet ({', '.join(lazy[:5])}); normswap will not "
            f"initialise them on your model. Run one forward pass first: model(example_input)."
        )


def _is_other_norm(m: nn.Module) -> bool:
    if is_site_module(m):
        return False
    return isinstance(m, _OTHER_NORM_TYPES) or _OTHER_NORM_NAME.search(type(m).__name__) is not None


def _recording_hook(obs: _Observed) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        obs.record(args[0] if args else None)

    return hook


def _run_forward(model: nn.Module, graph: fx.Graph | None, inputs: Sequence[Any]) -> dict[str, _Observed]:
    """One forward pass, eval mode, no grad. Through the graph only when functional sites need shapes."""
    functional = {n.name for n in graph.nodes if is_functional_batch_norm(n)} if graph is not None else set()
    with torch.no_grad():
        if functional:
            recorder = _FunctionalRecorder(fx.GraphModule(model, graph), functional)
            recorder.run(*inputs)
            return recorder.seen
        model(*inputs)
        return {}


def _as_batch_of_two(inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(x.ndim == 0 or x.shape[0] != 1 for x in tensors):
        return None
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)


def _module_nodes(graphs: Sequence[fx.Graph | None]) -> dict[str, list[fx.Node]]:
    """call_module nodes by module path, over the whole graph or the parts' (whose targets are full paths)."""
    index: dict[str, list[fx.Node]] = {}
    for graph in graphs:
        if graph is not None:
            for n in graph.nodes:
                if n.op == "call_module":
                    index.setdefault(str(n.target), []).append(n)
    return index


def _part_of(parts: Sequence[Part]) -> dict[int, Part]:
    """Each part by the id of its graph, so a node's part is ``_part_of(parts)[id(node.graph)]``."""
    return {id(p.graph): p for p in parts}


@dataclass(frozen=True)
class _Context:
    """What discovery learned of the model as a whole, for building each site."""

    module_nodes: dict[str, list[fx.Node]]
    modules: ModuleIndex
    ran: bool
    parts: dict[int, Part]  # by id of its graph; empty where the whole model traced
    runs: ModuleRuns | None  # module calls seen by the forward pass, where the whole model did not trace


def describe_node(node: fx.Node, modules: ModuleIndex) -> tuple[str, str | None]:
    """A node as 'what it is' plus the class or function name behind it."""
    if node.op == "call_module":
        return str(node.target), type(modules.by_path[str(node.target)]).__name__
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return f"{node.op}:{name}", name
    return f"{node.op}:{node.target}", None


@dataclass(frozen=True)
class _Structure:
    producer: str | None = None
    producer_cls: str | None = None
    exclusive: bool = False
    foldable_channels: int | None = None
    consumers: tuple[str, ...] = ()


def _structure(nodes: list[fx.Node], modules: ModuleIndex, module_nodes: dict[str, list[fx.Node]]) -> _Structure:
    """Producer, its class, whether it feeds only this site (every call of one, every call of the
    other: a head shared across feature levels folds as well as a block called once), the channels
    it could take a folded BatchNorm for, and the consumers."""
    from .transfer import foldable_out_channels

    if not nodes:
        return _Structure()
    first = nodes[0]
    source = first.args[0] if first.args else None
    consumers = tuple(dict.fromkeys(describe_node(u, modules)[0] for n in nodes for u in n.users))
    if not isinstance(source, fx.Node):
        return _Structure(consumers=consumers)
    producer, producer_cls = describe_node(source, modules)
    sources = [n.args[0] if n.args else None for n in nodes]
    if source.op == "call_module":
        calls = module_nodes.get(str(source.target), [])
        exclusive = (
            all(isinstance(s, fx.Node) and s.op == "call_module" and s.target == source.target for s in sources)
            and len(set(sources)) == len(sources) == len(calls)
            and all(len(s.users) == 1 for s in sources)  # type: ignore[union-attr]
        )
    else:
        exclusive = len(nodes) == 1 and len(source.users) == 1
    channels = foldable_out_channels(modules.by_path[str(source.target)]) if source.op == "call_module" else None
    return _Structure(producer, producer_cls, exclusive, channels, consumers)


def _runs_agree(st: _Structure, m: nn.Module, nodes: list[fx.Node], context: _Context) -> bool:
    """For a site learned in a part: the part's graph shows every call of the site and its producer
    (neither is also called from code outside the part), as the forward pass counted them."""
    part = context.parts.get(id(nodes[0].graph))
    runs = context.runs
    if part is None or runs is None or st.producer is None:
        return part is None
    producer = context.modules.by_path.get(st.producer)
    if producer is None:
        return False
    producer_nodes = context.module_nodes.get(st.producer, [])
    return (
        runs.calls.get(id(m), 0) == part.calls * len(nodes)
        and runs.calls.get(id(producer), 0) == part.calls * len(producer_nodes)
    )


def _layout(shape: tuple[int, ...] | None, module: nn.Module | None) -> tuple[str, bool]:
    """The layout and whether it is a guess: seen in a forward pass, fixed by the class (BatchNorm2d
    only takes 4-d input), or guessed from the class (BatchNorm1d mostly sees features)."""
    if shape is not None:
        return LAYOUT_BY_NDIM.get(len(shape), "unknown"), False
    fixed = _fixed_layout(module) if module is not None else None
    if fixed is not None:
        return fixed, False
    if isinstance(module, nn.BatchNorm1d):
        return "features", True
    return "unknown", True


def _module_site(path: str, m: nn.Module, obs: _Observed, context: _Context) -> Site:
    modules = context.modules
    nodes = context.module_nodes.get(path, [])
    st = _structure(nodes, modules, context.module_nodes)
    if nodes and st.exclusive and not _runs_agree(st, m, nodes, context):
        st = dataclasses.replace(st, exclusive=False)
    part = context.parts.get(id(nodes[0].graph)) if nodes else None
    layout, inferred = _layout(obs.shape, m)
    learned = _learned_by(bool(nodes), obs.calls, context.ran, part)
    state = next((t for t in (m.weight, m.running_mean) if isinstance(t, torch.Tensor)), None)
    dtype = obs.dtype or (str(state.dtype).replace("torch.", "") if state is not None else "float32")
    frozen = not isinstance(m, _BatchNorm)
    return Site(
        path=path,
        kind="module",
        cls=qualname(m),
        num_features=site_features(m),
        affine=True if frozen else bool(m.affine),
        track_running_stats=False if frozen else bool(m.track_running_stats),
        has_running_stats=m.running_mean is not None and m.running_var is not None,
        eps=float(m.eps),
        momentum=None if frozen else m.momentum,
        has_act=isinstance(getattr(m, "act", None), nn.Module),
        input_shape=obs.shape,
        layout=layout,
        layout_inferred=inferred,
        memory_format=obs.memory_format,
        dtype=dtype,
        producer=st.producer,
        producer_cls=st.producer_cls,
        producer_exclusive=st.exclusive,
        producer_foldable=st.foldable_channels == site_features(m),
        consumers=st.consumers,
        call_count=obs.calls,
        learned_by=learned,
        aliases=tuple(p for p in modules.aliases[id(m)] if p != path),
        mro=tuple(qualname(c) for c in type(m).__mro__ if _own_norm_class(c, frozen)),
        frozen=frozen,
    )


def _own_norm_class(cls: type, frozen: bool) -> bool:
    """The classes recipes' ``classes`` match on: a BatchNorm's up to _BatchNorm, a frozen layer's up
    to (not including) nn.Module."""
    if frozen:
        return issubclass(cls, nn.Module) and cls is not nn.Module
    return issubclass(cls, _BatchNorm)


def _learned_by(in_graph: bool, calls: int, ran: bool, part: Part | None = None) -> str:
    if in_graph:
        return f"fx:{part.path}" if part is not None else "fx"
    if calls:
        return "eager"
    # Only a module whose class fixes or bounds its layout is left unobserved (see _needs_forward).
    return "none" if ran else "class"


def _functional_site(
    node: fx.Node, obs: _Observed, model: nn.Module, module_nodes: dict[str, list[fx.Node]], modules: ModuleIndex
) -> Site:
    args = functional_arguments(node)
    tensors = {k: _attr_tensor(model, args.get(k)) for k in ("weight", "bias", "running_mean", "running_var")}
    known = [t for t in tensors.values() if t is not None]
    if known:
        channels = int(known[0].numel())
    elif obs.shape is not None and len(obs.shape) > 1:
        channels = int(obs.shape[1])
    else:
        channels = 0
    st = _structure([node], modules, module_nodes)
    has_stats = tensors["running_mean"] is not None and tensors["running_var"] is not None
    return _call_site(functional_site_path(node), args, obs, channels, has_stats, st, "fx", node.name)


def _call_site(path: str, args: dict[str, Any], obs: _Observed, channels: int, has_stats: bool, st: _Structure,
               learned_by: Any, node: str | None) -> Site:
    """A functional batch_norm call as a Site, learned from the graph or at run time."""
    layout, inferred = _layout(obs.shape, None)
    return Site(
        path=path, kind="functional", cls=f"{F.batch_norm.__module__}.batch_norm", num_features=channels,
        affine=args.get("weight") is not None, track_running_stats=args.get("running_mean") is not None,
        has_running_stats=has_stats, eps=float(args.get("eps", 1e-5)), momentum=args.get("momentum"),
        has_act=False, input_shape=obs.shape, layout=layout, layout_inferred=inferred,
        memory_format=obs.memory_format, dtype=obs.dtype or "float32", producer=st.producer,
        producer_cls=st.producer_cls, producer_exclusive=st.exclusive,
        producer_foldable=st.foldable_channels == channels and channels > 0, consumers=st.consumers,
        call_count=max(obs.calls, 1) if learned_by == "eager" else obs.calls, learned_by=learned_by, node=node,
    )


def _attr_tensor(model: nn.Module, arg: Any) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = resolve_attr(model, str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None

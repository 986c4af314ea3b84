"""Out-of-place forward passes, which Opacus' per-sample gradients need (the ``out-of-place`` ensure).

Opacus hooks every module with trainable parameters with a full backward hook, which hands the
module's output on as a view; modifying that view in place fails at the first backward pass
(``Output 0 of BackwardHookFunction is a view and is being modified inplace``). Two things do that
in the models people train: activation modules built with ``inplace=True`` (timm builds most of its
activations so) and forward code such as timm ResNet's ``x += shortcut``. The first is an attribute,
set off here on every module that has it. The second is code: where the model traces with torch.fx,
each in-place op on a hooked output is rewritten to its out-of-place form, in the submodules whose
forward holds it (each becomes a GraphModule of its class; the model keeps its own class and methods)
or, where the op is in the model's own forward, in the whole model; where it does not trace, a forward
pass hooked the way Opacus hooks finds the op, and a PlanError names it and the module it runs in.
"""

from __future__ import annotations

import copy
import functools
import operator
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import PlanError
from .tracing import NormswapTracer, library_frame, model_state_guard, qualname

IN_PLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.ipow: operator.pow,
    operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
}
# Calls that hand on (a view of) their input: an in-place op on their result modifies the input too.
VIEW_METHODS = {"view", "view_as", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
                "narrow", "select", "unflatten", "contiguous", "t"}
VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                  torch.unsqueeze, torch.narrow, torch.select}


@dataclass(frozen=True)
class OutOfPlace:
    """What :func:`make_out_of_place` changed: the model to use, the activation modules it set to
    ``inplace=False`` and each in-place op it rewrote ("node: op on the output of module → new op")."""

    model: nn.Module
    activations: tuple[str, ...]
    rewritten: tuple[str, ...]

    def warnings(self) -> list[str]:
        notes = []
        if self.activations:
            notes.append(f"out-of-place: {len(self.activations)} activation modules set to inplace=False "
                         f"({', '.join(self.activations[:3])}{', …' if len(self.activations) > 3 else ''}).")
        if self.rewritten:
            notes.append(f"out-of-place: in-place ops on outputs that Opacus hooks were rewritten (the forward "
                         f"that held each is now a torch.fx GraphModule of its class): {'; '.join(self.rewritten)}.")
        return notes


def make_out_of_place(model: nn.Module, traced: bool, example_shapes: tuple[tuple[int, ...], ...]) -> OutOfPlace:
    """``model`` with no in-place op on a hooked module output (see the module's doc). ``traced``: the
    plan's trace succeeded; ``example_shapes``: the plan's example inputs, for the check of a model
    that does not trace."""
    activations = tuple(path for path, m in model.named_modules() if getattr(m, "inplace", None) is True)
    for path in activations:
        model.get_submodule(path).inplace = False
    graph = None
    if traced:
        with model_state_guard(model, eval_mode=False):
            try:
                graph = _SourceTracer().trace(model)
            except Exception:  # the plan traced it; a model that no longer does is checked as untraced
                graph = None
    if graph is None:
        return OutOfPlace(model, activations, tuple(_rewrite_untraced(model, example_shapes)))
    frames: list[tuple[str, int]] = []
    rewritten = _rewrite(model, graph, frames)
    if not rewritten:
        return OutOfPlace(model, activations, ())
    local = _rewrite_owners(model, frames)
    if local is not None:
        return OutOfPlace(model, activations, tuple(local))
    graph = _SourceTracer().trace(model)  # the owners did not cover every op: the whole model is rewritten
    rewritten = _rewrite(model, graph)
    graph.lint()
    result = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for name in ("pretrained_cfg", "default_cfg"):  # what reads the model's input size keeps it
        if hasattr(model, name):
            setattr(result, name, getattr(model, name))
    return OutOfPlace(result, activations, tuple(rewritten))


def hooked(module: nn.Module) -> bool:
    """Opacus hooks modules with parameters of their own that train."""
    return any(p.requires_grad for p in module.parameters(recurse=False))


class _SourceTracer(NormswapTracer):
    """normswap's tracer, recording each node's source line: fx records ``x += y`` on a traced tensor as
    ``add`` (a Proxy has no ``__iadd__``), so only the line tells that the eager forward does it in place."""

    record_stack_traces = True

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        return fx.Tracer.create_node(self, kind, target, args, kwargs, name, type_expr)


AUGMENTED = {operator.add: "+=", operator.sub: "-=", operator.mul: "*=", operator.truediv: "/=",
             operator.floordiv: "//=", operator.pow: "**=", operator.and_: "&=", operator.or_: "|=",
             operator.xor: "^="}
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in \S+\n\s+(.*)')


def _rewrite_owners(model: nn.Module, frames: list[tuple[str, int]], check: bool = True) -> list[str] | None:
    """Rewrite only the submodules whose own forward holds the in-place lines (timm's ResNet blocks, not
    the ResNet), each into a GraphModule of its class, so the model keeps its class and methods
    (``forward_features``, ``reset_classifier``). None where a line is in the model's own forward or no
    submodule owns it; what is done then stays correct, and the caller rewrites the whole model."""
    owners = [(path, m) for path, m in model.named_modules() if path and _owns_a_line(type(m), frames)]
    if not owners or not all(any(_owns_a_line(type(m), [frame]) for _, m in owners) for frame in frames):
        return None
    found: list[str] = []
    done: list[str] = []
    for path, module in owners:  # top-down: an owner inside a rewritten one is rewritten with it
        if any(path.startswith(f"{d}.") for d in done):
            continue
        with model_state_guard(module, eval_mode=False):
            graph = _SourceTracer().trace(module)
        found += [f"{path}: {line}" for line in _rewrite(module, graph)]
        graph.lint()
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name,
                fx.GraphModule(module, graph, class_name=type(module).__name__))
        done.append(path)
    if not check:  # a model that does not trace whole: the caller checks by running it
        return found
    with model_state_guard(model, eval_mode=False):
        left = _rewrite(model, _SourceTracer().trace(model))
    return None if left else found


def _owns_a_line(cls: type, frames: list[tuple[str, int]]) -> bool:
    span = _forward_span(cls)
    return span is not None and any(file == span[0] and span[1] <= line <= span[2] for file, line in frames)


@functools.cache
def _forward_span(cls: type) -> tuple[str, int, int] | None:
    """(file, first line, last line) of ``cls.forward``'s source."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    if code is None:
        return None
    last = max((line for _, _, line in code.co_lines() if line is not None), default=code.co_firstlineno)
    return code.co_filename, code.co_firstlineno, last


def _rewrite(model: nn.Module, graph: fx.Graph, frames: list[tuple[str, int]] | None = None) -> list[str]:
    """Make every in-place op on a hooked output out-of-place; returns what it found, one line each, and
    adds the source line of each op (file, line number) to ``frames``."""
    modules = dict(model.named_modules())
    order = {node: i for i, node in enumerate(graph.nodes)}
    found = []
    for node in list(graph.nodes):
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        augmented = _augmented_line(node)
        replacement = _out_of_place_form(node)
        if augmented is None and replacement is None:
            continue
        source = _hooked_source(node.args[0], modules)
        if source is None:
            continue
        mutated = node.args[0]
        if mutated is not source or any(order[u] > order[node] and u is not node for u in _views_of(source)):
            raise PlanError(
                f"{_describe(node, augmented)} modifies the output of {source.target} "
                f"({qualname(modules[str(source.target)])}) in place through a view that is used again "
                f"afterwards; normswap cannot rewrite that without changing what the model computes. Make that "
                f"line out-of-place in the model's forward."
            )
        if frames is not None and (where := _model_frame(node)) is not None:
            frames.append(where)
        if augmented is not None:  # the graph already holds the out-of-place op: its forward is the fix
            found.append(f"`{augmented}` on the output of {source.target} → {_name(node.target)}")
            continue
        op, target = replacement
        with graph.inserting_after(node):
            new = graph.create_node(op, target, node.args, _without_inplace(node.kwargs), name=f"{node.name}_copy")
        for user in list(mutated.users):  # later readers of the tensor read the result, as in place they did
            if user is not node and user is not new and order.get(user, -1) > order[node]:
                user.replace_input_with(mutated, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        found.append(f"{_name(node.target)} on the output of {source.target} → {_name(target)}")
    return found


def _augmented_line(node: fx.Node) -> str | None:
    """The source line of an ``x op= y`` that fx recorded as the out-of-place op, else None."""
    symbol = AUGMENTED.get(node.target) if node.op == "call_function" else None
    if symbol is None or not node.stack_trace:
        return None
    frames = [m for m in _FRAME.finditer(node.stack_trace) if not library_frame(m.group(1))]
    if not frames:
        return None
    line = frames[-1].group(3).strip()
    return line if re.match(rf"^[\w.\[\]]+\s*{re.escape(symbol)}", line) else None


def _model_frame(node: fx.Node) -> tuple[str, int] | None:
    """The model's own source line that made ``node`` (its innermost frame outside torch and normswap)."""
    frames = [m for m in _FRAME.finditer(node.stack_trace or "") if not library_frame(m.group(1))]
    return (frames[-1].group(1), int(frames[-1].group(2))) if frames else None


def _out_of_place_form(node: fx.Node) -> tuple[str, Any] | None:
    if node.op == "call_function" and node.target in IN_PLACE_OPERATORS:
        return "call_function", IN_PLACE_OPERATORS[node.target]
    if node.op == "call_function" and node.kwargs.get("inplace") is True:
        return "call_function", node.target
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_") and hasattr(torch.Tensor, node.target[:-1]):
        return "call_method", node.target[:-1]
    return None


def _without_inplace(kwargs: Any) -> dict[str, Any]:
    return {k: (False if k == "inplace" else v) for k, v in kwargs.items()}


def _hooked_source(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The call of a hooked module whose output ``node`` is, directly or through views; None if none."""
    while True:
        if node.op == "call_module":
            return node if hooked(modules[str(node.target)]) else None
        is_view = (node.op == "call_method" and node.target in VIEW_METHODS) or \
            (node.op == "call_function" and node.target in VIEW_FUNCTIONS)
        if not is_view or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]


def _views_of(node: fx.Node) -> Iterator[fx.Node]:
    for user in node.users:
        if (user.op == "call_method" and user.target in VIEW_METHODS) or \
                (user.op == "call_function" and user.target in VIEW_FUNCTIONS):
            yield user
            yield from _views_of(user)


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _describe(node: fx.Node, line: str | None) -> str:
    return f"`{line}`" if line else f"the in-place op {_name(node.target)} (graph node {node.name})"


def _rewrite_untraced(model: nn.Module, example_shapes: tuple[tuple[int, ...], ...]) -> list[str]:
    """For a model that does not trace whole: run the Opacus-like check, and where it finds an in-place
    op, rewrite the submodules whose forward holds it (as for a traced model, when they trace alone);
    then check again, until the model passes. An op no submodule can take fails with the PlanError."""
    found: list[str] = []
    for _ in range(sum(1 for _ in model.modules())):  # each round rewrites at least one module
        failure = _first_in_place_op(model, example_shapes)
        if failure is None:
            return found
        frame, error = failure
        try:
            local = _rewrite_owners(model, [frame], check=False) if frame is not None else None
        except Exception:  # noqa: BLE001 - an owner that does not trace alone: the op stays the user's to fix
            local = None
        if not local:
            raise error
        found += local
    raise PlanError(f"in-place ops in {qualname(model)} kept appearing after {len(found)} rewrites; make the "
                    f"forward out-of-place by hand.")


def check_out_of_place(model: nn.Module, example_shapes: tuple[tuple[int, ...], ...]) -> None:
    """Run ``model`` (a copy, in training mode) on random inputs of ``example_shapes`` with every
    hooked module hooked the way Opacus hooks it; an in-place op on a hooked output fails there, and
    the PlanError names the op's source line and the module it runs in. Without shapes nothing runs."""
    failure = _first_in_place_op(model, example_shapes)
    if failure is not None:
        raise failure[1]


def _first_in_place_op(
    model: nn.Module, example_shapes: tuple[tuple[int, ...], ...]
) -> tuple[tuple[str, int] | None, PlanError] | None:
    """The first in-place op on a hooked output a hooked forward meets: its source line (file, number)
    and the PlanError that names it; None when the forward passes (or there are no shapes to run)."""
    if not example_shapes:
        return None
    probe = copy.deepcopy(model)
    inputs = [torch.randn(shape) for shape in example_shapes]
    running: list[str] = []
    with _opacus_like_hooks(probe, running):
        try:
            _forward_in_either_mode(probe, inputs)
        except RuntimeError as exc:
            if "BackwardHookFunction" not in str(exc):
                return None  # some other failure: not this check's to report
            where = _innermost_model_line(exc)
            path = running[-1] if running else ""
            module = f"the forward of {path} ({qualname(probe.get_submodule(path))})" if path else \
                f"the model's own forward ({qualname(model)})"
            error = PlanError(
                f"{where}, in {module}, modifies a hooked module's output in place; Opacus' per-sample "
                f"gradients fail on it (Output of BackwardHookFunction modified inplace). {qualname(model)} does "
                f"not trace with torch.fx, and normswap could not rewrite that line in a submodule that does: "
                f"make it out-of-place (e.g. x = x + y for x += y)."
            )
            error.__cause__ = exc
            frame = _innermost_model_frame(exc)
            return ((frame.filename, frame.lineno or 0) if frame else None), error
    return None


def _forward_in_either_mode(probe: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Train mode, as Opacus trains; where the train-mode forward needs more than inputs (a torchvision
    detector asserts that targets are given), eval mode, which runs the same layers with the same hooks."""
    try:
        probe.train()(*inputs)
    except Exception as exc:  # noqa: BLE001 - only the in-place failure is this check's; the rest is the model's
        if "BackwardHookFunction" in str(exc):
            raise
        probe.eval()(*inputs)


@contextmanager
def _opacus_like_hooks(model: nn.Module, running: list[str]) -> Iterator[None]:
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda *_a, p=path: running.append(p)))
        handles.append(module.register_forward_hook(lambda *_a: running.pop() and None))
        if hooked(module):
            handles.append(module.register_full_backward_hook(lambda *_a: None))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _innermost_model_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not library_frame(f.filename)]
    return frames[-1] if frames else None


def _innermost_model_line(exc: BaseException) -> str:
    frame = _innermost_model_frame(exc)
    return f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else "an in-place op"

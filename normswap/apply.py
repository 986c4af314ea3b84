"""Carrying out a plan: preflight every entry, then swap, so a failure leaves nothing half-done.

Module sites are swapped through their parent (at every path a shared module is reachable by), so
state_dict keys stay stable and the model keeps its class and methods. Functional ``batch_norm``
calls are not modules: only they force a graph rewrite, and then the result is a GraphModule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .cloning import clone_model
from .errors import PlanError
from .inplace import make_out_of_place
from .targets import get_target
from .tracing import (
    ModuleIndex,
    is_functional_batch_norm,
    is_site_module,
    model_state_guard,
    qualname,
    site_features,
    trace_graph,
)
from .transfer import NormState
from .types import Plan, PlanEntry, SwapRecord

RUNNING_STAT_NAMES = ("running_mean", "running_var")


@dataclass
class Applied:
    model: nn.Module
    swaps: list[SwapRecord]
    warnings: list[str]
    batchnorm_left: list[str]


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False) -> Applied:
    """Apply ``plan`` to ``model`` (a copy unless ``inplace``); weights are transferred as planned."""
    target_model = model if inplace else clone_model(model, borrow=_replaced(model, plan))
    index = ModuleIndex.of(target_model)
    modules = index.by_path
    _check_fits(target_model, plan, modules)
    graph = _trace_for_rewrite(target_model) if plan.needs_graph() else None
    staged = _stage(target_model, plan, graph, modules)
    for path, module in staged.modules.items():
        _swap_module(target_model, path, module, index.aliases, modules)
    if not inplace:
        _empty_replaced(plan, modules)
    warnings = []
    if graph is not None:
        target_model = _rewrite_functional(target_model, graph, staged.functional)
        warnings.append(
            "functional batch_norm calls were rewritten, so the result is a torch.fx GraphModule: "
            "methods of the original class are gone and control flow is fixed as traced "
            f"({'train' if model.training else 'eval'} mode)."
        )
    if plan.trace != "fx":
        warnings.append(_untraced_warning(plan))
    if "out-of-place" in plan.ensure:  # last: it traces the converted model, GraphModule or not
        done = make_out_of_place(target_model, plan.trace == "fx", plan.example_input_shapes)
        target_model = done.model
        warnings += done.warnings()
    left = check_result(target_model, plan)
    return Applied(target_model, staged.records, warnings, left)


def _untraced_warning(plan: Plan) -> str:
    hooks = sum(1 for e in plan.entries if not e.site.traced)
    parts = sorted({e.site.learned_by[3:] for e in plan.entries if e.site.learned_by.startswith("fx:")})
    if not parts:
        return (f"the model did not trace ({plan.trace_error}); module sites were learned from forward "
                "hooks, so none could be folded, and functional batch_norm calls could not be rewritten.")
    shown = ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")
    return (f"the model did not trace whole ({plan.trace_error}); {len(plan.entries) - hooks} of "
            f"{len(plan.entries)} sites were learned from traces of its parts ({shown}), {hooks} from forward "
            "hooks alone (learned_by in the plan says which).")


def _replaced(model: nn.Module, plan: Plan) -> list[nn.Module]:
    """The modules the plan replaces (its BatchNorm sites, and the convs ``fold`` folds them into): their
    tensors are read, never kept, so the copy may borrow them from ``model`` (see ``clone_model``). A
    path the model lacks (a plan for another architecture) is skipped: ``_check_fits`` names it."""
    return _replaced_modules(plan, dict(model.named_modules(remove_duplicate=False)).get)


def _empty_replaced(plan: Plan, modules: dict[str, nn.Module]) -> None:
    """The copy's replaced modules held tensors borrowed from the user's model. They are out of the
    converted model now; emptied, a stray reference to one (a plain list of modules) fails loudly
    instead of sharing the user's tensors."""
    for old in _replaced_modules(plan, modules.get):
        old._parameters.clear()
        old._buffers.clear()


def _replaced_modules(plan: Plan, lookup: Callable[[str], nn.Module | None]) -> list[nn.Module]:
    paths = (p for e in plan.conversions if e.site.kind == "module" for p in _declared(e))
    found = (lookup(p) for p in dict.fromkeys(paths))
    return [m for m in found if m is not None]


def _declared(entry: PlanEntry) -> tuple[str, ...]:
    return get_target(entry.target or "").replaces(entry.site, entry.options)


@dataclass
class _Staged:
    modules: dict[str, nn.Module]
    functional: dict[str, tuple[str, nn.Module]]
    records: list[SwapRecord]


def _check_fits(model: nn.Module, plan: Plan, modules: dict[str, nn.Module]) -> None:
    """A plan made for another architecture fails here, with every mismatch named."""
    problems = []
    for e in plan.entries:
        site = e.site
        if site.kind != "module":
            continue
        m = modules.get(site.path)
        if m is None:
            problems.append(f"{site.path}: no such module")
            continue
        if qualname(m) != site.cls:
            problems.append(f"{site.path}: is {qualname(m)}, plan expects {site.cls}")
        elif (features := site_features(m) if is_site_module(m) else None) != site.num_features:
            problems.append(f"{site.path}: has {features} features, plan expects {site.num_features}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise PlanError(
            f"the plan (made for {plan.model_cls}) does not fit this {qualname(model)}: "
            f"{'; '.join(problems[:8])}{more}. Apply it to a fresh instance of the same architecture."
        )


def _trace_for_rewrite(model: nn.Module) -> fx.Graph:
    # Traced in the model's own mode: the GraphModule keeps whatever training-dependent branch it took.
    with model_state_guard(model, eval_mode=False):
        try:
            return trace_graph(model)
        except Exception as exc:
            raise PlanError(
                f"the plan converts functional batch_norm calls, which needs a torch.fx trace, but "
                f"{qualname(model)} did not trace: {type(exc).__name__}: {exc}"
            ) from exc


def _stage(model: nn.Module, plan: Plan, graph: fx.Graph | None, modules: dict[str, nn.Module]) -> _Staged:
    """Build every replacement before anything is swapped."""
    staged = _Staged({}, {}, [])
    nodes = {n.name: n for n in graph.nodes} if graph is not None else {}
    entries = plan.conversions
    olds = [modules[e.site.path] if e.site.kind == "module" else None for e in entries]
    states = [_state(model, e, old, nodes) for e, old in zip(entries, olds, strict=True)]
    for entry, old, built in zip(entries, olds, _build_all(model, entries, states), strict=True):
        site = entry.site
        if missing := [p for p in _declared(entry) if p not in built]:
            # the copy borrowed their tensors from the user's model: they must not stay in it
            raise PlanError(f"{site.path}: target {entry.target!r} declares it replaces {missing} but built no "
                            f"replacement for them.")
        for path, module in built.items():
            if path in staged.modules or any(path == p for p, _ in staged.functional.values()):
                raise PlanError(f"{path} would be replaced twice (by {site.path} and an earlier entry).")
            if site.kind == "functional" and path == site.path:
                staged.functional[site.node or ""] = (path, module)
            else:
                staged.modules[path] = module
        new = built[site.path]
        staged.records.append(
            SwapRecord(
                path=site.path,
                old_cls=site.cls if old is None else qualname(old),
                new_cls=qualname(new),
                target=entry.target or "",
                transfer=str(entry.options.get("transfer", "")),
                replaced=tuple(built),
            )
        )
    return staged


def _state(model: nn.Module, entry: PlanEntry, old: nn.Module | None, nodes: dict[str, fx.Node]) -> NormState:
    site = entry.site
    if old is not None:
        return NormState.from_module(old)
    node = nodes.get(site.node or "")
    if node is None or not is_functional_batch_norm(node):
        raise PlanError(
            f"{site.path}: functional batch_norm node {site.node!r} is not in this model's graph; "
            f"the plan does not fit this model."
        )
    return NormState.from_functional(model, node, site.num_features, model.training)


def _build_all(model: nn.Module, entries: tuple[PlanEntry, ...], states: list[NormState]) -> list[dict[str, nn.Module]]:
    """Each entry's replacements, in plan order; each target builds its sites together."""
    by_target: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        by_target.setdefault(entry.target or "", []).append(i)
    built: list[dict[str, nn.Module]] = [{}] * len(entries)
    for name, indices in by_target.items():
        items = [(entries[i].site, states[i], entries[i].options) for i in indices]
        try:
            together = get_target(name).build_all(model, items)
        except Exception:  # built one by one, so the error names the site that failed
            together = [_build(model, entries[i], states[i]) for i in indices]
        for i, modules in zip(indices, together, strict=True):
            built[i] = modules
    return built


def _build(model: nn.Module, entry: PlanEntry, state: NormState) -> dict[str, nn.Module]:
    try:
        return get_target(entry.target or "").build(model, entry.site, state, entry.options)
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(
            f"{entry.site.path}: building target {entry.target!r} with options {dict(entry.options)} "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc


def _swap_module(
    model: nn.Module,
    path: str,
    new: nn.Module,
    aliases: dict[int, list[str]],
    modules: dict[str, nn.Module] | None = None,
) -> None:
    """Put ``new`` at ``path`` and every alias of the module there. ``modules`` (all paths, taken before
    any swap) spares a lookup per call: swapped modules are never parents of other sites."""
    modules = modules if modules is not None else dict(model.named_modules(remove_duplicate=False))
    for alias in aliases.get(id(modules[path]), [path]):
        parent_path, _, name = alias.rpartition(".")
        setattr(modules[parent_path], name, new)


def _rewrite_functional(
    model: nn.Module, graph: fx.Graph, functional: dict[str, tuple[str, nn.Module]]
) -> fx.GraphModule:
    for node_name, (path, module) in functional.items():
        node = next(n for n in graph.nodes if n.name == node_name)
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if hasattr(owner, name):
            raise PlanError(f"cannot add the replacement for {path}: {owner_path or 'the model'} already has {name!r}.")
        owner.add_module(name, module)
        with graph.inserting_before(node):
            new_node = graph.call_module(path, (node.args[0] if node.args else node.kwargs["input"],))
        node.replace_all_uses_with(new_node)
        graph.erase_node(node)
    _drop_dead_state(model, graph)
    graph.lint()
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _drop_dead_state(model: nn.Module, graph: fx.Graph) -> None:
    """get_attr nodes the rewritten calls no longer use go, with the tensors they pointed at, so no
    running statistics linger (what the dp recipe promises)."""
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = str(node.target)
            graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                owner_path, _, name = target.rpartition(".")
                owner = model.get_submodule(owner_path) if owner_path else model
                if name in owner._buffers or name in owner._parameters:
                    delattr(owner, name)


def batchnorm_left(model: nn.Module) -> list[str]:
    """Paths of BatchNorm modules, and functional batch_norm nodes of a GraphModule, still present."""
    left = [p for p, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if isinstance(model, fx.GraphModule):
        left += [n.name for n in model.graph.nodes if is_functional_batch_norm(n)]
    return left


def running_stats_left(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in RUNNING_STAT_NAMES]


def check_result(model: nn.Module, plan: Plan) -> list[str]:
    """Verify what the recipe promised on the model itself, not on the plan; returns the BatchNorm left."""
    left = batchnorm_left(model)
    if "no-batchnorm" in plan.ensure and left:
        raise PlanError(
            f"recipe {plan.recipe!r} ensures no-batchnorm, yet BatchNorm remains at: {', '.join(left[:10])}."
        )
    if "no-running-stats" in plan.ensure and (stats := running_stats_left(model)):
        raise PlanError(
            f"recipe {plan.recipe!r} ensures no-running-stats, yet running statistics remain at: "
            f"{', '.join(stats[:10])}."
        )
    return left

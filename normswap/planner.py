"""From sites to a plan: the first matching rule per site, its target resolved, the reason kept.

Pure: nothing here changes a model. ``normswap inspect`` stops after this step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import PlanError
from .recipes import ERROR, KEEP, Recipe, Rule
from .targets import NotApplicable, get_target
from .tracing import Discovery
from .types import BATCHNORM1D_LAYOUTS, Facts, Plan, PlanEntry, Site


def build_plan(model_cls: str, discovery: Discovery, recipe: Recipe, facts: Facts) -> Plan:
    entries = []
    used: set[str] = set()
    for site in discovery.sites:
        entry = plan_site(site, recipe, facts)
        if entry.rule is not None:
            used.add(entry.rule)
        entries.append(entry)
    plan = Plan(
        model_cls=model_cls,
        recipe=recipe.name,
        facts=facts,
        entries=tuple(entries),
        other_norms=tuple(discovery.other_norms),
        unmatched_rules=tuple(r.name for r in recipe.rules if r.name not in used),
        ensure=recipe.ensure,
        recovery=recipe.recovery,
        trace=discovery.trace,
        trace_error=discovery.trace_error,
        example_input_shapes=discovery.input_shapes,
    )
    check_ensured(plan, recipe)
    return plan


def layout_matters(plan: Plan, recipe: Recipe, facts: Facts) -> bool:
    """Whether any site whose layout was guessed, not seen, would be planned differently under another
    layout it may have: then the model must run to see it. Targets build layout-agnostic layers for a
    guessed layout (ChannelLayerNorm normalizes dim 1 of N×C and N×C×L alike), so equal decisions
    mean equal models."""
    for entry in plan.entries:
        site = entry.site
        if not site.layout_inferred:
            continue
        if site.layout not in BATCHNORM1D_LAYOUTS:  # no known alternatives: look
            return True
        for layout in BATCHNORM1D_LAYOUTS:
            if layout == site.layout:
                continue
            try:
                other = plan_site(dataclasses.replace(site, layout=layout), recipe, facts)
            except PlanError:
                return True
            if (other.action, other.target, other.options) != (entry.action, entry.target, entry.options):
                return True
    return False


def plan_site(site: Site, recipe: Recipe, facts: Facts) -> PlanEntry:
    for rule in recipe.rules:
        why = rule.match.explain(site, facts)
        if why is not None:
            return _apply_rule(site, rule, why, recipe)
    return PlanEntry(site, None, "keep", None, {}, "no rule matched")


def _apply_rule(site: Site, rule: Rule, why: str, recipe: Recipe) -> PlanEntry:
    if rule.target == KEEP:
        return PlanEntry(site, rule.name, "keep", None, {}, why)
    try:
        return _convert(site, rule, rule.target, rule.options, why)
    except NotApplicable as exc:
        reason = str(exc)
    refused = [f"{rule.target} ({reason})"]
    for fallback in rule.fallback:
        if fallback == KEEP:
            return PlanEntry(site, rule.name, "keep", None, {}, f"{why}; not applicable: {'; '.join(refused)}")
        if fallback == ERROR:
            break
        try:
            return _convert(
                site,
                rule,
                fallback,
                rule.fallback_options.get(fallback, {}),
                f"{why}; fallback, not applicable: {'; '.join(refused)}",
            )
        except NotApplicable as exc:
            refused.append(f"{fallback} ({exc})")
    where = f"rule {rule.name!r} of recipe {recipe.name!r} ({recipe.source})"
    raise PlanError(
        f"{site.path}: {where}: no target applies: {'; '.join(refused)}. Give the rule a fallback "
        f'(fallback = ["frozen", "keep"], say) or exclude this path.'
    )


def _convert(site: Site, rule: Rule, target_name: str, options: Mapping[str, Any], why: str) -> PlanEntry:
    if site.kind == "functional" and site.learned_by != "fx":
        raise NotApplicable(
            "a functional batch_norm call can only be rewritten in an fx graph, and this model does not trace"
        )
    target = get_target(target_name)
    resolved = target.resolve(site, target.check_options(options, f"rule {rule.name!r} options"))
    return PlanEntry(site, rule.name, "convert", target_name, resolved, why)


def check_ensured(plan: Plan, recipe: Recipe) -> None:
    """Fail at plan time when a recipe's promise cannot be kept, naming every offending site."""
    problems = []
    for e in plan.entries:
        if "no-batchnorm" in recipe.ensure and e.action == "keep":
            problems.append(f"{e.site.path} stays BatchNorm ({e.reason})")
        if (
            "no-running-stats" in recipe.ensure
            and e.action == "convert"
            and get_target(e.target or "").keeps_running_stats
        ):
            problems.append(f"{e.site.path} becomes {e.target}, which keeps running statistics")
    if problems:
        listing = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise PlanError(
            f"recipe {recipe.name!r} ensures {', '.join(recipe.ensure)} but: {listing}. "
            f"Adjust the recipe's rules or fallbacks."
        )

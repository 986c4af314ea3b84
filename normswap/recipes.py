"""Recipes: ordered rules, first match wins, loaded strictly from TOML.

A recipe file looks like::

    [recipe]
    name = "small-batch"
    description = "..."
    ensure = ["no-batchnorm"]

    [[rules]]
    name = "images-to-groupnorm"
    match = { layouts = ["image", "volume"] }
    target = "groupnorm"
    options = { groups = 32 }
    fallback = ["layernorm-chw", "keep"]

Every key is checked: an unknown key, a wrong type or an unknown target fails with the file, the key
path and the valid choices.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import RecipeError, UnknownNameError, unknown_name
from .targets import get_target
from .types import LAYOUTS, PURPOSES, TASKS, Facts, RecoveryDefaults, Site

KEEP = "keep"
ERROR = "error"
# out-of-place: no in-place op on an output Opacus hooks (see normswap.inplace), so DP-SGD trains as-is.
ENSURES = ("no-batchnorm", "no-running-stats", "out-of-place")
KINDS = ("module", "functional")


def builtin_recipe_dir() -> Path:
    """``recipes/`` of a checkout or editable install; the packaged copy otherwise."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("normswap.recipes")))


def builtin_recipes() -> list[str]:
    """The names of the shipped recipes (``recipes/*.toml``), each loadable by :func:`load_recipe`."""
    return sorted(p.stem for p in builtin_recipe_dir().glob("*.toml"))


@dataclass(frozen=True)
class Match:
    """Conditions a site (and the user's facts) must meet; an empty field matches everything."""

    classes: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layouts: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    min_channels: int | None = None
    max_channels: int | None = None
    batch_size_max: int | None = None
    batch_size_min: int | None = None
    sequence: bool | None = None
    purpose: tuple[str, ...] = ()
    task: tuple[str, ...] = ()
    frozen: bool | None = None

    def explain(self, site: Site, facts: Facts) -> str | None:
        """Why this matches (a short text), or None when it does not."""
        why: list[str] = []
        checks = (self._classes, self._paths, self._layout, self._kind, self._frozen, self._channels, self._facts)
        for check in checks:
            result = check(site, facts)
            if result is None:
                return None
            if result:
                why.append(result)
        return ", ".join(why) if why else "matches every site"

    def _classes(self, site: Site, facts: Facts) -> str | None:
        if not self.classes:
            return ""
        names = set(site.mro or (site.cls,))
        names |= {n.rsplit(".", 1)[-1] for n in names}
        hit = next((c for c in self.classes if c in names), None)
        return None if hit is None else f"class {site.short_cls} is a {hit}"

    def _paths(self, site: Site, facts: Facts) -> str | None:
        paths = (site.path, *site.aliases)
        if self.include and not any(_path_matches(p, pat) for p in paths for pat in self.include):
            return None
        if any(_path_matches(p, pat) for p in paths for pat in self.exclude):
            return None
        return f"path {site.path} included" if self.include else ""

    def _layout(self, site: Site, facts: Facts) -> str | None:
        if not self.layouts:
            return ""
        if site.layout not in self.layouts:
            return None
        # A guessed layout is one the model was not run to see (the planner checked it does not matter).
        return f"layout={site.layout}" + (" (guessed, not run)" if site.layout_inferred else "")

    def _kind(self, site: Site, facts: Facts) -> str | None:
        if not self.kinds:
            return ""
        return f"kind={site.kind}" if site.kind in self.kinds else None

    def _frozen(self, site: Site, facts: Facts) -> str | None:
        if self.frozen is None:
            return ""
        if site.frozen is not self.frozen:
            return None
        return "frozen BatchNorm" if site.frozen else "not frozen"

    def _channels(self, site: Site, facts: Facts) -> str | None:
        if self.min_channels is not None and site.num_features < self.min_channels:
            return None
        if self.max_channels is not None and site.num_features > self.max_channels:
            return None
        bounded = self.min_channels is not None or self.max_channels is not None
        return f"C={site.num_features}" if bounded else ""

    def _facts(self, site: Site, facts: Facts) -> str | None:
        why = []
        if self.batch_size_max is not None or self.batch_size_min is not None:
            b = facts.batch_size
            if b is None:
                return None
            if self.batch_size_max is not None and b > self.batch_size_max:
                return None
            if self.batch_size_min is not None and b < self.batch_size_min:
                return None
            why.append(f"batch_size={b}")
        for name, wanted in (("purpose", self.purpose), ("task", self.task)):
            value = getattr(facts, name)
            if wanted:
                if value not in wanted:
                    return None
                why.append(f"{name}={value}")
        if self.sequence is not None:
            if facts.sequence is not self.sequence:
                return None
            why.append(f"sequence={str(self.sequence).lower()}")
        return ", ".join(why)


def _path_matches(path: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


@dataclass(frozen=True)
class Rule:
    """When ``match`` holds, convert to ``target`` (or ``keep``). Where the target does not apply, the
    ``fallback`` targets are tried in order; ``keep`` keeps the site, ``error`` (the default, and the
    implied end of every chain) stops the plan with the reason. ``fallback_options`` holds options per
    fallback target name."""

    name: str
    match: Match = field(default_factory=Match)
    target: str = KEEP
    options: Mapping[str, Any] = field(default_factory=dict)
    fallback: tuple[str, ...] = (ERROR,)
    fallback_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    when: str = ""
    # What the converted network keeps of the original, and what it costs (``normswap recipes`` shows both).
    keeps: str = ""
    costs: str = ""
    ensure: tuple[str, ...] = ()
    recovery: RecoveryDefaults = RecoveryDefaults()
    source: str = "<api>"

    def to_dict(self) -> dict[str, Any]:
        def match_dict(m: Match) -> dict[str, Any]:
            return {
                f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(m)
                if (v := getattr(m, f.name)) not in ((), None)
            }

        return {
            "recipe": {
                "name": self.name,
                "description": self.description,
                "when": self.when,
                **({"keeps": self.keeps} if self.keeps else {}),
                **({"costs": self.costs} if self.costs else {}),
                "ensure": list(self.ensure),
            },
            "rules": [
                {
                    "name": r.name,
                    "match": match_dict(r.match),
                    "target": r.target,
                    "options": dict(r.options),
                    "fallback": list(r.fallback),
                    "fallback_options": {k: dict(v) for k, v in r.fallback_options.items()},
                }
                for r in self.rules
            ],
            # TOML has no null: an unset default is left out, as a recipe file would leave it.
            **({"recovery": {"lr": self.recovery.lr}} if self.recovery.lr is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<api>") -> Recipe:
        return _parse_recipe(data, source)


_MATCH_TYPES: dict[str, tuple[type, Any]] = {
    "classes": (list, None),
    "include": (list, None),
    "exclude": (list, None),
    "layouts": (list, LAYOUTS),
    "kinds": (list, KINDS),
    "min_channels": (int, None),
    "max_channels": (int, None),
    "batch_size_max": (int, None),
    "batch_size_min": (int, None),
    "sequence": (bool, None),
    "frozen": (bool, None),
    "purpose": (list, PURPOSES),
    "task": (list, TASKS),
}
_RULE_KEYS = ("name", "match", "target", "options", "fallback", "fallback_options")
_HEADER_KEYS = ("name", "description", "when", "keeps", "costs", "ensure")
_RECOVERY_KEYS = ("lr",)


def _check_keys(table: Any, valid: tuple[str, ...] | Mapping[str, Any], where: str, source: str) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise RecipeError(f"{source}: {where} must be a table, got {type(table).__name__}.")
    for key in table:
        if key not in valid:
            raise _recipe_key_error(key, valid, where, source)
    return table


def _recipe_key_error(key: str, valid: Any, where: str, source: str) -> RecipeError:
    inner = unknown_name("key", key, valid, f"{source}: {where}")
    return RecipeError(str(inner))


def _parse_match(raw: Any, where: str, source: str) -> Match:
    table = _check_keys(raw, _MATCH_TYPES, where, source)
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind, choices = _MATCH_TYPES[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise RecipeError(f"{source}: {where}.{key} must be an integer, got {value!r}.")
        if not isinstance(value, kind):
            raise RecipeError(f"{source}: {where}.{key} must be a {kind.__name__}, got {type(value).__name__}.")
        if kind is list:
            for item in value:
                if not isinstance(item, str):
                    raise RecipeError(f"{source}: {where}.{key} must list strings, got {item!r}.")
                if choices is not None and item not in choices:
                    raise RecipeError(str(unknown_name(key.rstrip("s"), item, choices, f"{source}: {where}.{key}")))
                if key in ("include", "exclude") and item.startswith("re:"):
                    _compile(item[3:], f"{where}.{key}", source)
            value = tuple(value)
        values[key] = value
    return Match(**values)


def _compile(pattern: str, where: str, source: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{source}: {where}: bad regular expression {pattern!r}: {exc}.") from exc


def _parse_target(name: Any, options: Any, where: str, source: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(name, str):
        raise RecipeError(f"{source}: {where} must be a string, got {name!r}.")
    if name in allowed:
        if options:
            raise RecipeError(f"{source}: {where} is {name!r}, which takes no options.")
        return {}
    try:
        target = get_target(name)
    except UnknownNameError:
        from .targets import list_targets

        raise RecipeError(
            str(unknown_name("target", name, [*list_targets(), *allowed], f"{source}: {where}"))
        ) from None
    return dict(_check_options(target, options, where, source))


def _check_options(target: Any, options: Any, where: str, source: str) -> Mapping[str, Any]:
    _check_keys(options or {}, target.options, f"{where} options", source)
    try:
        target.check_options(options or {}, f"{source}: {where} options")
    except UnknownNameError as exc:
        raise RecipeError(str(exc)) from None
    return dict(options or {})


def _parse_rule(raw: Any, index: int, source: str) -> Rule:
    where = f"rules[{index}]"
    table = _check_keys(raw, _RULE_KEYS, where, source)
    name = table.get("name", f"rule-{index}")
    if not isinstance(name, str):
        raise RecipeError(f"{source}: {where}.name must be a string.")
    target = table.get("target", KEEP)
    options = _parse_target(target, table.get("options"), f"{where}.target", source, (KEEP,))
    fallback, fallback_options = _parse_fallback(table, where, source)
    return Rule(
        name=name,
        match=_parse_match(table.get("match", {}), f"{where}.match", source),
        target=target,
        options=options,
        fallback=fallback,
        fallback_options=fallback_options,
    )


def _parse_fallback(table: Mapping[str, Any], where: str, source: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    raw = table.get("fallback", ERROR)
    chain = (raw,) if isinstance(raw, str) else raw
    if not isinstance(chain, (list, tuple)) or not chain or not all(isinstance(t, str) for t in chain):
        raise RecipeError(f"{source}: {where}.fallback must be a target name or a list of them, got {raw!r}.")
    options = table.get("fallback_options", {})
    _check_keys(options, [t for t in chain if t not in (KEEP, ERROR)], f"{where}.fallback_options", source)
    resolved = {}
    for i, name in enumerate(chain):
        opts = _parse_target(name, options.get(name), f"{where}.fallback[{i}]", source, (KEEP, ERROR))
        if opts:
            resolved[name] = opts
        if name in (KEEP, ERROR) and i != len(chain) - 1:
            raise RecipeError(f"{source}: {where}.fallback: {name!r} ends a chain; nothing may follow it.")
    return tuple(chain), resolved


def _parse_recipe(data: Mapping[str, Any], source: str) -> Recipe:
    _check_keys(data, ("recipe", "rules", "recovery"), "top level", source)
    header = _check_keys(data.get("recipe", {}), _HEADER_KEYS, "[recipe]", source)
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list) or not rules_raw:
        raise RecipeError(f"{source}: a recipe needs at least one [[rules]] table.")
    rules = tuple(_parse_rule(r, i, source) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{source}: rule names must be unique; repeated: {', '.join(duplicates)}.")
    ensure = header.get("ensure", [])
    for item in ensure:
        if item not in ENSURES:
            raise RecipeError(str(unknown_name("ensure", str(item), ENSURES, f"{source}: [recipe].ensure")))
    for key in ("name", "description", "when", "keeps", "costs"):
        if key in header and not isinstance(header[key], str):
            raise RecipeError(f"{source}: [recipe].{key} must be a string.")
    default_name = Path(source).stem if source != "<api>" else "custom"
    return Recipe(
        name=header.get("name", default_name),
        rules=rules,
        description=header.get("description", ""),
        when=header.get("when", ""),
        keeps=header.get("keeps", ""),
        costs=header.get("costs", ""),
        ensure=tuple(ensure),
        recovery=_parse_recovery(data.get("recovery", {}), source),
        source=source,
    )


def _parse_recovery(table: Any, source: str) -> RecoveryDefaults:
    raw = _check_keys(table, _RECOVERY_KEYS, "[recovery]", source)
    lr = raw.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < 1):
        raise RecipeError(f"{source}: [recovery].lr must be a learning rate between 0 and 1, got {lr!r} "
                          f"(e.g. lr = 1e-5).")
    return RecoveryDefaults(lr=None if lr is None else float(lr))


def load_recipe(spec: str | Path | Recipe | Mapping[str, Any]) -> Recipe:
    """A Recipe from a built-in name, a TOML path, a dict, or a Recipe (returned as is)."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return _parse_recipe(spec, "<api>")
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist.")
        return _load_file(path)
    candidate = builtin_recipe_dir() / f"{spec}.toml"
    if not candidate.is_file():
        raise unknown_name("recipe", str(spec), builtin_recipes())
    return _load_file(candidate)


# Parsed recipe files by (path, modification time, size): a recipe is frozen, so one parse serves every
# conversion until the file changes (parsing and checking a built-in costs about a tenth of converting
# a small network).
_PARSED: dict[tuple[str, int, int], Recipe] = {}


def _load_file(path: Path) -> Recipe:
    try:
        stat = path.stat()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot be read: {exc}.") from exc
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    cached = _PARSED.get(key)
    if cached is None:
        cached = _parse_file(path)
        if len(_PARSED) >= 64:
            _PARSED.clear()
        _PARSED[key] = cached
    return cached


def _parse_file(path: Path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}.") from exc
    except OSError as exc:
        raise RecipeError(f"{path}: cannot be read: {exc}.") from exc
    return _parse_recipe(data, str(path))

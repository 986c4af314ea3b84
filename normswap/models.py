"""Turning a MODEL argument into a model: a timm name, ``module:factory``, or a saved conversion.

``module:factory`` imports and calls user code by design; normswap never does it implicitly (a
plain name is always looked up in timm).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelLoadError, unknown_name


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    if "timm" in spec:
        return create_timm(spec["timm"], pretrained=False, **dict(spec.get("kwargs", {})))
    if "factory" in spec:
        return call_factory(spec["factory"])
    raise ModelLoadError(f"unknown model spec {dict(spec)}; expected {{'timm': name}} or {{'factory': 'module:fn'}}.")


def create_timm(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]) and not timm.is_model(name):
        raise unknown_name("timm model", name, timm.list_models())
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained:
            raise ModelLoadError(
                f"could not get pretrained weights for {name!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). The hub is unreachable or the weights are "
                f"not published; without a network use --checkpoint FILE with local weights."
            ) from exc
        raise ModelLoadError(f"timm could not build {name!r}: {type(exc).__name__}: {exc}") from exc


def call_factory(spec: str) -> nn.Module:
    """Import ``module`` and call ``factory()``, with the current folder first on ``sys.path`` as
    ``python -m`` has it, so a package next to where the command runs is found. ``sys.path`` is
    restored afterwards."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model spec {spec!r} must look like 'package.module:factory'.")
    with _current_folder_importable():
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelLoadError(f"cannot import {spec!r} (from {os.getcwd()} or the installed packages): "
                                 f"{exc}") from exc
        except Exception as exc:  # the user's module itself raised while being imported
            raise ModelLoadError(f"importing {module_name!r} for {spec!r} raised {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from exc
        try:
            model = factory()
        except Exception as exc:
            raise ModelLoadError(f"{spec}() raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


@contextmanager
def _current_folder_importable() -> Iterator[None]:
    saved = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        sys.path[:] = saved


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def resolve_model(
    spec: str, pretrained: bool = False, checkpoint: str | None = None, key_mapping: str = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """The model a CLI MODEL argument names, and the spec to rebuild its architecture later."""
    from .io import is_saved_conversion, load, load_checkpoint, read_meta

    if is_saved_conversion(spec):
        return load(spec), dict(read_meta(spec).get("model") or {})
    if Path(spec).exists():
        raise ModelLoadError(
            f"{spec} is a path but not a saved normswap conversion (needs plan.json and "
            f"model.safetensors). For weights, name the architecture and pass --checkpoint {spec}."
        )
    if ":" in spec:
        model, record = call_factory(spec), {"factory": spec}
    else:
        model, record = create_timm(spec, pretrained=pretrained), {"timm": spec}
    if checkpoint:
        load_checkpoint(model, checkpoint, key_mapping)
    return model, record

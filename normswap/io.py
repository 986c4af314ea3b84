"""Saving and loading conversions, and reading checkpoints without running their code.

A saved conversion is a directory: ``model.safetensors`` (weights), ``plan.json`` (what to rebuild),
``normswap.json`` (how to build the original architecture, when known) and the report. Directories
are written to a temporary sibling and renamed into place, so a crash leaves the old result or the
new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, OutputExistsError, PlanError, UnsafeCheckpointError
from .types import Conversion, Plan, Report

WEIGHTS = "model.safetensors"
PLAN = "plan.json"
META = "normswap.json"
FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the modes a plain open() or
    mkdir() would, under the user's umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_directory(directory: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``directory`` in one rename."""
    final = Path(directory)
    if final.exists() and not force:
        raise OutputExistsError(
            f"output directory {str(final)!r} exists; pass force=True (CLI: --force) to replace it."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield staging
        _public(staging, directory=True)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        _public(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(
    conversion: Conversion, directory: str | Path, *, force: bool = False, model_spec: Mapping[str, Any] | None = None
) -> Path:
    """Write the converted weights, the plan and the report to ``directory``.

    ``model_spec`` (for example ``{"timm": "resnet50"}``) lets ``load(directory)`` rebuild the
    architecture by itself; without it, ``load`` needs a fresh model instance.
    """
    from safetensors.torch import save_model

    with atomic_directory(directory, force) as tmp:
        save_model(conversion.model, str(tmp / WEIGHTS))
        (tmp / PLAN).write_text(conversion.plan.to_json(), encoding="utf-8")
        write_reports(conversion.report, conversion.plan, tmp)
        meta = {"format": FORMAT_VERSION, "model": dict(model_spec or {}), "recipe": conversion.plan.recipe}
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(directory)


REPORT_FILES = ("report.json", "report.md", "report.html")


def write_reports(report: Report, plan: Plan | None, directory: str | Path) -> None:
    """report.json (schema-versioned), report.md and a self-contained report.html, each atomically."""
    from .html import report_html
    from .render import report_markdown

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "report.json", report.to_json())
    write_text_atomic(folder / "report.md", report_markdown(report, plan))
    write_text_atomic(folder / "report.html", report_html(report, plan))


def read_report(directory: str | Path) -> Report:
    path = Path(directory) / "report.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory} holds no report.json; was it written by normswap convert or validate?")
    try:
        return Report.from_json(path.read_text(encoding="utf-8"))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a normswap report ({type(exc).__name__}: {exc}).") from exc


def is_saved_conversion(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PLAN).is_file() and (p / WEIGHTS).is_file()


def read_plan(directory: str | Path) -> Plan:
    path = Path(directory) / PLAN
    if not path.is_file():
        raise ModelLoadError(f"{directory} is not a saved conversion: {PLAN} is missing.")
    return Plan.from_json(path.read_text(encoding="utf-8"))


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved conversion bit-exactly: apply its plan to ``model`` (a fresh instance of the
    original architecture; built from the saved model spec when omitted) and load the weights."""
    from safetensors.torch import load_model

    from .api import apply_plan

    plan = read_plan(directory)
    if model is None:
        from .models import build_from_spec

        spec = read_meta(directory).get("model") or {}
        if not spec:
            raise ModelLoadError(
                f"{directory} does not say how to build its architecture; pass a fresh model: "
                f"normswap.load(dir, model)."
            )
        model = build_from_spec(spec)
    converted = apply_plan(model, plan, inplace=True)
    try:
        missing, unexpected = load_model(converted, str(Path(directory) / WEIGHTS), strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"{directory}/{WEIGHTS} does not fit the converted model: {exc}") from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"{directory}/{WEIGHTS} does not fit the converted model: missing keys "
            f"{sorted(missing)[:10]}, unexpected keys {sorted(unexpected)[:10]}."
        )
    return converted


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a torch file loaded with ``weights_only=True``. A pickle
    that needs more than tensors and plain containers is refused: unpickling it could run code."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"checkpoint {str(file)!r} does not exist.")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as exc:
            raise ModelLoadError(f"checkpoint {file} is not a readable safetensors file: {exc}") from exc
    try:
        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {file} needs more than tensors to load ({str(exc).splitlines()[0]}). normswap loads "
            f"torch files with weights_only=True and never unpickles arbitrary objects, since that can run "
            f"code. Re-save just the state_dict (torch.save(model.state_dict(), f)) or convert it to "
            f"safetensors."
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"checkpoint {file} could not be read: {type(exc).__name__}: {exc}") from exc
    return _state_dict_of(data, file)


def _state_dict_of(data: Any, file: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model", "module", "ema"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(f"checkpoint {file} holds no state_dict (a mapping of names to tensors).")
    return dict(data)


KeyMapping = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]


def _by_name(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    own = model.state_dict()
    for prefix in ("", "module.", "model.", "backbone."):
        renamed = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd
        if renamed.keys() == own.keys():
            return renamed
    return None


def _by_order(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Checkpoints from other code bases: pair tensors in order when every shape matches."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    theirs = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    if len(own) != len(theirs) or any(a.shape != b.shape for a, (_, b) in zip(own.values(), theirs, strict=True)):
        return None
    return {k: v for k, (_, v) in zip(own, theirs, strict=True)}


KEY_MAPPINGS: dict[str, KeyMapping] = {"name": _by_name, "order": _by_order}


def load_checkpoint(model: nn.Module, path: str | Path, mapping: str = "auto") -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place): by name, with common prefixes stripped, or
    by order when every shape matches (``mapping='auto'`` tries both in that order)."""
    sd = read_checkpoint(path)
    names = list(KEY_MAPPINGS) if mapping == "auto" else [mapping]
    for name in names:
        if name not in KEY_MAPPINGS:
            from .errors import unknown_name

            raise unknown_name("key mapping", name, [*KEY_MAPPINGS, "auto"])
        mapped = KEY_MAPPINGS[name](model, sd)
        if mapped is not None:
            model.load_state_dict(mapped, strict=False)
            return model
    raise ModelLoadError(_mismatch_message(model, sd, path))


def _mismatch_message(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | Path) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    parts = [
        f"{len(missing)} missing ({', '.join(missing[:5])})" if missing else "",
        f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])})" if unexpected else "",
        f"{len(shapes)} shape mismatches ({'; '.join(shapes[:5])})" if shapes else "",
    ]
    detail = "; ".join(p for p in parts if p)
    return (
        f"checkpoint {path} does not fit {type(model).__name__}: {detail}. Neither names (with 'module.'/"
        f"'model.' prefixes stripped) nor order with matching shapes pair its tensors."
    )


__all__ = ["save", "load", "read_checkpoint", "load_checkpoint", "atomic_directory", "PlanError"]

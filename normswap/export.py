"""ONNX export of a (converted) model, checked: the file is loaded back in onnxruntime and its outputs
compared with PyTorch's before it is put in place.

The file is written next to its final path and renamed only once it loaded and matched, so a file that
onnxruntime would refuse is never left behind under the name asked for. onnx, onnxruntime and (for the
dynamo exporter) onnxscript are optional: ``pip install normswap[export]``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError, OutputExistsError, unknown_name
from .io import _public
from .tracing import as_input_tuple

EXPORTERS = ("legacy", "dynamo")
# The legacy exporter's most widely deployed opset; the dynamo exporter implements 18 and up.
DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduces PyTorch on the example inputs.

    ``opset`` is the one the file declares (read back when onnx is installed).
    ``max_abs_error`` and ``max_rel_error`` (the largest absolute difference over the largest absolute
    PyTorch output, across all outputs) are None when onnxruntime is not installed: then
    ``checked`` is False and the file was written unchecked.
    """

    path: Path
    exporter: str
    opset: int
    checked: bool
    max_abs_error: float | None
    max_rel_error: float | None
    export_seconds: float
    bytes: int

    def summary(self) -> str:
        if not self.checked:
            return f"{self.path}: {self.exporter} exporter, opset {self.opset}; not checked (onnxruntime not installed)"
        return (
            f"{self.path}: {self.exporter} exporter, opset {self.opset}; onnxruntime matches PyTorch: "
            f"max abs error {self.max_abs_error:.3g}, relative {self.max_rel_error:.3g}"
        )


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    exporter: str = "legacy",
    opset: int | None = None,
    dynamic_batch: bool = True,
    tolerance: float | None = DEFAULT_TOLERANCE,
    force: bool = False,
) -> ExportResult:
    """Export ``model`` (in eval mode; its own mode is restored) to ONNX at ``path`` and check it.

    ``exporter``: ``"legacy"`` (``torch.onnx.export(dynamo=False)``, TorchScript-based, what most
    deployment scripts still call; default opset 17) or ``"dynamo"`` (``torch.export``-based, needs
    onnxscript; default opset 18, the lowest it implements).
    With onnxruntime installed the file is loaded and run on ``example_inputs``; if it does not load, or
    its relative error exceeds ``tolerance`` (None: report only), :class:`ExportError` is raised and
    nothing is written at ``path``.
    """
    if exporter not in EXPORTERS:
        raise unknown_name("exporter", exporter, EXPORTERS)
    final = Path(path)
    if final.exists() and not force:
        raise OutputExistsError(f"{str(final)!r} exists; pass force=True (CLI: --force) to replace it.")
    inputs = as_input_tuple(example_inputs)
    opset = opset or DEFAULT_OPSET[exporter]
    final.parent.mkdir(parents=True, exist_ok=True)
    with _staged(final) as staging, _eval_mode(model):
        started = time.perf_counter()
        _export(model, inputs, staging, exporter, opset, dynamic_batch)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            expected = _flat_outputs(model(*inputs))
        errors = _onnxruntime_errors(staging, inputs, expected)
        if errors is not None and tolerance is not None and errors[1] > tolerance:
            raise ExportError(
                f"the ONNX file of {type(model).__name__} loads, but onnxruntime's outputs differ from PyTorch's by "
                f"{errors[1]:.3g} (relative; max abs {errors[0]:.3g}), more than the tolerance {tolerance:g}; "
                f"nothing written at {final}. Try exporter='dynamo' (CLI: --exporter dynamo), or raise the "
                "tolerance if the model is numerically sensitive."
            )
        size = staging.stat().st_size
        opset = _file_opset(staging) or opset
        _public(staging)
        os.replace(staging, final)
    return ExportResult(
        path=final,
        exporter=exporter,
        opset=opset,
        checked=errors is not None,
        max_abs_error=None if errors is None else errors[0],
        max_rel_error=None if errors is None else errors[1],
        export_seconds=seconds,
        bytes=size,
    )


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A temporary path next to ``final`` (same file system, so the rename is atomic), removed on failure."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        # The dynamo exporter may write large weights next to the file.
        with contextlib.suppress(FileNotFoundError):
            Path(name + ".data").unlink()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _export(model: nn.Module, inputs: tuple[Any, ...], file: Path, exporter: str, opset: int, dynamic: bool) -> None:
    names = [f"input_{i}" for i in range(len(inputs))]
    try:
        if exporter == "legacy":
            axes = {name: {0: "batch"} for name in names} if dynamic else None
            torch.onnx.export(model, inputs, str(file), dynamo=False, opset_version=opset, input_names=names,
                              dynamic_axes=axes)
        else:
            shapes = tuple({0: torch.export.Dim.AUTO} for _ in inputs) if dynamic else None
            program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, input_names=names,
                                        dynamic_shapes=shapes, verbose=False)
            program.save(str(file))
    except ImportError as exc:
        raise ExportError(f"the {exporter} ONNX exporter needs a package that is missing ({exc}); "
                          "pip install 'normswap[export]'.") from exc
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export ({exporter} exporter, opset {opset}) failed on {type(model).__name__}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
            f"Nothing was written. Try the other exporter ({'dynamo' if exporter == 'legacy' else 'legacy'})."
        ) from exc


def _file_opset(file: Path) -> int | None:
    """The default-domain opset the file declares (the dynamo exporter keeps 18 when it cannot convert
    down to the one asked for); None without the onnx package."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(file), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _flat_outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _flat_outputs(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in _flat_outputs(value)]
    return []


def _onnxruntime_errors(
    file: Path, inputs: tuple[Any, ...], expected: list[torch.Tensor]
) -> tuple[float, float] | None:
    """(max abs, relative) error of onnxruntime against ``expected``; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    try:
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs, strict=False)}
        got = session.run(None, feeds)
    except Exception as exc:
        raise ExportError(
            f"the exported ONNX file does not run in onnxruntime {onnxruntime.__version__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. Nothing was written. "
            "Try the other exporter, or report the layer this names."
        ) from exc
    if len(got) != len(expected):
        raise ExportError(f"onnxruntime returned {len(got)} outputs where PyTorch returns {len(expected)}; "
                          "nothing was written.")
    worst_abs, scale = 0.0, 0.0
    for value, reference in zip(got, expected, strict=True):
        ref = reference.detach().cpu().double()
        diff = (torch.from_numpy(value).double() - ref).abs()
        worst_abs = max(worst_abs, float(diff.max()) if diff.numel() else 0.0)
        scale = max(scale, float(ref.abs().max()) if ref.numel() else 0.0)
    return worst_abs, worst_abs / max(scale, 1e-12)

"""Every layer normswap produces × every deployment path: does it export, and does the exported
program compute what the eager layer does?

    pip install -e ".[export]"
    python benchmarks/export_matrix.py --write     # about a minute; rewrites BENCHMARKS.md § export-matrix

The layers are ``tests/test_export.py``'s catalogue (every module a normswap target builds, timm's
norm+act replacements, a progressive blend mid-transition), with affine and statistics far from their
defaults. Each cell is the largest error relative to the largest eager output on a 3×8×5×6 input: ONNX
files are run in onnxruntime (the legacy exporter at opset 17, the dynamo exporter at 18), the
others in PyTorch (``torch.export`` strict, TorchScript ``script`` and ``trace``, ``torch.compile``
with the ``aot_eager`` backend, which captures the graph without a C++ build). ✗ gives the error.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import RESULTS, command_line, machine, publish, save_json, versions  # noqa: E402
from normswap.export import export_onnx  # noqa: E402

SECTION = "export-matrix"
TESTS = Path(__file__).resolve().parent.parent / "tests" / "test_export.py"


def catalogue() -> Any:
    """tests/test_export.py, whose LAYERS, _layer and _input the tests hold these layers to."""
    spec = importlib.util.spec_from_file_location("normswap_test_export", TESTS)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def onnx_path(exporter: str) -> Callable[[nn.Module, torch.Tensor], float]:
    def run(layer: nn.Module, x: torch.Tensor) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            result = export_onnx(layer, x, Path(tmp) / "m.onnx", exporter=exporter, tolerance=None)
        if result.max_rel_error is None:
            raise RuntimeError("not checked: onnxruntime is not installed")
        return result.max_rel_error

    return run


def torch_export(layer: nn.Module, x: torch.Tensor) -> float:
    return relative_error(torch.export.export(layer, (x,), strict=True).module()(x), layer(x))


def script(layer: nn.Module, x: torch.Tensor) -> float:
    return relative_error(torch.jit.script(layer)(x), layer(x))


def trace(layer: nn.Module, x: torch.Tensor) -> float:
    return relative_error(torch.jit.trace(layer, x)(x), layer(x))


def compiled(layer: nn.Module, x: torch.Tensor) -> float:
    torch._dynamo.reset()
    return relative_error(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))


PATHS: dict[str, Callable[[nn.Module, torch.Tensor], float]] = {
    "ONNX legacy (opset 17) in onnxruntime": onnx_path("legacy"),
    "ONNX dynamo (opset 18) in onnxruntime": onnx_path("dynamo"),
    "torch.export strict": torch_export,
    "TorchScript script": script,
    "TorchScript trace": trace,
    "torch.compile (aot_eager)": compiled,
}


def measure() -> list[dict[str, Any]]:
    tests = catalogue()
    rows = []
    for name in tests.LAYERS:
        row: dict[str, Any] = {"layer": name, "cells": {}}
        for path, run in PATHS.items():
            start = time.perf_counter()
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    error = run(tests._layer(name), tests._input())
                row["cells"][path] = {"ok": error <= tests.TOLERANCE, "relative_error": error}
            except Exception as exc:  # noqa: BLE001 - a failing path is what the matrix reports
                row["cells"][path] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
            row["cells"][path]["seconds"] = round(time.perf_counter() - start, 2)
            print(f"{name} · {path}: {row['cells'][path]}", file=sys.stderr)
        rows.append(row)
    return rows


def cell(c: dict[str, Any]) -> str:
    if "error" in c:
        return f"✗ {c['error']}"
    return f"{'✓' if c['ok'] else '✗'} {c['relative_error']:.0e}"


def render(result: dict[str, Any]) -> str:
    rows, paths = result["rows"], list(PATHS)
    passed = sum(c["ok"] for r in rows for c in r["cells"].values())
    total = sum(len(r["cells"]) for r in rows)
    v = result["versions"]
    lines = [
        "## Export matrix: every layer × every deployment path",
        "",
        f"`{result['command']}` · torch {v['torch']}, onnx {v.get('onnx')}, onnxruntime {v.get('onnxruntime')}, "
        f"onnxscript {v.get('onnxscript')} · {result['machine']['cpu']}.",
        "",
        f"**{passed}/{total}** (layer, path) pairs export and match the eager layer to ≤ 1e-4 relative; each cell "
        "is the largest error relative to the largest output.",
        "",
        "| layer | " + " | ".join(paths) + " |",
        "|---|" + "---|" * len(paths),
    ]
    lines += [f"| {r['layer']} | " + " | ".join(cell(r["cells"][p]) for p in paths) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the export-matrix section of BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="render the saved results again")
    args = parser.parse_args()
    raw = RESULTS / "export_matrix.json"
    if args.render_only:
        import json

        result = json.loads(raw.read_text())
    else:
        torch.set_num_threads(1)
        result = {"command": command_line().replace(" --write", "") + " --write",
                  "versions": versions("onnx", "onnxruntime", "onnxscript"), "machine": machine(), "rows": measure()}
        raw = save_json("export_matrix.json", result)
    publish(SECTION, render(result), raw, args.write)


if __name__ == "__main__":
    main()

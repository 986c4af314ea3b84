"""The benchmarks' shared harness: API detection, timing, agreement metrics, JSON results, and
:func:`publish`, which writes each benchmark's full tables under ``benchmarks/results/`` and their summary
into its section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import normswap
import normswap.io
from normswap.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
RESULTS = Path(__file__).resolve().parent / "results"


def api(name: str) -> Callable[..., Any] | None:
    """A normswap entry point, or None while it is not implemented yet."""
    return getattr(normswap, name, None)


def missing_note(name: str) -> str:
    return f"skipped: `normswap.{name}` does not exist in this checkout yet"


def image_rule(recipe: dict[str, Any]) -> dict[str, Any]:
    """The rule of a recipe (as a dict) that matches image layouts."""
    return next(rule for rule in recipe["rules"] if "image" in rule["match"].get("layouts", []))


def pretrained_small_batch_with(target: str, eps: float) -> dict[str, Any]:
    """The shipped ``pretrained-small-batch`` recipe with its image rule's target and eps replaced."""
    recipe = load_recipe("pretrained-small-batch").to_dict()
    rule = image_rule(recipe)
    rule["target"], rule["options"]["eps"] = target, float(eps)
    return recipe


def shipped_image_eps() -> float:
    """The image rule's eps of the shipped ``pretrained-small-batch`` recipe: the value its rows are measured at."""
    return float(image_rule(load_recipe("pretrained-small-batch").to_dict())["options"]["eps"])


@torch.no_grad()
def normalized_share(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 32) -> dict[str, Any] | None:
    """How much of each sample's scale the model's per-sample RMS norms divide away, on inputs ``x``.

    A ``GroupRMSNorm`` computes x/√(m + eps), m the mean square of the sample's group: scale the input by a
    and the output's log-scale moves by eps/(m + eps) of log a. So m/(m + eps) is the share of a change in
    scale the layer normalizes away (1: a plain RMSNorm; 0: a fixed rescaling, as a frozen BatchNorm).
    Per site the mean over samples and groups; then the mean, lowest and highest over sites. None where the
    model has no such layer."""
    sums: dict[str, list[float]] = {}

    def hook(name: str, module: normswap.GroupRMSNorm) -> Callable[..., None]:
        def record(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            t = inputs[0].float()
            m = t.reshape(len(t), module.num_groups, -1).pow(2).mean(-1)
            total = sums.setdefault(name, [0.0, 0.0])
            total[0] += float((m / (m + module.eps)).sum())
            total[1] += m.numel()
        return record

    handles = [module.register_forward_pre_hook(hook(name, module)) for name, module in model.named_modules()
               if isinstance(module, normswap.GroupRMSNorm)]
    if not handles:
        return None
    try:
        logits_of(model, x, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    shares = [total / count for total, count in sums.values()]
    return {"mean": sum(shares) / len(shares), "lowest": min(shares), "highest": max(shares), "sites": len(shares)}


def small_batch_recipe(transfer: str, groups: int = 32, eps: float | None = None) -> dict[str, Any]:
    """The small-batch recipe with every rule's transfer pinned (images → GroupNorm, rest → LayerNorm),
    and optionally the image norms' eps."""
    image_options: dict[str, Any] = {"groups": groups, "transfer": transfer}
    if eps is not None:
        image_options["eps"] = eps
    return {
        "rules": [
            {
                "name": "images-to-groupnorm",
                "match": {"layouts": ["image", "volume", "unknown"]},
                "target": "groupnorm",
                "options": image_options,
            },
            {"name": "features-to-layernorm", "target": "layernorm", "options": {"transfer": transfer}},
        ]
    }


class Clock:
    """Wall time and this process's CPU time (all threads) of a block."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3)}


@contextmanager
def clock() -> Iterator[Clock]:
    c = Clock()
    w0, p0 = time.perf_counter(), time.process_time()
    try:
        yield c
    finally:
        c.wall_s = time.perf_counter() - w0
        c.cpu_s = time.process_time() - p0


def interleaved_convert(model: torch.nn.Module, x: torch.Tensor, recipe: str,
                        rounds: int) -> tuple[float, float, list[Any]]:
    """Median seconds of one batch-1 eval forward and of one ``convert(validate=False)``, timed in turn
    each round so machine load hits both alike (after one warm-up of each), and the conversions."""
    with torch.no_grad():
        model(x)  # warm-up: allocator and kernels
    normswap.convert(model, recipe, x, validate=False, batch_size=2)
    forward, convert, conversions = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        t1 = time.perf_counter()
        conversions.append(normswap.convert(model, recipe, x, validate=False, batch_size=2))
        forward.append(t1 - t0)
        convert.append(time.perf_counter() - t1)
    return statistics.median(forward), statistics.median(convert), conversions


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 64, device: Any = None) -> torch.Tensor:
    """Eval-mode logits on the CPU, in batches (sent to ``device`` when given); the mode is restored."""
    was = model.training
    model.eval()
    try:
        chunks = (x[i : i + batch_size] for i in range(0, len(x), batch_size))
        return torch.cat([model(c if device is None else c.to(device)).float().cpu() for c in chunks])
    finally:
        model.train(was)


class MethodBench:
    """Runs methods one by one, scores each model, records the row, and keeps going when one fails.
    Subclasses say how a model is scored (``score``) and how a row is summarised (``summary``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self, row: dict[str, Any]) -> str:
        raise NotImplementedError

    def record(self, method: str, how: str, fn: Any, *, needs: tuple[str, ...] = ()) -> dict[str, Any]:
        row: dict[str, Any] = {"method": method, "how": how}
        absent = [n for n in needs if api(n) is None]
        if absent:
            row.update(status="skipped", note="; ".join(missing_note(n) for n in absent))
            print(f"[skip] {method}: {row['note']}", flush=True)
            self.rows.append(row)
            return row
        print(f"[run ] {method} …", flush=True)
        try:
            with clock() as c:
                out = fn()
            model, extra = out if isinstance(out, tuple) else (out, {})
            with clock() as s:
                scores = self.score(model)
            row.update(status="ok", **c.as_dict(), **extra, **scores, score_wall_s=round(s.wall_s, 3))
            row["model"] = model
            print(f"       {self.summary(row)}", flush=True)
        except Exception as exc:  # a bug in one method must not hide the others' numbers
            row.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            print(f"[FAIL] {method}: {row['error']}\n{row['traceback']}", file=sys.stderr, flush=True)
        self.rows.append(row)
        return row


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 agreement with the reference's top-1 class, KL(reference ‖ logits) of the softmax
    (mean per sample, nats) and relative L2 of the logits."""
    ref_top1 = reference.argmax(-1)
    k = min(5, logits.shape[-1])
    top5 = logits.topk(k, -1).indices
    kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    rel = (logits - reference).norm() / reference.norm().clamp_min(1e-12)
    return {
        "top1_agreement": (logits.argmax(-1) == ref_top1).float().mean().item(),
        "top5_agreement": (top5 == ref_top1[:, None]).any(-1).float().mean().item(),
        "kl": kl.item(),
        "relative_l2": rel.item(),
    }


def versions(*extra: str) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "normswap": normswap.__version__}
    for name in ("timm", "numpy", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(v, 2) for v in load],
        "gpu": "none (CPU only)",
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command_line() -> str:
    script = Path(sys.argv[0])
    with suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def save_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    normswap.io.write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_section(section: str, text: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between ``<!-- begin SECTION -->`` and ``<!-- end SECTION -->`` (appended when
    missing); every other section is left as it is. Written atomically."""
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in content and end in content:
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, content, count=1, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    normswap.io.write_text_atomic(path, content)


# Columns and blocks that BENCHMARKS.md leaves to the full tables in benchmarks/results/SECTION.md.
DETAIL_COLUMNS = frozenset({"how", "wall s", "CPU s", "rel. L2", "top-5 agreement %",
                            "top-1 agreement, confident views %"})
DETAIL_PARAGRAPHS = ("Details",)
LONGEST_LINE = 360  # characters of prose a summary line keeps; the full tables keep all of it


def condensed(text: str, keep: tuple[str, ...] | None = None) -> str:
    """The summary of a rendered section: the ``### `` subsections whose heading starts with one of
    ``keep`` (all of them when None), without the descriptive table columns and the "Details" lists."""
    parts = re.split(r"(?m)^(?=### )", text)
    kept = [parts[0]] + [p for p in parts[1:] if keep is None or p[4:].startswith(keep)]
    blocks = "\n".join(kept).split("\n\n")
    out: list[str] = []
    skipping = False
    for block in blocks:
        if block.startswith(DETAIL_PARAGRAPHS) or block.startswith("Raw numbers"):
            skipping = True
            continue
        if skipping and block.lstrip().startswith("- "):
            continue
        skipping = False
        out.append("\n".join(_shortened(line) for line in _without_columns(block, DETAIL_COLUMNS).splitlines()
                              if not _undone_row(line)))
    return "\n\n".join(out).rstrip()


def _undone_row(line: str) -> bool:
    """A table row of a step that was undone: it repeats the row before it, so only the full tables keep it."""
    return line.startswith("|") and line.split("|")[1].strip().endswith("(undone)")


def _shortened(line: str) -> str:
    if len(line) <= LONGEST_LINE or line.startswith("|"):
        return line
    cut = line.rfind("; ", 0, LONGEST_LINE)
    cut = cut if cut > LONGEST_LINE // 2 else line.rfind(" ", 0, LONGEST_LINE)
    return line[:cut].rstrip(";,") + " … (full tables)"


def _without_columns(block: str, names: frozenset[str]) -> str:
    lines = block.splitlines()
    if len(lines) < 2 or not lines[0].startswith("|") or not set(lines[1]) <= set("|-: "):
        return block
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    drop = {i for i, c in enumerate(header) if c in names}
    if not drop:
        return block

    def cells(line: str) -> str:
        row = line.strip().strip("|").split("|")
        return "| " + " | ".join(c.strip() for i, c in enumerate(row) if i not in drop) + " |"

    return "\n".join(cells(line) if line.startswith("|") else line for line in lines)


def publish(section: str, text: str, raw: Path, write: bool, keep: tuple[str, ...] | None = None) -> None:
    """Print a benchmark's rendered tables and where its raw numbers are. With ``write``, the full
    tables go to ``benchmarks/results/SECTION.md`` and their summary (:func:`condensed`) into the
    section of BENCHMARKS.md."""
    print()
    print(text)
    print(f"\nraw results: {raw}")
    if write:
        full = RESULTS / f"{section}.md"
        normswap.io.write_text_atomic(full, text.rstrip() + "\n")
        summary = condensed(text, keep)
        summary += f"\n\nFull tables: `{full.relative_to(ROOT)}`; raw numbers: `{raw.relative_to(ROOT)}`."
        write_section(section, summary)
        print(f"BENCHMARKS.md: {section} section rewritten; full tables in {full}")


def pct(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}"


def mean_and_lowest(values: list[float]) -> str:
    """Fractions over seeds as "mean (≥ lowest)", in %."""
    return f"{pct(sum(values) / len(values))} (≥ {pct(min(values))})"


def num(v: float | None, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def secs(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"

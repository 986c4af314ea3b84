"""The timm zoo sweep: every BatchNorm model in timm through normswap's recipes, next to Opacus.

    python benchmarks/zoo.py --fast                       # one model per timm module (its smallest BN model)
    python benchmarks/zoo.py --full                       # every timm model that contains BatchNorm
    python benchmarks/zoo.py --full --max-size 64 --timing-size check --rounds 1 --jobs 2 --write
                                                          # all 743 on 2 cores in ~50 min (models that fix their
                                                          # resolution built for 64 px; speed from --fast)
    python benchmarks/zoo.py --models resnet18,levit_128s # just these
    python benchmarks/zoo.py --fast --max-size 64 --write # run (resuming), then render into BENCHMARKS.md
    python benchmarks/zoo.py --fast --write --no-run      # render what is recorded
    python benchmarks/zoo.py --full --retry-failed --device cuda  # redo the timed-out/crashed models on a GPU
    python benchmarks/zoo.py --full --redo A,B --recipes fold --no-opacus  # redo one recipe, keep the rest

Each model runs in its own process (forked from a forkserver that has torch, timm and normswap
imported) under a wall-clock limit, so a hang or a crash costs one model, not the sweep. Every result is
appended as one JSON line to ``benchmarks/results/zoo-<mode>.jsonl``; a restart skips the models
already recorded (``--retry-failed`` redoes those that timed out or crashed).

Per model and recipe (small-batch, sequence, dp, fold) it records how each site's context was learned,
sites found against BatchNorm modules present, BatchNorm left, output shape, batch independence
(small-batch, dp), fold exactness, plan round-trip (JSON and bit-exact replay onto a fresh instance),
conversion time against one batch-1 eval forward, and peak memory; and Opacus ``ModuleValidator.fix``
on the same model: BatchNorm left, whether the result runs, fix time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
import normswap.io
from normswap.apply import batchnorm_left
from normswap.checks import first_tensor
from normswap.cloning import clone_model
from normswap.tracing import model_state_guard, trace_graph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, publish  # noqa: E402
SECTION = "zoo"

RECIPES = ("small-batch", "sequence", "dp", "fold")
INDEPENDENCE_RECIPES = ("small-batch", "dp")  # the recipes that promise samples independent in train mode
NO_BN_RECIPES = ("small-batch", "dp")  # the recipes that promise no BatchNorm left
INDEPENDENT = 1e-4  # batch_dependence below this: samples independent
FOLD_EXACT = 1e-5  # relative L2 of eval outputs, original vs folded
# The original's own float32-vs-float64 gap above which its end-to-end output is rounding noise, so only
# the per-site fold check can say whether folding is exact.
CHAOTIC = 1e-3
BATCH = 2  # the smallest batch that can show batch dependence
FAILED_STATUSES = ("timeout", "crashed")
# A recipe's figures that depend on the timing input and the device (conversion runs at the timing size).
SIZE_DEPENDENT = ("forward_s", "convert_s", "plan_s", "ratio", "peak_mib", "peak_cuda_mib")

T = TypeVar("T")


def normswap_digest() -> str:
    """A short hash of the normswap code and recipes on disk: results from different versions of a
    package under active development must not be mixed unknowingly."""
    h = hashlib.sha256()
    package = Path(normswap.__file__).resolve().parent
    for path in sorted([*package.glob("*.py"), *(ROOT / "recipes").glob("*.toml")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# Enumeration


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str  # the timm module that registers the model
    params: int
    bn_modules: int
    bn_classes: dict[str, int]


def families() -> dict[str, str]:
    """Model name -> the timm module that registers it (timm's own notion of a model family)."""
    return {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}


def count_batchnorm(model: nn.Module) -> Counter[str]:
    """BatchNorm module objects by class name (shared modules counted once, as named_modules does)."""
    return Counter(type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm))


def meta_describe(name: str, family: str) -> ZooModel:
    # The meta device allocates nothing, so all ~1400 timm models can be sized and searched for
    # BatchNorm in a couple of minutes.
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    bn = count_batchnorm(model)
    return ZooModel(name, family, sum(p.numel() for p in model.parameters()), sum(bn.values()), dict(bn))


def index_path() -> Path:
    return RESULTS / "zoo-index.json"


def load_index(progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Every timm model built on the meta device, cached per timm version (it takes minutes; which
    models hold BatchNorm is timm's business, so another torch reuses the cache)."""
    versions = {"timm": timm.__version__, "torch": torch.__version__}
    path = index_path()
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("versions", {}).get("timm") == versions["timm"]:
            return cached
    started = time.perf_counter()
    owner = families()
    names = timm.list_models()
    models, failed = [], {}
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        try:
            models.append(asdict(meta_describe(name, owner.get(name, "?"))))
        except Exception as exc:  # recorded, not fatal: the index is a survey
            failed[name] = error_info(exc)["error"]
    index = {
        "versions": versions,
        "listed": len(names),
        "failed": failed,
        "seconds": time.perf_counter() - started,
        "models": models,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    normswap.io.write_text_atomic(path, json.dumps(index, indent=1))
    return index


def bn_models(index: dict[str, Any]) -> list[ZooModel]:
    return [ZooModel(**m) for m in index["models"] if m["bn_modules"] > 0]


def representatives(models: Sequence[ZooModel]) -> list[ZooModel]:
    """The smallest BatchNorm model (by parameter count) of each timm module."""
    best: dict[str, ZooModel] = {}
    for m in models:
        if m.family not in best or (m.params, m.name) < (best[m.family].params, best[m.family].name):
            best[m.family] = m
    return sorted(best.values(), key=lambda m: m.family)


# ---------------------------------------------------------------------------------------------------
# Building models and inputs


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default affine and running statistics, as training would, so that
    transfer and folding are measured on numbers that differ from the initial ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
                if m.running_mean is not None and m.running_var is not None:
                    m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def build_model(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


def rebuild_small(name: str, model: nn.Module, size: int, device: torch.device) -> nn.Module | None:
    """The model built for ``size`` px (timm's ``img_size``), for models that fix their resolution
    (position tables, attention biases) and so refuse a smaller input: the same modules, the same
    BatchNorms, a fraction of the compute. None where timm will not build it or it differs in its
    BatchNorms or fails at that size."""
    try:
        small = build_model(name, img_size=size).to(device)
    except Exception:
        return None
    if count_batchnorm(small) != count_batchnorm(model):
        return None
    c = int(model.pretrained_cfg["input_size"][0])
    try:
        with model_state_guard(small):
            eval_output(small, example((c, size, size), BATCH, device=device))
    except Exception:
        return None
    return small


def example(size: Sequence[int], batch: int, seed: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    # Drawn on the CPU whatever the device, so a GPU check sees the very inputs a CPU check does.
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(seed)).to(device)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live: inputs made for it go there too."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def configure_device(device: str) -> None:
    """On a GPU, full float32 everywhere: TF32 matmuls and convolutions round to 10 mantissa bits,
    which would make the 1e-5 fold check meaningless; deterministic cuDNN algorithms keep the
    round-trip replay bit-exact comparable. (Process-wide: each model has its own process.)"""
    if device != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return first_tensor(model(x))
    finally:
        model.train(was_training)


def pick_input_size(model: nn.Module, max_size: int | None) -> tuple[tuple[int, ...], str | None]:
    """The model's default input size, capped at ``max_size`` where the model accepts that; else the
    default size and the reason the smaller one failed (levit and others fix their resolution)."""
    default = tuple(int(s) for s in model.pretrained_cfg["input_size"])
    if not max_size or max(default[1:]) <= max_size:
        return default, None
    small = (default[0], *(min(s, max_size) for s in default[1:]))
    try:
        # The guard undoes what a failed forward may leave behind (attention-bias caches and the like).
        with model_state_guard(model):
            eval_output(model, example(small, BATCH, device=model_device(model)))
        return small, None
    except Exception as exc:
        return default, error_info(exc)["error"]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------
# Measuring


def error_info(exc: BaseException) -> dict[str, str]:
    """First line of the error, the innermost normswap frame it passed through, and where it arose."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    frames = traceback.extract_tb(exc.__traceback__) + traceback.extract_tb(root.__traceback__)
    ours = [f for f in frames if f"{os.sep}normswap{os.sep}" in f.filename]

    def where(f: traceback.FrameSummary) -> str:
        parts = Path(f.filename).parts
        short = "/".join(parts[-2:])
        return f"{short}:{f.lineno} {f.name}"

    info = {"error": f"{type(exc).__name__}: {message}"[:400]}
    if ours:
        info["normswap_frame"] = where(ours[-1])
    root_frames = traceback.extract_tb(root.__traceback__)
    if root_frames:
        info["origin"] = where(root_frames[-1])
        if root is not exc:
            info["cause"] = f"{type(root).__name__}: {str(root).strip().splitlines()[0] if str(root).strip() else ''}"[
                :300
            ]
    return info


def attempt(errors: dict[str, Any], step: str, fn: Callable[[], T]) -> T | None:
    """Run one measurement; a failure is recorded under ``step`` and the sweep goes on."""
    try:
        return fn()
    except Exception as exc:
        errors[step] = error_info(exc)
        return None


def _status_kib(field_name: str, source: str = "/proc/self/status") -> int | None:
    try:
        text = Path(source).read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each conversion gets its own peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_rss_mib() -> Iterator[dict[str, float | None]]:
    """Peak resident memory above the starting RSS while the block runs (Linux VmHWM, in MiB).
    tracemalloc would miss tensor storage, which torch allocates outside Python's allocator."""
    result: dict[str, float | None] = {"peak_mib": None}
    before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    yield result
    peak = _status_kib("VmHWM")
    if reset and before is not None and peak is not None:
        result["peak_mib"] = max(0, peak - before) / 1024


@contextlib.contextmanager
def peak_cuda_mib(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Peak GPU memory allocated by torch above what was allocated before the block (MiB); None off
    the GPU. The GPU counterpart of peak_rss_mib: a conversion there copies the model in GPU memory."""
    result: dict[str, float | None] = {"peak_cuda_mib": None}
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield result
    torch.cuda.synchronize(device)
    result["peak_cuda_mib"] = max(0, torch.cuda.max_memory_allocated(device) - before) / 2**20


def synchronize(device: torch.device) -> None:
    # GPU kernels run asynchronously: a timer read before they finish measures only the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_forward(model: nn.Module, x: torch.Tensor) -> float:
    synchronize(x.device)
    started = time.perf_counter()
    with torch.no_grad():
        model(x)
    synchronize(x.device)
    return time.perf_counter() - started


def count_fx_nodes(model: nn.Module) -> tuple[int, float]:
    """Nodes of normswap's own trace (what conversion time should scale with) and the trace time."""
    with model_state_guard(model):
        started = time.perf_counter()
        graph = trace_graph(model)
        return len(graph.nodes), time.perf_counter() - started


@contextlib.contextmanager
def reseeded_forwards(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Reseed torch before every forward of ``model`` (and of its deep copies), so dropout and drop-path
    draw the same masks in both passes of batch_dependence: what remains is the batch's influence."""

    def reseed(_module: nn.Module, _args: tuple[Any, ...]) -> None:
        torch.manual_seed(seed)

    handle = model.register_forward_pre_hook(reseed)
    try:
        yield
    finally:
        handle.remove()


def batch_dependence(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """normswap.batch_dependence as is (dropout noise counts) and with dropout masks held fixed."""
    raw = normswap.batch_dependence(model, x)
    with reseeded_forwards(model):
        fixed = normswap.batch_dependence(model, x)
    return {"batch_dependence": fixed, "batch_dependence_raw": raw}


def plan_stats(plan: normswap.Plan, bn_present: int) -> dict[str, Any]:
    learned = Counter(e.site.learned_by for e in plan.entries)
    module_sites = sum(e.site.kind == "module" for e in plan.entries)
    return {
        "trace": plan.trace,
        "trace_error": plan.trace_error,
        "learned_by": {k: learned.get(k, 0) for k in ("fx", "eager", "class", "none")},
        "sites": len(plan.entries),
        "module_sites": module_sites,
        "functional_sites": len(plan.entries) - module_sites,
        "sites_match_bn": module_sites == bn_present,
        "shapes_observed": sum(e.site.input_shape is not None for e in plan.entries),  # 0: no forward pass ran
        "summary": plan.summary(),
        "converted_sites": len(plan.conversions),
    }


def timed_convert(
    model: nn.Module, recipe: str, x: torch.Tensor
) -> tuple[normswap.Conversion, float, dict[str, float | None]]:
    """The conversion, its seconds, and its peaks: RSS (``peak_mib``) and GPU memory (``peak_cuda_mib``)."""
    synchronize(x.device)
    with peak_rss_mib() as memory, peak_cuda_mib(x.device) as gpu_memory:
        started = time.perf_counter()
        conversion = normswap.convert(model, recipe, example_inputs=x, validate=False, batch_size=BATCH)
        synchronize(x.device)
        seconds = time.perf_counter() - started
    return conversion, seconds, {**memory, **gpu_memory}


def round_trip(
    plan: normswap.Plan, converted: nn.Module, fresh: Callable[[], nn.Module], x: torch.Tensor
) -> dict[str, bool]:
    """The plan survives JSON, and replayed onto a fresh instance (other weights) and loaded with the
    converted state_dict it gives the converted model's outputs bit for bit."""
    reread = normswap.Plan.from_json(plan.to_json())
    replayed = normswap.apply_plan(fresh(), reread, inplace=True)
    replayed.load_state_dict(converted.state_dict())
    return {
        "roundtrip_json": reread == plan,
        "roundtrip_exact": identical(eval_output(converted, x), eval_output(replayed, x)),
    }


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, a NaN matching a NaN: torch.equal calls two outputs that overflow to
    NaN at the same places different (lambda_resnet50ts does, in float32 at 64 px)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def fold_in_float64(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Fold again in float64, and measure how far the original's own float32 output is from its
    float64 one. Some deep nets (halonet) amplify float32 rounding past 1e-5; folding changes the
    rounding, not the function, when the float64 fold is exact."""
    # One float64 copy, folded in place after its reference output. Folding builds the fused convolutions
    # before it swaps any (all or nothing), a second float64 copy of the weights: where that does not
    # fit in memory (regnety_2560, 1.3 G parameters, on 24 GiB) only the original's own gap is measured.
    model64, x64 = clone_model(model).double(), x.double()
    reference64 = eval_output(model64, x64)
    out: dict[str, Any] = {"f32_noise": relative_l2(reference64, eval_output(model, x))}
    needed = 8 * sum(p.numel() for p in model64.parameters())
    available = memory_available()
    if available is not None and needed > 0.8 * available:
        out["fold_f64_skipped"] = f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
        return out
    folded64 = normswap.convert(model64, "fold", example_inputs=x64[:1], validate=False, inplace=True).model
    out["rel_l2_f64"] = relative_l2(reference64, eval_output(folded64, x64))
    return out


def memory_available() -> int | None:
    """Linux MemAvailable in bytes (None elsewhere)."""
    kib = _status_kib("MemAvailable", "/proc/meminfo")
    return kib * 1024 if kib is not None else None


def folded_pairs(plan: normswap.Plan) -> list[tuple[str, str]]:
    """(BatchNorm path, producing conv/linear path) of every site the plan folds: the fold target
    resolves the producer into the entry's options, and replaces the producer by the fused copy and
    the BatchNorm by what remains of it (its activation, or Identity)."""
    return [(e.site.path, str(e.options["producer"])) for e in plan.conversions if e.target == "fold"]


def local_fold_check(
    model: nn.Module, folded: nn.Module, pairs: Sequence[tuple[str, str]], x: torch.Tensor
) -> dict[str, Any]:
    """Fold exactness site by site, on the inputs the original's producers see on ``x``: each
    producer's input is captured in one eval forward of the original, and as that site's BatchNorm
    returns, its output (conv → BatchNorm, with the activation of a norm+act module) is compared with
    the folded model's fused conv → remainder on that same input. Unlike the end-to-end check, this does
    not go through the rest of the network, which in some deep random-weight nets amplifies float32
    rounding chaotically (their float64 fold is then no reference either)."""
    originals = dict(model.named_modules(remove_duplicate=False))
    replaced = dict(folded.named_modules(remove_duplicate=False))
    producer_inputs: dict[str, torch.Tensor] = {}
    worst: dict[str, float] = {}

    def capture(producer: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            # A copy: a later in-place op of the network may overwrite the tensor before the BatchNorm runs.
            producer_inputs[producer] = args[0].detach().clone()

        return hook

    def compare(bn: str, producer: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            x_in = producer_inputs.pop(producer, None)
            if x_in is None:  # the BatchNorm ran without its producer just before: nothing to compare
                return
            fused_out = first_tensor(replaced[bn](replaced[producer](x_in)))
            worst[bn] = max(worst.get(bn, 0.0), relative_l2(first_tensor(output), fused_out))

        return hook

    handles = []
    try:
        for bn, producer in pairs:
            handles.append(originals[producer].register_forward_pre_hook(capture(producer)))
            handles.append(originals[bn].register_forward_hook(compare(bn, producer)))
        with model_state_guard(folded):  # in eval mode, as the original's eval forward
            eval_output(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "fold_local_max_rel_l2": max(worst.values(), default=None),
        "fold_local_sites": len(worst),
        "fold_local_worst_site": max(worst, key=worst.__getitem__) if worst else None,
    }


def fold_exact(r: dict[str, Any]) -> bool:
    return r.get("rel_l2") is not None and r["rel_l2"] <= FOLD_EXACT


def fold_exact_in_f64_only(r: dict[str, Any]) -> bool:
    return not fold_exact(r) and r.get("rel_l2_f64") is not None and r["rel_l2_f64"] <= FOLD_EXACT


def fold_locally_exact(r: dict[str, Any]) -> bool:
    """Every folded site checked, and each exact on its own input (records before the per-site check: no)."""
    local = r.get("fold_local_max_rel_l2")
    return local is not None and local <= FOLD_EXACT and r.get("fold_local_sites") == r.get("folded_sites")


def original_chaotic(r: dict[str, Any]) -> bool:
    """The original's own float32 output is this far from its float64 one: end to end, rounding noise."""
    return r.get("f32_noise") is not None and r["f32_noise"] > CHAOTIC


def within_own_rounding(r: dict[str, Any]) -> bool:
    """The float64 fold could not run (memory), and folding moved the float32 output no further than the
    original's own float32 rounding moves it from its float64 output."""
    noise, error = r.get("f32_noise"), r.get("rel_l2")
    return bool(r.get("fold_f64_skipped")) and noise is not None and error is not None and error <= noise


def fold_exact_per_site_only(r: dict[str, Any]) -> bool:
    """Neither end-to-end check holds, but every site folds exactly, and end to end the original itself
    is chaotic or (without the float64 check) the fold's difference is within its own rounding."""
    return (
        not fold_exact(r)
        and not fold_exact_in_f64_only(r)
        and fold_locally_exact(r)
        and (original_chaotic(r) or within_own_rounding(r))
    )


def fold_verified(r: dict[str, Any]) -> bool:
    return fold_exact(r) or fold_exact_in_f64_only(r) or fold_exact_per_site_only(r)


@dataclass
class Inputs:
    timing: torch.Tensor  # batch 1 at the timing size: what conversion and the reference forward see
    check: torch.Tensor  # batch 2 at the check size: outputs, batch independence, round trip
    reference: torch.Tensor  # the original model's eval output on ``check``


def run_recipe(
    model: nn.Module, fresh: Callable[[], nn.Module], recipe: str, inputs: Inputs, rounds: int
) -> dict[str, Any]:
    """Convert ``rounds`` times (forward timed in the same rounds, so machine load hits both alike),
    then check the last conversion."""
    out: dict[str, Any] = {"errors": {}}
    errors = out["errors"]
    forwards, converts, plans = [], [], []
    peaks: dict[str, list[float | None]] = defaultdict(list)
    conversion = None
    for _ in range(rounds):
        forwards.append(timed_forward(model, inputs.timing))
        result = attempt(errors, "convert", lambda: timed_convert(model, recipe, inputs.timing))
        if result is None:
            break
        conversion, seconds, peak = result
        converts.append(seconds)
        plans.append(conversion.report.timings["plan_s"])
        for key, value in peak.items():
            peaks[key].append(value)
    if converts:
        out.update(
            forward_s=statistics.median(forwards),
            convert_s=statistics.median(converts),
            plan_s=statistics.median(plans),
            ratio=statistics.median(converts) / statistics.median(forwards),
            peak_mib=max((p for p in peaks["peak_mib"] if p is not None), default=None),
        )
        if inputs.check.device.type == "cuda":
            out["peak_cuda_mib"] = max((p for p in peaks["peak_cuda_mib"] if p is not None), default=None)
    if conversion is not None and inputs.check.shape[1:] != inputs.timing.shape[1:]:
        conversion = attempt(
            errors,
            "convert-check",
            lambda: normswap.convert(model, recipe, example_inputs=inputs.check[:1], validate=False, batch_size=BATCH),
        )
    if conversion is None:
        out["ok"] = False
        return out
    out["ok"] = True
    out.update(plan_stats(conversion.plan, sum(count_batchnorm(model).values())))
    converted = conversion.model
    out["bn_left"] = len(batchnorm_left(converted))
    out["graph_module"] = isinstance(converted, fx.GraphModule)
    output = attempt(errors, "output", lambda: eval_output(converted, inputs.check))
    if output is not None:
        out["shape_equal"] = tuple(output.shape) == tuple(inputs.reference.shape)
        out["rel_l2"] = relative_l2(inputs.reference, output) if out["shape_equal"] else None
    if recipe in INDEPENDENCE_RECIPES:
        out.update(attempt(errors, "batch-dependence", lambda: batch_dependence(converted, inputs.check)) or {})
    if recipe == "fold":
        pairs = folded_pairs(conversion.plan)
        out["folded_sites"] = len(pairs)
        if pairs:
            local = attempt(errors, "fold-local", lambda: local_fold_check(model, converted, pairs, inputs.check))
            out.update(local or {})
        # "not <=" rather than ">": a NaN end-to-end error gets the float64 look too.
        if out.get("rel_l2") is not None and not out["rel_l2"] <= FOLD_EXACT:
            out.update(attempt(errors, "fold-f64", lambda: fold_in_float64(model, inputs.check)) or {})
    out.update(attempt(errors, "roundtrip", lambda: round_trip(conversion.plan, converted, fresh, inputs.check)) or {})
    return out


def run_opacus(model: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Opacus' own fix for BatchNorm (GroupNorm, parameters not carried over): what is left, does it run."""
    from opacus.validators import ModuleValidator

    out: dict[str, Any] = {"errors": {}}
    times, fixed = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        fixed = attempt(out["errors"], "fix", lambda: ModuleValidator.fix(model))
        if fixed is None:
            return out
        times.append(time.perf_counter() - started)
    assert fixed is not None
    out["fix_s"] = statistics.median(times)
    out["bn_left"] = sum(count_batchnorm(fixed).values())
    out["bn_left_classes"] = dict(count_batchnorm(fixed))

    def runs() -> bool:
        fixed.train()
        with torch.no_grad():
            train_shape = first_tensor(fixed(x)).shape
        return train_shape == eval_output(fixed, x).shape

    out["runs"] = bool(attempt(out["errors"], "run", runs))
    validation = attempt(out["errors"], "validate", lambda: ModuleValidator.validate(fixed, strict=False))
    out["validate_errors"] = len(validation) if validation is not None else None
    return out


@dataclass
class Options:
    recipes: tuple[str, ...] = RECIPES
    max_size: int | None = None
    timing_size: str = "default"  # "default": time at the model's default input size; "check": the capped one
    rounds: int = 3
    opacus: bool = True
    roundtrip_seed: int = 1
    threads: int | None = None
    device: str = "cpu"  # where the checks run; models are built on the CPU either way
    # The normswap every model process runs: the forkserver's import, hashed when the sweep starts it.
    normswap_digest: str | None = None


# Above this many parameters a model's round-trip instance is built at each use instead of kept: a kept
# copy of regnety_2560 (5 GB in float32) beside the model and a float64 fold check does not fit 24 GiB.
KEEP_FRESH_BELOW = 100_000_000


def fresh_instances(
    name: str, seed: int, build_kwargs: dict[str, Any], device: torch.device, params: int
) -> Callable[[], nn.Module]:
    """Fresh instances of the architecture (other weights) for the round trip, each free to modify."""
    if params >= KEEP_FRESH_BELOW:
        return lambda: build_model(name, seed=seed, **build_kwargs).to(device)
    kept = build_model(name, seed=seed, **build_kwargs).to(device)
    return lambda: clone_model(kept)


def run_model(name: str, family: str, opts: Options) -> dict[str, Any]:
    """Everything measured for one model; failures are recorded per step, never raised."""
    digest = opts.normswap_digest or normswap_digest()
    rec: dict[str, Any] = {"name": name, "family": family, "status": "ok", "errors": {}, "normswap": digest}
    rec.update(device_info(opts.device))
    errors = rec["errors"]
    configure_device(opts.device)
    device = torch.device(opts.device)
    model = attempt(errors, "build", lambda: build_model(name).to(device))
    if model is None:
        rec["status"] = "build-failed"
        return rec
    bn = count_batchnorm(model)
    rec.update(params=sum(p.numel() for p in model.parameters()), bn_modules=sum(bn.values()), bn_classes=dict(bn))
    default = tuple(int(s) for s in model.pretrained_cfg["input_size"])
    check_size, fallback = pick_input_size(model, opts.max_size)
    build_kwargs: dict[str, Any] = {}
    if fallback and opts.max_size and opts.timing_size == "check":
        # Nothing runs at the default size in this mode, so a model that fixes its resolution may as
        # well be built for the small one (the full sweep's 112 such models took 70 of its 162 minutes).
        rebuilt = rebuild_small(name, model, opts.max_size, device)
        if rebuilt is not None:
            model, build_kwargs = rebuilt, {"img_size": opts.max_size}
            check_size, rec["built_with"] = (default[0], opts.max_size, opts.max_size), build_kwargs
    timing_size = default if opts.timing_size == "default" else check_size
    rec.update(default_input=list(default), check_input=list(check_size), timing_input=list(timing_size))
    if fallback:
        rec["small_input_error"] = fallback
    traced = attempt(errors, "fx-nodes", lambda: count_fx_nodes(model))
    rec["fx_nodes"], rec["trace_s"] = traced if traced else (None, None)
    x_check = example(check_size, BATCH, device=device)
    reference = attempt(errors, "reference", lambda: eval_output(model, x_check))
    if reference is None:
        rec["status"] = "model-failed"
        return rec
    rec.update(attempt(errors, "orig-batch-dependence", lambda: batch_dependence(model, x_check)) or {})
    inputs = Inputs(timing=example(timing_size, 1, device=device), check=x_check, reference=reference)
    with torch.no_grad():
        model(inputs.timing)  # warm-up: allocator and kernels, before anything is timed
    fresh = fresh_instances(name, opts.roundtrip_seed, build_kwargs, device, rec["params"])
    rec["recipes"] = {r: run_recipe(model, fresh, r, inputs, opts.rounds) for r in opts.recipes}
    if opts.opacus:
        rec["opacus"] = run_opacus(model, x_check, opts.rounds)
    return rec


def device_info(device: str) -> dict[str, Any]:
    """Where a record's checks ran (records without ``device`` ran on the CPU), and the torch that ran them."""
    info: dict[str, Any] = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        info.update(device_name=torch.cuda.get_device_name(), tf32=False, cudnn_deterministic=True)
    return info


# ---------------------------------------------------------------------------------------------------
# Running the sweep: one process per model, results appended as JSON lines


def _child(name: str, family: str, opts: Options, conn: Any, log: str) -> None:
    # Output of timm/torch goes to the log, so the progress bar stays readable.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    warnings.filterwarnings("ignore")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(f"== {name} ({family}) pid {os.getpid()}", flush=True)
    try:
        rec = run_model(name, family, opts)
    except BaseException as exc:  # the parent must always get a line
        rec = {"name": name, "family": family, "status": "crashed", "device": opts.device}
        rec["errors"] = {"run": error_info(exc)}
        traceback.print_exc()
    conn.send(json.dumps(rec, default=str))
    conn.close()


def run_isolated(ctx: Any, name: str, family: str, opts: Options, timeout: float, log: Path) -> dict[str, Any]:
    """One model in its own process, killed after ``timeout`` seconds."""
    receive, send = ctx.Pipe(duplex=False)
    started = time.perf_counter()
    proc = ctx.Process(target=_child, args=(name, family, opts, send, str(log)), daemon=True)
    proc.start()
    send.close()
    rec: dict[str, Any] | None = None
    if receive.poll(timeout):
        with contextlib.suppress(EOFError):
            rec = json.loads(receive.recv())
    proc.join(5 if rec is not None else 0)  # a child that answered exits by itself; one that did not is killed
    if proc.is_alive():
        proc.kill()
        proc.join()
    if rec is None:
        status = "timeout" if time.perf_counter() - started >= timeout else "crashed"
        rec = {
            "name": name,
            "family": family,
            "status": status,
            "device": opts.device,  # no CUDA call here: the parent stays off the GPU
            "errors": {"run": {"error": f"{status} (exit code {proc.exitcode}, limit {timeout:.0f} s)"}},
        }
    rec["wall_s"] = time.perf_counter() - started
    rec["load_avg"] = os.getloadavg()[0]
    return rec


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line from a kill
                rec = json.loads(line)
                records[rec["name"]] = rec  # a retried model: the later line wins
    return list(records.values())


def append_result(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def sweep(
    selected: Sequence[ZooModel],
    opts: Options,
    results: Path,
    timeout: float,
    retry_failed: bool = False,
    redo: frozenset[str] = frozenset(),
    on_model: Callable[[float], None] | None = None,
    jobs: int = 1,
) -> float:
    """Run every selected model not yet recorded (a later line replaces an earlier one for the same
    model), ``jobs`` model processes at a time; returns this session's wall time."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = {r["name"]: r for r in read_results(results)}
    todo = [
        m
        for m in selected
        if m.name not in done or m.name in redo or (retry_failed and done[m.name]["status"] in FAILED_STATUSES)
    ]
    console = Console(stderr=True)
    console.print(f"{len(selected)} selected, {len(selected) - len(todo)} already in {results}, {len(todo)} to run")
    if not todo:
        return 0.0
    ctx = mp.get_context("forkserver")
    # Imported once, in the server; each model's process is a fork of it. (The fork re-runs this script's
    # module code, which is cheap with these already imported, but keeps the server's normswap: a sweep
    # runs one normswap version even while the files change, and records its hash.)
    ctx.set_forkserver_preload(["torch", "timm", "normswap", "normswap.io", "opacus.validators"])
    opts = dataclasses.replace(opts, normswap_digest=normswap_digest())
    log = results.with_suffix(".log")
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress, ThreadPoolExecutor(max(jobs, 1)) as pool:
        task = progress.add_task("zoo", total=len(todo))
        # Threads only wait on the model processes; results are written from this thread alone.
        running = {pool.submit(run_isolated, ctx, m.name, m.family, opts, timeout, log): m for m in todo}
        for future in as_completed(running):
            m = running[future]
            rec = carry_over(done.get(m.name), future.result(), opts)
            append_result(results, rec)
            progress.update(task, description=f"{m.family}: {m.name}")
            progress.console.print(one_line(rec))
            progress.advance(task)
            if on_model:  # so a sweep that is killed still knows how long its session ran
                on_model(time.perf_counter() - started)
    return time.perf_counter() - started


def carry_over(earlier: dict[str, Any] | None, rec: dict[str, Any], opts: Options) -> dict[str, Any]:
    """A rerun of some recipes (``--redo NAME --recipes fold --no-opacus``) keeps the earlier record's
    other recipes and its Opacus result, so a partial rerun updates the record rather than erasing the
    rest; what was kept is named, with the normswap and device that measured it."""
    if earlier is None or rec.get("status") != "ok" or "recipes" not in earlier:
        return rec
    kept = {r: x for r, x in earlier["recipes"].items() if r not in rec.get("recipes", {})}
    opacus_kept = not opts.opacus and "opacus" in earlier
    if not kept and not opacus_kept:
        return rec
    retimed = earlier.get("timing_input") != rec.get("timing_input") or earlier.get("device", "cpu") != opts.device
    if retimed:
        # The record's timing size and device are the new run's: timings measured at another size or on
        # another device would be read as this one's. (The earlier JSON line still holds them.)
        kept = {r: {k: v for k, v in x.items() if k not in SIZE_DEPENDENT} for r, x in kept.items()}
    merged = {**kept, **rec.get("recipes", {})}
    rec["recipes"] = {r: merged[r] for r in sorted(merged, key=lambda r: RECIPES.index(r) if r in RECIPES else 99)}
    if opacus_kept:
        rec["opacus"] = earlier["opacus"]
    rec["carried_over"] = {
        "recipes": sorted(kept),
        "opacus": opacus_kept,
        "normswap": earlier.get("normswap"),
        "device": earlier.get("device", "cpu"),
        "timings_dropped": retimed,
    }
    return rec


def one_line(rec: dict[str, Any]) -> str:
    failures = sorted(failure_keys(rec))
    mark = "[green]ok[/]" if not failures else f"[red]{', '.join(failures)}[/]"
    return f"{rec['name']:<32} {rec.get('wall_s', 0):6.1f} s  {mark}"


def failure_keys(rec: dict[str, Any]) -> set[str]:
    keys = {f"{step}" for step in rec.get("errors", {})}
    for recipe, r in rec.get("recipes", {}).items():
        keys |= {f"{recipe}/{step}" for step in r.get("errors", {})}
        keys |= {f"{recipe}/{check}" for check in failed_checks(recipe, r)}
    keys |= {f"opacus/{step}" for step in rec.get("opacus", {}).get("errors", {})}
    return keys


def failed_checks(recipe: str, r: dict[str, Any]) -> list[str]:
    """Which promises a converted model broke (a conversion that raised is reported by its error)."""
    if not r.get("ok"):
        return []
    bad = []
    if recipe in NO_BN_RECIPES and r.get("bn_left"):
        bad.append("bn-left")
    if not r.get("sites_match_bn", True):
        bad.append("sites-mismatch")
    if r.get("shape_equal") is False:
        bad.append("shape")
    if recipe in INDEPENDENCE_RECIPES and r.get("batch_dependence", 0) >= INDEPENDENT:
        bad.append("batch-dependent")
    if recipe == "fold" and r.get("folded_sites") and not fold_verified(r):
        bad.append("fold-inexact")
    if r.get("roundtrip_json") is False:
        bad.append("roundtrip-json")
    if r.get("roundtrip_exact") is False:
        bad.append("roundtrip-inexact")
    return bad


# ---------------------------------------------------------------------------------------------------
# Rendering into BENCHMARKS.md


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """y = slope·x + intercept, with R²."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0, "n": n}


def _count(records: Sequence[dict[str, Any]], pred: Callable[[dict[str, Any]], bool]) -> int:
    return sum(1 for r in records if pred(r))


def _recipe(rec: dict[str, Any], recipe: str) -> dict[str, Any]:
    return rec.get("recipes", {}).get(recipe, {})


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}"


def _mmss(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def on_cpu(r: dict[str, Any]) -> bool:
    """Checked on the CPU (records from before ``--device`` was: all were). Only these enter the speed
    and RSS figures: GPU timings measure another machine, not the CPU this section describes."""
    return r.get("device", "cpu") == "cpu"


def gpu_names(records: Sequence[dict[str, Any]]) -> str:
    """The GPUs named by the records, with counts; a model process killed before it answered names none."""
    gpu = [r for r in records if not on_cpu(r)]
    names = Counter(r["device_name"] for r in gpu if r.get("device_name"))
    unnamed = len(gpu) - sum(names.values())
    text = ", ".join(f"{name} ({n})" for name, n in names.most_common())
    return text + (f"{', ' if text else ''}{unnamed} timed out or crashed before naming its GPU" if unnamed else "")


def device_line(records: Sequence[dict[str, Any]]) -> list[str]:
    gpu = [r for r in records if not on_cpu(r)]
    if not gpu:
        return []
    ran = _count(gpu, lambda r: "recipes" in r)
    torches = sorted({r["torch"] for r in gpu if r.get("torch")})
    torch_text = f", torch {'/'.join(torches)}" if torches else ""
    return [
        f"- Checked on a GPU instead of the CPU (`--device cuda`: model built on the CPU, then checked on the "
        f"GPU in float32 with TF32 off and deterministic cuDNN): **{len(gpu)}** records, {ran} of them ran "
        f"through the recipes; on {gpu_names(records)}{torch_text}. They count in every check below; their "
        f"timings and memory are left out of the speed and memory figures."
    ]


def totals(records: Sequence[dict[str, Any]], selected: int | None = None) -> list[str]:
    ran = [r for r in records if "recipes" in r]
    model_failed = _count(records, lambda r: r["status"] in ("build-failed", "model-failed"))
    lines = [
        f"- Models recorded: **{len(records)}**{f' of {selected} selected' if selected else ''}; "
        f"ran through the recipes: {len(ran)}; "
        f"timed out: {_count(records, lambda r: r['status'] == 'timeout')}; "
        f"crashed: {_count(records, lambda r: r['status'] == 'crashed')}; "
        f"model itself failed (build or forward): {model_failed}.",
        *device_line(records),
    ]
    for recipe in RECIPES:
        named = [(r["name"], _recipe(r, recipe)) for r in ran if recipe in r["recipes"]]
        if named:
            lines.append(f"- `{recipe}`: " + "; ".join(recipe_totals(recipe, named)) + ".")
    return [*lines, learned_line(ran), *opacus_line(ran)]


def recipe_totals(recipe: str, named: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """One recipe's counts over the models: what it promises, and what every recipe must hold."""
    rs = [x for _, x in named]
    ok = [x for x in rs if x.get("ok")]
    parts = [f"converted {len(ok)}/{len(rs)}"]
    left_in = _count(ok, lambda x: bool(x.get("bn_left")))
    if recipe in NO_BN_RECIPES:
        parts.append(f"**no BatchNorm left {_count(ok, lambda x: x.get('bn_left') == 0)}/{len(rs)}**")
    elif recipe == "sequence":
        parts.append(f"BatchNorm left in {left_in} (image BatchNorm is kept by design)")
    else:
        parts.append(f"BatchNorm left in {left_in}")
    parts.append(f"sites found = BatchNorm modules {_count(ok, lambda x: x.get('sites_match_bn'))}/{len(ok)}")
    parts.append(f"output shape equal {_count(ok, lambda x: x.get('shape_equal'))}/{len(ok)}")
    if recipe in INDEPENDENCE_RECIPES:
        independent = _count(ok, lambda x: x.get("batch_dependence", 1) < INDEPENDENT)
        parts.append(f"**batch-independent (< {INDEPENDENT:g}) {independent}/{len(ok)}**")
    if recipe == "fold":
        parts += fold_totals(named, [x for x in ok if x.get("folded_sites")])
    parts.append(
        f"plan round-trip: JSON {_count(ok, lambda x: x.get('roundtrip_json'))}/{len(ok)}, "
        f"bit-exact replay {_count(ok, lambda x: x.get('roundtrip_exact'))}/{len(ok)}"
    )
    return parts


def _f64_text(x: dict[str, Any]) -> str:
    skipped = x.get("fold_f64_skipped")
    return f"not run ({skipped})" if skipped else _fmt(x.get("rel_l2_f64"), 2)


def fold_totals(named: Sequence[tuple[str, dict[str, Any]]], applicable: Sequence[dict[str, Any]]) -> list[str]:
    """End-to-end exactness first (float32, then float64 only), then what only the per-site check can
    show, each category named with its models: a verified fold is never shown as an end-to-end match."""
    folding = [(name, x) for name, x in named if x.get("folded_sites")]
    parts = [
        f"**fold exact end to end (≤ {FOLD_EXACT:g} relative L2) {_count(applicable, fold_exact)}/{len(applicable)}**"
        " where it folds"
    ]
    f64_only = [(name, x) for name, x in folding if fold_exact_in_f64_only(x)]
    if f64_only:
        details = ", ".join(
            f"{name}: float32 {_fmt(x['rel_l2'], 2)}, float64 {_fmt(x['rel_l2_f64'], 2)}, "
            f"the original's own float32-vs-float64 gap {_fmt(x['f32_noise'], 2)}"
            for name, x in f64_only
        )
        parts.append(f"exact only in float64: {len(f64_only)} ({details})")
    per_site = [(name, x) for name, x in folding if fold_exact_per_site_only(x)]
    if per_site:
        details = ", ".join(
            f"{name}: end to end float32 {_fmt(x['rel_l2'], 2)}, float64 {_f64_text(x)}, "
            f"the original's own float32-vs-float64 gap {_fmt(x['f32_noise'], 2)}, worst of "
            f"{x['fold_local_sites']} sites {_fmt(x['fold_local_max_rel_l2'], 2)}"
            for name, x in per_site
        )
        parts.append(
            f"exact per site (original chaotic): {len(per_site)} — end to end the outputs differ even in float64, "
            f"because the original's own float32 output is more than {CHAOTIC:g} from its float64 one (or, where "
            f"memory did not allow the float64 fold, the fold moved the output less than that gap); every "
            f"folded conv matches conv → BatchNorm within {FOLD_EXACT:g} on the input the original feeds it "
            f"({details})"
        )
    locally = [x for x in applicable if x.get("fold_local_sites") is not None]
    if locally:
        worst = max(
            (x["fold_local_max_rel_l2"] for x in locally if x.get("fold_local_max_rel_l2") is not None), default=None
        )
        parts.append(
            f"per-site check (each folded conv against conv → BatchNorm on the original's input to it) run on "
            f"{len(locally)}/{len(applicable)}: all sites exact in {_count(locally, fold_locally_exact)}, "
            f"worst site {_fmt(worst, 2)}"
        )
    parts.append(f"**fold verified (any of these) {_count(applicable, fold_verified)}/{len(applicable)}**")
    inexact = [name for name, x in folding if x.get("ok") and not fold_verified(x)]
    if inexact:
        parts.append(f"not shown exact: {len(inexact)} ({', '.join(inexact)})")
    return parts


def learned_line(ran: Sequence[dict[str, Any]]) -> str:
    plans = [_recipe(r, "small-batch") for r in ran if _recipe(r, "small-batch").get("ok")]
    learned: Counter[str] = Counter()
    for p in plans:
        learned.update(p.get("learned_by", {}))
    traces = Counter(p.get("trace") for p in plans)
    return (
        f"- How site context was learned (`small-batch` plans): sites by fx {learned['fx']}, by eager hooks "
        f"{learned['eager']}, by their class inside a leaf module (BatchNorm2d/3d: no forward pass needed) "
        f"{learned['class']}, not at all {learned['none']}; models traced by fx {traces['fx']}, "
        f"eager fallback {traces['eager']}."
    )


def opacus_line(ran: Sequence[dict[str, Any]]) -> list[str]:
    ops = [r["opacus"] for r in ran if "opacus" in r]
    if not ops:
        return []
    fixed = [o for o in ops if "fix_s" in o]
    return [
        f"- Opacus `ModuleValidator.fix`: fixed {len(fixed)}/{len(ops)}; **no BatchNorm left "
        f"{_count(fixed, lambda o: o.get('bn_left') == 0)}/{len(ops)}**; fixed model runs "
        f"{_count(fixed, lambda o: o.get('runs'))}/{len(ops)}; models where it left BatchNorm "
        f"{_count(fixed, lambda o: bool(o.get('bn_left')))} ({sum(o.get('bn_left', 0) for o in fixed)} modules)."
    ]


def ratio_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for recipe in RECIPES:
        pairs = [(r["name"], _recipe(r, recipe)["ratio"]) for r in records if "ratio" in _recipe(r, recipe)]
        if not pairs:
            continue
        worst = max(pairs, key=lambda p: p[1])
        parts = [_recipe(r, recipe) for r in records if "ratio" in _recipe(r, recipe)]
        plan = statistics.median(x["plan_s"] / x["forward_s"] for x in parts)
        apply = statistics.median((x["convert_s"] - x["plan_s"]) / x["forward_s"] for x in parts)
        lines.append(
            f"- `{recipe}`: convert / forward median **{statistics.median(p[1] for p in pairs):.2f}**, "
            f"max **{worst[1]:.2f}** ({worst[0]}), under 1: {sum(p[1] < 1 for p in pairs)}/{len(pairs)}; "
            f"of which plan / forward median {plan:.2f} (a trace, and a forward pass only where a layout depends "
            f"on it), apply / forward {apply:.2f} (copy and swaps)."
        )
    both = [
        (r["name"], _recipe(r, "dp")["convert_s"] / r["opacus"]["fix_s"])
        for r in records
        if "convert_s" in _recipe(r, "dp") and r.get("opacus", {}).get("fix_s")
    ]
    if both:
        lines.append(
            f"- normswap `dp` convert / Opacus fix time: median {statistics.median(b[1] for b in both):.2f}, "
            f"max {max(b[1] for b in both):.2f} ({max(both, key=lambda b: b[1])[0]}). normswap's time includes "
            f"an fx trace (and a forward pass where a layout depends on it); Opacus' does neither."
        )
    return lines


def fit_lines(records: Sequence[dict[str, Any]], recipe: str = "small-batch") -> list[str]:
    """Conversion time against what it should grow with: fx nodes (the trace and the per-site work)
    and parameters (the copy), fitted jointly; then each part alone."""
    import numpy as np

    rs = [(r, _recipe(r, recipe)) for r in records if r.get("fx_nodes") and "convert_s" in _recipe(r, recipe)]
    if len(rs) < 4:
        return []
    nodes = [r["fx_nodes"] for r, _ in rs]
    params = [r["params"] / 1e6 for r, _ in rs]
    total = [x["convert_s"] for _, x in rs]
    design = np.column_stack([nodes, params, np.ones(len(rs))])
    coef, *_ = np.linalg.lstsq(design, np.array(total), rcond=None)
    residual = np.array(total) - design @ coef
    r2 = 1 - float(residual @ residual) / float(((np.array(total) - np.mean(total)) ** 2).sum())
    plan = least_squares(nodes, [x["plan_s"] for _, x in rs])
    apply = least_squares(params, [x["convert_s"] - x["plan_s"] for _, x in rs])
    without = [x for _, x in rs if x.get("shapes_observed") == 0]
    known = [x for _, x in rs if "shapes_observed" in x]
    forward_note = (
        f" {len(without)}/{len(known)} of these plans ran no forward pass." if known else ""
    )
    return [
        f"- `{recipe}` conversion: **{coef[0] * 1000:.3f} ms × nodes + {coef[1] * 1000:.2f} ms × M parameters + "
        f"{coef[2] * 1000:.1f} ms, R² = {r2:.2f}** (n = {len(rs)}).{forward_note} Apart:",
        f"  - planning (fx trace, sites, rules; a forward pass where a layout depends on it): "
        f"{plan['slope'] * 1000:.3f} ms × nodes + {plan['intercept'] * 1000:.1f} ms, R² = {plan['r2']:.2f};",
        f"  - applying (copy + swaps): {apply['slope'] * 1000:.2f} ms × M parameters + "
        f"{apply['intercept'] * 1000:.1f} ms, R² = {apply['r2']:.2f}.",
    ]


def note_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """What the numbers do not say by themselves."""
    ran = [r for r in records if "recipes" in r]
    lines = []
    noisy = [
        r["name"]
        for r in ran
        if any(
            _recipe(r, x).get("batch_dependence_raw", 0) >= INDEPENDENT > _recipe(r, x).get("batch_dependence", 1)
            for x in INDEPENDENCE_RECIPES
        )
    ]
    if noisy:
        lines.append(
            f"- `normswap.batch_dependence` as shipped counts dropout noise as batch dependence: after conversion "
            f"{len(noisy)} models ({', '.join(noisy)}) measure ≥ {INDEPENDENT:g} until dropout and drop-path masks "
            f"are held fixed (torch reseeded before each forward), then 0. The totals use the fixed-mask value."
        )
    silent = [r["name"] for r in ran if r.get("opacus", {}).get("bn_left") and r["opacus"].get("validate_errors") == 0]
    if silent:
        lines.append(
            f"- In {len(silent)} models where `ModuleValidator.fix` left BatchNorm (subclasses such as timm "
            f"`BatchNormAct2d`: Opacus looks fixers and validators up by exact class), its own "
            f"`ModuleValidator.validate` on the fixed model reports no error."
        )
    rebuilt = [r["name"] for r in ran if r.get("built_with")]
    if rebuilt:
        lines.append(
            f"- Built for the capped size (timm `img_size`), because they fix their resolution and nothing in "
            f"`--timing-size check` runs at the default one: {len(rebuilt)} models, with the same modules and "
            f"BatchNorms (checked) and smaller position tables ({', '.join(rebuilt[:8])}"
            f"{', …' if len(rebuilt) > 8 else ''})."
        )
    fallback = [
        (r["name"], r["small_input_error"]) for r in ran if r.get("small_input_error") and not r.get("built_with")
    ]
    if fallback:
        lines.append(
            "- Checked at the default size because the capped input failed: "
            + "; ".join(f"{n} (`{e[:70]}`)" for n, e in fallback)
            + "."
        )
    peaks = [
        (r["name"], _recipe(r, "small-batch")["peak_mib"], r["params"])
        for r in ran
        if on_cpu(r) and _recipe(r, "small-batch").get("peak_mib") is not None
    ]
    if peaks:
        name, peak, params = max(peaks, key=lambda p: p[1])
        lines.append(
            f"- Peak memory of a `small-batch` conversion above the RSS before it: median "
            f"{statistics.median(p[1] for p in peaks):.0f} MiB, max {peak:.0f} MiB ({name}, "
            f"{params * 4 / 2**20:.0f} MiB of float32 parameters: the deep copy dominates)."
        )
    return [*lines, *gpu_peak_lines(ran)]


def gpu_peak_lines(ran: Sequence[dict[str, Any]]) -> list[str]:
    peaks = [
        (r["name"], _recipe(r, "small-batch")["peak_cuda_mib"], r["params"])
        for r in ran
        if _recipe(r, "small-batch").get("peak_cuda_mib") is not None
    ]
    if not peaks:
        return []
    name, peak, params = max(peaks, key=lambda p: p[1])
    return [
        f"- Models checked on a GPU ({len(peaks)}): peak GPU memory of a `small-batch` conversion above what torch "
        f"had allocated before it (`torch.cuda.max_memory_allocated`): median "
        f"{statistics.median(p[1] for p in peaks):.0f} MiB, max {peak:.0f} MiB ({name}, "
        f"{params * 4 / 2**20:.0f} MiB of float32 parameters)."
    ]


def family_table(records: Sequence[dict[str, Any]]) -> list[str]:
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    lines = [
        "| family | model | BatchNorm | input checked / timed | trace | small-batch BN left | independent | fold relL2 "
        "| convert/fwd | dp s | Opacus BN left | Opacus runs | Opacus fix s | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family in sorted(by_family):
        rs = by_family[family]
        lines.append("| " + " | ".join([family, *family_cells(rs)]) + " |")
    return lines


def family_cells(rs: Sequence[dict[str, Any]]) -> list[str]:
    """One family's row: the model's values, or aggregates (sums, k/n, medians, max) over its models."""
    n = len(rs)
    sb = [_recipe(r, "small-batch") for r in rs]
    fold = [_recipe(r, "fold") for r in rs]
    ops = [r.get("opacus", {}) for r in rs]

    def frac(k: int) -> str:
        return ("yes" if k else "no") if n == 1 else f"{k}/{n}"

    def med(vals: list[float]) -> str:
        return _fmt(statistics.median(vals)) if vals else "–"

    model = rs[0]["name"] if n == 1 else f"{n} models"
    bn = sum(r.get("bn_modules", 0) for r in rs)
    classes = Counter()
    for r in rs:
        classes.update(r.get("bn_classes", {}))
    bn_text = ", ".join(f"{k} {v}" for k, v in classes.most_common()) if n == 1 else f"{bn}"
    inputs = Counter(_input_text(r) for r in rs)
    input_text = ", ".join(inputs) if len(inputs) <= 2 else f"{len(inputs)} sizes"
    traces = Counter(_recipe(r, "small-batch").get("trace", "–") for r in rs)
    trace_text = "/".join(f"{k}" if n == 1 else f"{k} {v}" for k, v in traces.items())
    ok_sb = [x for x in sb if x.get("ok")]
    bn_left = "error" if not ok_sb else str(sum(x.get("bn_left", 0) for x in ok_sb))
    indep = frac(_count(ok_sb, lambda x: x.get("batch_dependence", 1) < INDEPENDENT)) if ok_sb else "–"
    fold_err = [x["rel_l2"] for x in fold if x.get("rel_l2") is not None]
    fold_text = _fmt(max(fold_err), 2) if fold_err else "error"
    cpu = [r for r in rs if on_cpu(r)]  # speed medians: CPU records only
    ratio = med([_recipe(r, "small-batch")["ratio"] for r in cpu if "ratio" in _recipe(r, "small-batch")])
    dp = med([_recipe(r, "dp")["convert_s"] for r in cpu if "convert_s" in _recipe(r, "dp")])
    fixed = [o for o in ops if "fix_s" in o]
    op_left = str(sum(o.get("bn_left", 0) for o in fixed)) if fixed else "error"
    op_runs = frac(_count(fixed, lambda o: o.get("runs")))
    op_s = med([r["opacus"]["fix_s"] for r in cpu if "fix_s" in r.get("opacus", {})])
    failed = sorted({k for r in rs for k in failure_keys(r)})
    failed_text = ", ".join(failed) if len(failed) <= 4 else f"{len(failed)} kinds"
    return [
        model,
        bn_text,
        input_text,
        trace_text,
        bn_left,
        indep,
        fold_text,
        ratio,
        dp,
        op_left,
        op_runs,
        op_s,
        failed_text or "–",
    ]


def _input_text(r: dict[str, Any]) -> str:
    check, timed = r.get("check_input", [])[1:], r.get("timing_input", [])[1:]
    if not check:
        return "–"
    return _side(check) if check == timed or not timed else f"{_side(check)} / {_side(timed)}"


def _side(size: Sequence[int]) -> str:
    return str(size[0]) if len(set(size)) == 1 else "×".join(map(str, size))


def failure_lines(records: Sequence[dict[str, Any]], limit: int = 60) -> list[str]:
    """Failures grouped by step and first error line, with the models they hit."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rec in records:
        for step, info in rec.get("errors", {}).items():
            groups[(step, _error_text(info))].append(rec["name"])
        for recipe, r in rec.get("recipes", {}).items():
            for step, info in r.get("errors", {}).items():
                groups[(f"{recipe}/{step}", _error_text(info))].append(rec["name"])
            for check in failed_checks(recipe, r):
                groups[(f"{recipe}/{check}", _check_detail(check, r))].append(rec["name"])
        for step, info in rec.get("opacus", {}).get("errors", {}).items():
            groups[(f"opacus/{step}", _error_text(info))].append(rec["name"])
    if not groups:
        return ["None."]
    lines = []
    for (step, text), names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        lines.append(f"- **{step}** ({len(names)}: {shown}): `{text}`")
    if len(lines) > limit:
        lines = [*lines[:limit], f"- … {len(lines) - limit} more groups in the JSON lines."]
    return lines


def _error_text(info: dict[str, str]) -> str:
    text = info.get("error", "?")
    if info.get("normswap_frame"):
        text += f" @ {info['normswap_frame']}"
    return text.replace("`", "'").replace("|", "/")


def _check_detail(check: str, r: dict[str, Any]) -> str:
    details = {
        "bn-left": f"{r.get('bn_left')} BatchNorm left",
        "sites-mismatch": f"{r.get('module_sites')} module sites found",
        "shape": "output shape differs",
        "batch-dependent": f"batch dependence {_fmt(r.get('batch_dependence'))}",
        "fold-inexact": f"relative L2 {_fmt(r.get('rel_l2'))}, float64 {_fmt(r.get('rel_l2_f64'))}, original's "
        f"float32-vs-float64 gap {_fmt(r.get('f32_noise'))}, {_local_fold_text(r)}",
        "roundtrip-json": "Plan.from_json(plan.to_json()) != plan",
        "roundtrip-inexact": "replayed plan + state_dict gives different outputs",
    }
    return details.get(check, check)


def _local_fold_text(r: dict[str, Any]) -> str:
    if r.get("fold_local_sites") is None:
        return "not checked per site (recorded before that check)"
    checked = f"{r['fold_local_sites']}/{r.get('folded_sites')} sites checked"
    return f"worst site {_fmt(r.get('fold_local_max_rel_l2'))} ({checked})"


def render(records: Sequence[dict[str, Any]], mode: str, command: str, meta: dict[str, Any]) -> str:
    ran = [r for r in records if "recipes" in r]
    # Speed is reported against the default-size forward only (a sweep resumed with --timing-size check
    # times the capped input, where the forward is much cheaper than the model's real one), and on the CPU.
    timed = [r for r in ran if r.get("timing_input") == r.get("default_input") and on_cpu(r)]
    on_gpu = _count(records, lambda r: not on_cpu(r))
    wall = sum(r.get("wall_s", 0.0) for r in records)
    sessions = meta.get("sessions", [])
    first = ran[0] if ran else {}
    policy = (
        f"checks at batch {BATCH}, input capped at {meta.get('max_size')} px where the model accepts it "
        f"(else its default size); timings at the {meta.get('timing_size', 'default')} input size, batch 1, "
        f"median of {meta.get('rounds')} interleaved rounds (forward and conversion alternate)"
        if first
        else ""
    )
    head = [
        f"## timm zoo: every BatchNorm model converts ({mode})",
        "",
        f"`{command}` · torch {torch.__version__}, timm {timm.__version__}, "
        f"{platform.processor() or platform.machine()}, {meta.get('threads') or torch.get_num_threads()} threads, CPU"
        f"{f' ({on_gpu} models checked on a GPU instead: {gpu_names(records)})' if on_gpu else ''}, "
        f"`pretrained=False` with randomised BatchNorm statistics; {policy}.",
        "",
        f"normswap code (hash of `normswap/*.py` and `recipes/*.toml` as imported): {versions_text(records)}.",
        "",
        f"Selection: {meta.get('selection', '')}. Sweep time: **{_mmss(wall)}** summed over models "
        f"(one process each, start-up included; mean {wall / max(len(records), 1):.1f} s per model), "
        f"{len(sessions)} session(s) totalling {_mmss(sum(sessions))}; enumeration on the meta device "
        f"{_mmss(meta.get('index_s', 0))} (cached). Memory: peak RSS above the pre-conversion RSS "
        f"(Linux VmHWM reset per conversion), not tracemalloc, which misses tensor storage.",
        "",
        *([str(meta["note"]), ""] if meta.get("note") else []),  # how a resumed sweep's sessions differed
        "### Totals",
        "",
        *totals(records, meta.get("selected")),
        "",
        "### Conversion time against one batch-1 eval forward",
        "",
        *([f"Models timed on the CPU at their default input size: {len(timed)} of {len(ran)}.", ""]
          if len(timed) < len(ran) else []),
        *ratio_lines(timed),
        "",
        "Least-squares fit of conversion time (plan + apply, no validation) against the nodes of normswap's "
        "fx trace (`normswap.tracing.trace_graph`) and the parameter count:",
        "",
        *fit_lines(timed),
    ]
    head += ["", "### Notes", "", *note_lines(records)]
    return "\n".join(
        [
            *head,
            "",
            "### Per family: normswap against Opacus",
            "",
            "BN left = BatchNorm modules left after `small-batch` (normswap) or `ModuleValidator.fix` (Opacus); "
            "independent = train-mode `batch_dependence` < 1e-4 after `small-batch` (dropout masks held fixed); "
            "fold relL2 = eval output of `fold` against the original; convert/fwd = `small-batch` conversion "
            "time over one forward; dp s = normswap `dp` conversion time; failed = steps that raised or checks "
            "that did not hold (listed below).",
            "",
            *family_table(records),
            "",
            "### Failures (first error line, innermost normswap frame)",
            "",
            *failure_lines(records),
        ]
    )


def versions_text(records: Sequence[dict[str, Any]]) -> str:
    versions = Counter(r.get("normswap", "unrecorded") for r in records)
    return ", ".join(f"`{digest}` ({n} models)" for digest, n in versions.most_common())


def section_of(mode: str) -> str:
    return SECTION if mode == "fast" else f"{SECTION}-{mode}"


# ---------------------------------------------------------------------------------------------------
# Command line


def select(args: argparse.Namespace, index: dict[str, Any]) -> tuple[list[ZooModel], str]:
    if args.models:
        known = {m["name"]: ZooModel(**m) for m in index.get("models", [])}
        owner = families()
        picked = []
        for name in args.models.split(","):
            if name not in known and name not in owner:
                raise SystemExit(f"unknown timm model {name!r}")
            picked.append(known.get(name) or ZooModel(name, owner[name], 0, 0, {}))
        return picked, f"{len(picked)} models named on the command line"
    models = bn_models(index)
    if args.full:
        return interleave_families(models), (
            f"all {len(models)} timm models containing a `_BatchNorm` (of {index['listed']} listed; "
            f"{len({m.family for m in models})} modules)"
        )
    reps = representatives(models)
    return reps, (
        f"one model per timm module: the smallest (by parameter count) of its models that contain a "
        f"`_BatchNorm` — {len(reps)} modules, out of {len(models)} BatchNorm models and {index['listed']} listed"
    )


def interleave_families(models: Sequence[ZooModel]) -> list[ZooModel]:
    """Round-robin over families, smallest first within each, so a sweep stopped early has covered
    every family evenly rather than the alphabet's first half."""
    by_family: dict[str, list[ZooModel]] = defaultdict(list)
    for m in sorted(models, key=lambda m: (m.params, m.name)):
        by_family[m.family].append(m)
    queues = [by_family[f] for f in sorted(by_family)]
    order = []
    for i in range(max((len(q) for q in queues), default=0)):
        order += [q[i] for q in queues if i < len(q)]
    return order


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fast", action="store_true", help="one representative per timm module (default)")
    which.add_argument("--full", action="store_true", help="every timm model that contains BatchNorm")
    which.add_argument("--models", help="comma-separated timm model names")
    parser.add_argument("--max-size", type=int, default=None, help="cap the check input's H and W (e.g. 64)")
    parser.add_argument(
        "--timing-size",
        choices=["default", "check"],
        default="default",
        help="time forward and conversion at the model's default input size (default) or the capped one",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per recipe (median)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model before it is killed")
    # One thread by default: on a small shared machine OpenMP threads that wait on a busy core make a
    # forward pass up to 100x slower (measured: test_resnet 5 ms at 1 thread, 550 ms at 2 under load).
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model process (default 1)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="models converted at a time, one process each (timings share the cores)"
    )
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--no-opacus", action="store_true")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where each model is checked (built on the CPU, then moved; cuda: TF32 off). GPU records count in "
        "the checks but not in the speed figures",
    )
    parser.add_argument("--results", type=Path, default=None, help="JSON lines file (default by mode)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun models that timed out or crashed")
    parser.add_argument(
        "--redo",
        default="",
        help="comma-separated models to rerun although recorded; with --recipes (and --no-opacus) only those "
        "are rerun and the record keeps the rest",
    )
    parser.add_argument("--no-run", action="store_true", help="only render what is recorded")
    parser.add_argument("--write", action="store_true", help="render into BENCHMARKS.md between the zoo markers")
    return parser.parse_args(argv)


def mode_of(args: argparse.Namespace) -> str:
    return "full" if args.full else "models" if args.models else "fast"


def load_meta(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    mode = mode_of(args)
    results = args.results or RESULTS / f"zoo-{mode}.jsonl"
    meta_path = results.with_suffix(".meta.json")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    index = load_index(progress=_index_progress()) if not args.models else {}
    selected, selection = select(args, index)
    opts = Options(
        recipes=tuple(args.recipes.split(",")),
        max_size=args.max_size,
        timing_size=args.timing_size,
        rounds=args.rounds,
        opacus=not args.no_opacus,
        threads=args.threads,
        device=args.device,
    )
    if args.device == "cuda" and not args.no_run and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    meta = load_meta(meta_path)
    if not args.no_run:
        warn_if_settings_differ(meta, args, results)
    meta.update(
        selection=selection,
        selected=len(selected),
        max_size=args.max_size,
        timing_size=args.timing_size,
        rounds=args.rounds,
        index_s=index.get("seconds", meta.get("index_s", 0)),
    )
    # The rendered header names the CPU sessions' threads; a GPU session's settings are kept apart.
    session = {"threads": args.threads, "jobs": args.jobs, "timeout": args.timeout}
    if args.device == "cpu":
        meta.update(session)
    elif not args.no_run:
        meta[f"{args.device}_session"] = session
    if not args.no_run:
        redo = frozenset(n for n in args.redo.split(",") if n)
        earlier = list(meta.get("sessions", []))

        def record_session(seconds: float) -> None:
            meta["sessions"] = [*earlier, seconds]
            normswap.io.write_text_atomic(meta_path, json.dumps(meta, indent=1))

        sweep(selected, opts, results, args.timeout, args.retry_failed, redo, record_session, args.jobs)
    wanted = {m.name for m in selected}
    records = sorted((r for r in read_results(results) if r["name"] in wanted), key=lambda r: (r["family"], r["name"]))
    text = render(records, mode, command_line(args), meta)
    # Conversion time has its own section (convert-time); the full tables keep the zoo's.
    publish(section_of(mode), text, results, args.write, keep=("Totals", "Failures"))


def warn_if_settings_differ(meta: dict[str, Any], args: argparse.Namespace, results: Path) -> None:
    """A resumed sweep (``--retry-failed``, ``--redo``) should check as the recorded one did: the rendered
    header states one input cap, timing size and round count for all its records."""
    if not read_results(results):
        return
    now = {"max_size": args.max_size, "timing_size": args.timing_size, "rounds": args.rounds}
    differ = {k: (meta[k], v) for k, v in now.items() if k in meta and meta[k] != v}
    if differ:
        text = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in differ.items())
        print(
            f"warning: {results} was recorded with other settings ({text}); the header will state the new ones",
            file=sys.stderr,
        )


def command_line(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/zoo.py", f"--{mode_of(args)}" if not args.models else f"--models {args.models}"]
    if args.max_size:
        parts.append(f"--max-size {args.max_size}")
    if args.timing_size != "default":
        parts.append(f"--timing-size {args.timing_size}")
    if args.threads != 1:
        parts.append(f"--threads {args.threads}")
    if args.rounds != 3:
        parts.append(f"--rounds {args.rounds}")
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    parts.append("--write")
    return " ".join(parts)


def _index_progress() -> Callable[[int, int, str], None]:
    def report(i: int, total: int, name: str) -> None:
        if i % 100 == 0:
            print(f"indexing timm on the meta device: {i}/{total} ({name})", file=sys.stderr, flush=True)

    return report


if __name__ == "__main__":
    main()

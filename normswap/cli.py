"""The ``normswap`` command line.

Exit codes: 0 success; 2 usage error; otherwise the failing NormswapError class's ``exit_code``
(1 other, 3 recipe, 4 unknown name, 5 plan, 6 trace/forward, 7 model or checkpoint, 8 unsafe
checkpoint, 9 output exists, 10 data).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import NormswapError

DEFAULT_DEMO_MODEL = "resnet18"


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "model",
        nargs=None if required else "?",
        metavar="MODEL",
        help="timm model name, 'package.module:factory', or a saved normswap directory",
    )
    p.add_argument("--pretrained", action="store_true", help="download timm hub weights (needs a network)")
    p.add_argument("--checkpoint", metavar="FILE", help="local weights: .safetensors, or a torch file (weights_only)")
    p.add_argument(
        "--key-mapping",
        default="auto",
        choices=["auto", "name", "order"],
        help="how checkpoint tensors pair with the model's (default: auto)",
    )
    p.add_argument("--input-size", metavar="C,H,W", help="example input size (default: timm's input_size)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", "-r", default="auto", help="built-in recipe name or a .toml path (default: auto)")
    p.add_argument("--batch-size", type=int, help="fact: per-device training batch size")
    p.add_argument("--sequence", action="store_true", default=None, help="fact: inputs are sequences/tokens")
    p.add_argument("--purpose", choices=["train", "finetune", "inference"], help="fact: what the model is for")
    p.add_argument("--task", help="fact: classification, detection, segmentation, style-transfer, gan, video, other")


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
    convert = sub.add_parser("convert", help="convert MODEL and write weights, plan and report")
    _add_model_args(convert)
    _add_plan_args(convert)
    convert.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    convert.add_argument("--force", action="store_true", help="replace an existing output directory")
    convert.add_argument("--no-validate", action="store_true", help="skip the drift check")
    demo = sub.add_parser(
        "demo", help=f"end to end on a locally built timm {DEFAULT_DEMO_MODEL}: plan, convert, validate, report, reload"
    )
    demo.add_argument("--output", "-o", default="normswap-out", metavar="DIR")
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


def _facts(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "sequence": args.sequence, "purpose": args.purpose, "task": args.task}


def _console() -> Any:
    from rich.console import Console

    return Console()


def cmd_recipes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .recipes import builtin_recipes, load_recipe

    table = Table(title="normswap recipes")
    for col in ("name", "what", "when to use"):
        table.add_column(col, overflow="fold")
    for name in builtin_recipes():
        r = load_recipe(name)
        table.add_row(name, r.description, r.when)
    _console().print(table)
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
    plan = api.plan(model, args.recipe, _input_size(args.input_size), **_facts(args))
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan, _console())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from . import api, io
    from .models import resolve_model

    model, spec = resolve_model(args.model, args.pretrained, args.checkpoint, args.key_mapping)
    if Path(args.output).exists() and not args.force:
        from .errors import OutputExistsError

        raise OutputExistsError(f"output directory {args.output!r} exists; pass --force to replace it.")
    conversion = api.convert(
        model, args.recipe, _input_size(args.input_size), validate=not args.no_validate, **_facts(args)
    )
    io.save(conversion, args.output, force=args.force, model_spec=spec)
    _print_conversion(conversion, args.output)
    return 0


def _print_conversion(conversion: Any, output: str) -> None:
    from .render import print_plan, report_lines

    console = _console()
    print_plan(conversion.plan, console, max_rows=12)
    for line in report_lines(conversion.report):
        console.print(line, highlight=False)
    console.print(f"wrote {output}/ (model.safetensors, plan.json, report.json, report.md)", highlight=False)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import api, io
    from .checks import batch_dependence
    from .models import create_timm

    console = _console()
    model = create_timm(DEFAULT_DEMO_MODEL).eval()
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    console.print(
        f"[bold]normswap demo[/bold]: timm {DEFAULT_DEMO_MODEL} (built locally, random weights), "
        f"recipe small-batch for batch size 2",
        highlight=False,
    )
    conversion = api.convert(model, "small-batch", x[:1], batch_size=2)
    out = Path(args.output) / f"{DEFAULT_DEMO_MODEL}-small-batch"
    io.save(conversion, out, force=True, model_spec={"timm": DEFAULT_DEMO_MODEL})
    _print_conversion(conversion, str(out))
    before, after = batch_dependence(model, x), batch_dependence(conversion.model, x)
    console.print(
        f"train-mode batch dependence (0 = samples independent): original {before:.3g}, converted {after:.3g}",
        highlight=False,
    )
    reloaded = io.load(out)
    same = all(
        torch.equal(a, b)
        for a, b in zip(conversion.model.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )
    console.print(f"reloaded from {out}: weights bit-identical = {same}", highlight=False)
    return 0 if same and after < 1e-4 else 1


COMMANDS = {
    "recipes": cmd_recipes,
    "targets": cmd_targets,
    "inspect": cmd_inspect,
    "convert": cmd_convert,
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
        print("normswap: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

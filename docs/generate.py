"""Write the reference pages that must not drift from the code: ``python docs/generate.py``.

``docs/reference/cli.md`` is rendered from the argparse parser itself and ``docs/reference/api.md``
from ``normswap.__all__`` and the docstrings; ``tests/test_docs.py`` fails when either is stale.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
WIDTH = "100"  # argparse wraps to the terminal; a fixed width keeps the page identical everywhere


def cli_page() -> str:
    os.environ["COLUMNS"] = WIDTH
    from normswap.cli import build_parser

    parser = build_parser()
    parser.prog = "normswap"
    parts = [
        "# CLI reference",
        "",
        "Generated from the argument parser by `python docs/generate.py`; do not edit by hand.",
        "`python cli.py …` from a checkout is the same as the installed `normswap …`.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parts += ["", f"## normswap {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


def first_paragraph(doc: str | None) -> str:
    text = inspect.cleandoc(doc or "")
    return text.split("\n\n")[0].replace("\n", " ") if text else "(undocumented)"


def signature_of(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def api_page() -> str:
    import normswap

    parts = [
        "# API reference",
        "",
        "Generated from `normswap.__all__` and the docstrings by `python docs/generate.py`; do not edit by",
        "hand. The order is `__all__`'s. Guides: [docs/README.md](../README.md).",
        "",
    ]
    for name in normswap.__all__:
        obj = getattr(normswap, name)
        kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
        header = f"`normswap.{name}{signature_of(obj) if kind == 'function' else ''}`"
        parts += [f"## {name}", "", f"{kind} {header}", "", first_paragraph(obj.__doc__), ""]
    return "\n".join(parts)


PAGES = {"cli.md": cli_page, "api.md": api_page}


def main(check: bool = False) -> int:
    stale = []
    for name, render in PAGES.items():
        path = REFERENCE / name
        text = render()
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)}; run python docs/generate.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(check="--check" in sys.argv))

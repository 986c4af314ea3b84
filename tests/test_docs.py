"""Every code block in README.md and docs/ runs, so the documentation cannot drift from the code.

Conventions (docs/README.md states them for writers):
- ```python blocks run each in a fresh interpreter, ```bash blocks under bash with ``normswap`` and
  ``python`` resolving to this checkout; the blocks of one file run in order in one temporary folder,
  so a later block may read what an earlier one wrote.
- ```toml blocks that hold a ``[recipe]`` table must load as recipes.
- ``<!-- requires: mod1, mod2 -->`` right before a block skips it where a module is missing.
- The README's set-up block (``<!-- setup -->``) is the two set-up commands: the test checks that CI's
  script installs and tests the same way, and runs the first command's job.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import normswap

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```(\w*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*(requires|setup)\s*:?\s*(.*?)\s*-->\s*$")
RUNNABLE = {"python", "bash", "toml"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    requires: tuple[str, ...] = ()
    setup: bool = False

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    requires: tuple[str, ...] = ()
    setup = False
    i = 0
    while i < len(lines):
        directive = DIRECTIVE.match(lines[i].strip())
        fence = FENCE.match(lines[i])
        if directive:
            if directive.group(1) == "requires":
                requires = tuple(m.strip() for m in directive.group(2).split(",") if m.strip())
            else:
                setup = True
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"{path}:{i + 1}: unclosed code block"
            found.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", requires, setup))
            requires, setup = (), False
            i = end
        elif lines[i].strip():
            requires, setup = (), False
        i += 1
    return found


def shims(folder: Path) -> Path:
    """``normswap``, ``python`` and ``python3`` that run this checkout, whatever is installed."""
    folder.mkdir()
    for name, target in (("normswap", f"{sys.executable} {ROOT / 'cli.py'}"), ("python", sys.executable),
                         ("python3", sys.executable)):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        script.chmod(0o755)
    return folder


def environment(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["NO_COLOR"] = "1"
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> None:
    if block.lang == "toml":
        if "[recipe]" in block.code:
            recipe_file = cwd / f"block_{block.line}.toml"
            recipe_file.write_text(block.code)
            normswap.load_recipe(str(recipe_file))
        return
    shell = ["bash", "-euo", "pipefail", "-c"]
    command = [sys.executable, "-c", block.code] if block.lang == "python" else [*shell, block.code]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"{block.where()} ({block.lang}) exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n"
        f"--- stderr\n{done.stderr[-3000:]}"
    )


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_code_block_runs(doc: Path, tmp_path: Path) -> None:
    env = environment(shims(tmp_path / "bin"))
    work = tmp_path / "work"
    work.mkdir()
    skipped = []
    for block in blocks_of(doc):
        if block.setup or block.lang not in RUNNABLE:
            continue
        if absent := missing(block.requires):
            skipped.append(f"{block.where()} needs {', '.join(absent)}")
            continue
        run_block(block, work, env)
    if skipped:
        pytest.skip("; ".join(skipped))


def setup_commands() -> list[str]:
    setups = [b for b in blocks_of(ROOT / "README.md") if b.setup]
    assert len(setups) == 1, "README.md needs exactly one <!-- setup --> block"
    return [line for line in setups[0].code.splitlines() if line.strip() and not line.lstrip().startswith("#")]


SETUP = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install -e (\S+) && \.venv/bin/(.+)$")


def test_readme_setup_commands_are_what_ci_runs_and_the_main_job_runs(tmp_path: Path) -> None:
    commands = [SETUP.match(c) for c in setup_commands()]
    assert len(commands) == 2 and all(commands), f"unexpected set-up commands: {setup_commands()}"
    (main_spec, main_job), (test_spec, test_command) = (c.groups() for c in commands)  # type: ignore[union-attr]
    ci = (ROOT / ".ci" / "run").read_text()
    # CI builds its own environment the same way and runs the same test command in it.
    assert f'-m pip install -q --no-cache-dir -e {test_spec}' in ci.replace("'", '"'), ci
    assert test_command.startswith("python -m pytest") and test_command.replace("python", "", 1) in ci
    assert main_spec == "." and main_job.startswith("normswap ")
    env = environment(shims(tmp_path / "bin"))
    done = subprocess.run(shlex.split(main_job), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any((tmp_path / "normswap-out").rglob("model.safetensors")), "the main job writes its conversion"


def test_generated_reference_pages_are_current() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                          text=True, env=environment(Path(sys.executable).parent), timeout=300)
    assert done.returncode == 0, done.stderr


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_point_at_files_that_exist(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    broken = [target for target in LINK.findall(text)
              if not target.startswith(("http://", "https://", "#", "mailto:"))
              and not (doc.parent / target.split("#")[0]).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_every_public_name_is_documented() -> None:
    undocumented = [name for name in normswap.__all__ if not (getattr(normswap, name).__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


@pytest.mark.parametrize(("name", "limit"), [("README.md", 12_000), ("BENCHMARKS.md", 30_000)])
def test_the_front_pages_stay_short(name: str, limit: int) -> None:
    size = len((ROOT / name).read_text(encoding="utf-8"))
    assert size <= limit, f"{name} has {size} characters; guides go to docs/, full tables to benchmarks/results/"

"""One progress bar for the long steps (synthesis, reconstruction, recovery, validation).

The bar is rich's, transient (it disappears when done, so logs keep only results), and only drawn
when asked: library calls stay silent unless the caller passes ``progress=True``, as the CLI does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(enabled: bool, total: int, description: str, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yields ``advance(detail=None)``: one of ``total`` steps done; ``detail`` (e.g. the loss) is shown
    after the description. A no-op when disabled or for a single step."""
    if not enabled or total < 2:
        yield lambda detail=None: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total, completed=completed)

        def advance(detail: str | None = None) -> None:
            bar.update(task, advance=1, description=f"{description} ({detail})" if detail else description)

        yield advance

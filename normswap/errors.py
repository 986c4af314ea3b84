"""One error hierarchy for everything normswap refuses to do.

Every class carries an ``exit_code`` so the command line can map a failure class to a distinct,
documented status without a table kept elsewhere. Classes that describe bad user values also
subclass ``ValueError`` (as peft does) so callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NormswapError(Exception):
    """Base class: something normswap was asked to do cannot be done. The message says what, where
    and what to do instead."""

    exit_code = 1


class RecipeError(NormswapError, ValueError):
    """A recipe file or Recipe object is malformed: unknown key, wrong type, unknown target."""

    exit_code = 3


class UnknownNameError(NormswapError, KeyError):
    """A name (recipe, target, model, layout, fact) is not known. Lists the valid ones."""

    exit_code = 4

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0]) if self.args else ""


class PlanError(NormswapError, ValueError):
    """A plan entry cannot be carried out (for example groups that cannot divide the channels), or a
    plan does not fit the model it is applied to."""

    exit_code = 5


class TraceError(NormswapError, RuntimeError):
    """The model could not be run on the example inputs, so no context could be learned."""

    exit_code = 6


class ModelLoadError(NormswapError):
    """A model spec, checkpoint or saved conversion could not be turned into a model."""

    exit_code = 7


class UnsafeCheckpointError(ModelLoadError):
    """A checkpoint would need arbitrary code to be unpickled; it is refused."""

    exit_code = 8


class OutputExistsError(NormswapError, FileExistsError):
    """The output directory exists and overwriting was not asked for."""

    exit_code = 9


class DataError(NormswapError, ValueError):
    """Calibration or validation data is unusable (shape, dtype, NaN/Inf, empty)."""

    exit_code = 10


class ExportError(NormswapError):
    """A model could not be exported, or its exported file does not load or does not match PyTorch."""

    exit_code = 12


def unknown_name(kind: str, name: str, valid: Iterable[str], where: str = "") -> UnknownNameError:
    """Build the error for an unknown name: closest matches first, then every valid choice."""
    choices = sorted(set(valid))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    place = f" (in {where})" if where else ""
    listing = ", ".join(choices) if len(choices) <= 40 else ", ".join(choices[:40]) + ", ..."
    return UnknownNameError(f"unknown {kind} {name!r}{place}.{hint} Valid {kind}s: {listing}.")

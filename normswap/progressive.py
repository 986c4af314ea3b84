"""Progressive transition: converted layers that start exactly as the original and move to the target.

Each converted norm site becomes a :class:`ProgressiveNorm` computing
``(1 − α)·FrozenBatchNorm(x) + α·target(x)`` before the site's activation. At α = 0 it is the
eval-mode original, bit for bit (to float rounding where the transfer ``standardize`` folded
BatchNorm's statistics into the producing conv, which the frozen part then leaves out); the training
loop advances α with ``transition.step()`` along a schedule, so there is no cliff; ``finalize()``
leaves the plain target modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .api import RecipeSpec
from .api import plan as make_plan
from .apply import _swap_module
from .apply import apply_plan as _apply
from .errors import PlanError, unknown_name
from .layers import FrozenBatchNorm, capturing_graph
from .tracing import module_aliases
from .transfer import NormState, state_after
from .types import Plan

SCHEDULES = ("linear", "cosine")
BLENDABLE = ("groupnorm", "layernorm", "layernorm-chw", "rmsnorm-chw", "instancenorm")


class ProgressiveNorm(nn.Module):
    """``(1 − α)·frozen(x) + α·target(x)``, then the original's drop and activation (if any)."""

    def __init__(self, frozen: nn.Module, target: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.frozen = frozen
        self.target = target
        self.drop = drop
        self.act = act
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            y = torch.lerp(self.frozen(x), self.target(x), self.alpha.to(x.dtype))
        elif capturing_graph():
            # Branch-free for graph capture (torch.export, ONNX, jit.trace, torch.compile): α is a
            # buffer, so a branch on its value would be data-dependent (or baked into the graph).
            y = torch.lerp(self.frozen(x), self.target(x), self.alpha.to(x.dtype))
        else:
            # Eagerly only what α needs: the start and the end cost one norm, not two. lerp is one
            # pass and exact at both ends.
            a = float(self.alpha)
            if a <= 0.0:
                y = self.frozen(x)
            elif a >= 1.0:
                y = self.target(x)
            else:
                y = torch.lerp(self.frozen(x), self.target(x), a)
        return self.act(self.drop(y))


def _detach_activation(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Take a timm norm+act module's drop and activation out, leaving a bare norm."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if isinstance(act, nn.Module):
        module.act = nn.Identity()
    if isinstance(drop, nn.Module):
        module.drop = nn.Identity()
    return (
        drop if isinstance(drop, nn.Module) else nn.Identity(),
        act if isinstance(act, nn.Module) else nn.Identity(),
    )


def _frozen_from(state: NormState) -> FrozenBatchNorm:
    assert state.running_mean is not None and state.running_var is not None
    frozen = FrozenBatchNorm(state.num_features, eps=state.eps).to(device=state.device, dtype=state.dtype)
    ones = torch.ones_like(state.running_mean)
    with torch.no_grad():
        frozen.weight.copy_(state.weight if state.weight is not None else ones)
        frozen.bias.copy_(state.bias if state.bias is not None else torch.zeros_like(ones))
        frozen.running_mean.copy_(state.running_mean)
        frozen.running_var.copy_(state.running_var)
    return frozen


@dataclass
class Transition:
    """Drives the blend. Call :meth:`step` once per optimisation step (or let a callback do it:
    :class:`TransitionCallback` in a plain loop, ``normswap.integrations.lightning.TransitionCallback``
    in Lightning, ``normswap.integrations.huggingface.TransitionCallback`` in a Hugging Face
    ``Trainer``), then :meth:`finalize`. :meth:`state_dict` / :meth:`load_state_dict` carry its
    progress through a checkpoint."""

    model: nn.Module
    plan: Plan
    steps: int
    schedule: str = "linear"
    paths: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    taken: int = 0
    finalized: bool = False

    @property
    def alpha(self) -> float:
        progress = min(self.taken / self.steps, 1.0)
        return progress if self.schedule == "linear" else 0.5 - 0.5 * math.cos(math.pi * progress)

    def step(self, n: int = 1) -> float:
        return self.step_to(self.taken + n)

    def step_to(self, taken: int) -> float:
        """Set how many steps have been taken (clipped to ``[0, steps]``), for trainers that count
        optimizer steps themselves; returns α."""
        self.taken = min(max(taken, 0), self.steps)
        self._set_alpha()
        return self.alpha

    def _set_alpha(self) -> None:
        for module in self._blends():
            module.alpha.fill_(self.alpha)

    def _blends(self) -> list[ProgressiveNorm]:
        return [m for m in self.model.modules() if isinstance(m, ProgressiveNorm)]

    def state_dict(self) -> dict[str, Any]:
        """The transition's progress (the model's weights are the model's own state dict)."""
        return {"taken": self.taken, "steps": self.steps, "schedule": self.schedule, "finalized": self.finalized}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on from a saved :meth:`state_dict`: same schedule and length, or a PlanError."""
        saved = (int(state["steps"]), str(state["schedule"]))
        if saved != (self.steps, self.schedule):
            raise PlanError(f"the saved transition ran {saved[0]} steps on a {saved[1]!r} schedule, this one "
                            f"{self.steps} on {self.schedule!r}; resume with progressive(..., steps={saved[0]}, "
                            f"schedule={saved[1]!r}).")
        self.step_to(int(state["taken"]))
        if state.get("finalized") and not self.finalized:
            self.finalize()

    def finalize(self) -> nn.Module:
        """Replace every blend by its target module (activation re-attached); returns the model."""
        aliases = module_aliases(self.model)
        for path in self.paths:
            blend = self.model.get_submodule(path)
            if not isinstance(blend, ProgressiveNorm):
                continue
            target = blend.target
            if not isinstance(blend.act, nn.Identity) or not isinstance(blend.drop, nn.Identity):
                if hasattr(target, "act"):
                    target.act, target.drop = blend.act, blend.drop
                else:
                    target = nn.Sequential(target, blend.drop, blend.act)
            _swap_module(self.model, path, target, aliases)
        self.taken = self.steps
        self.finalized = True
        return self.model


class TransitionCallback:
    """Callback for a plain training loop: call :meth:`on_train_batch_end` after every optimizer step
    and :meth:`on_train_end` at the end (it finalizes when ``finalize_at_end``). Lightning and Hugging
    Face trainers get their own, which count optimizer steps and checkpoint the transition:
    ``normswap.integrations.lightning.TransitionCallback`` and
    ``normswap.integrations.huggingface.TransitionCallback``."""

    def __init__(self, transition: Transition, finalize_at_end: bool = True) -> None:
        self.transition = transition
        self.finalize_at_end = finalize_at_end

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.transition.step()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        if self.finalize_at_end:
            self.transition.finalize()

    # Checkpoint ``transition.state_dict()`` with the rest of the loop's state.

    def __getattr__(self, name: str) -> Any:
        # A trainer asking for a hook or attribute this class lacks (Lightning's setup or state_key,
        # Hugging Face's on_init_end) gets told which callback it needs, not an AttributeError that the
        # trainer's own error handling then hides.
        if name.startswith("_"):
            raise AttributeError(name)
        raise PlanError(f"normswap.TransitionCallback has no {name!r}: it is for plain training loops. In a "
                        f"Lightning Trainer use normswap.integrations.lightning.TransitionCallback(transition), "
                        f"in a Hugging Face Trainer normswap.integrations.huggingface.TransitionCallback"
                        f"(transition): they step per optimizer step and resume with the run.")


def progressive(
    model: nn.Module,
    recipe: RecipeSpec,
    steps: int,
    example_inputs: Any = None,
    schedule: str = "linear",
    inplace: bool = False,
    **facts: Any,
) -> Transition:
    """Convert ``model`` by ``recipe`` with every norm site blended from the frozen original (α = 0)
    to its target (α = 1) over ``steps`` calls of ``transition.step()``."""
    if steps < 1:
        raise PlanError(f"a transition needs at least one step, got {steps}.")
    if schedule not in SCHEDULES:
        raise unknown_name("schedule", schedule, SCHEDULES)
    the_plan = make_plan(model, recipe, example_inputs, **facts)
    converted = _apply(model, the_plan).model
    originals = dict(model.named_modules())
    aliases = module_aliases(converted)
    paths, skipped = [], {}
    for entry in the_plan.conversions:
        path = entry.site.path
        if entry.target not in BLENDABLE or entry.site.kind != "module":
            skipped[path] = f"{entry.target} is swapped directly"
            continue
        if not entry.site.has_running_stats:
            skipped[path] = "no running statistics to start from"
            continue
        # After `standardize` the producer already applies (x − μ)/s: the frozen start must not again.
        state = state_after(NormState.from_module(originals[path]), entry.options["transfer"])
        new = converted.get_submodule(path)
        drop, act = _detach_activation(new)
        blend = ProgressiveNorm(_frozen_from(state), new, drop, act).train(new.training)
        _swap_module(converted, path, blend, aliases)
        paths.append(path)
    return Transition(converted, the_plan, steps, schedule, tuple(paths), skipped)

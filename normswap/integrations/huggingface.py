"""The progressive transition in a Hugging Face ``Trainer``: ``callbacks=[TransitionCallback(t)]``.

α follows the trainer's optimizer steps (``state.global_step``), so ``gradient_accumulation_steps``
does not run the transition faster. The Trainer saves that step count in every checkpoint and
restores it on ``train(resume_from_checkpoint=...)``, and α is a function of it: a resumed run takes
up the transition where it stopped, with no callback state of its own to save.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError("normswap.integrations.huggingface needs transformers: pip install 'normswap[huggingface]'") \
        from exc

from ..progressive import Transition


class TransitionCallback(TrainerCallback):  # type: ignore[misc]
    """Advance ``transition`` once per optimizer step, counted from ``start_step`` (the trainer's global
    step the transition starts at), and with ``finalize_at_end`` replace the blends by their targets
    when training ends."""

    def __init__(self, transition: Transition, finalize_at_end: bool = True, start_step: int = 0) -> None:
        self.transition = transition
        self.finalize_at_end = finalize_at_end
        self.start_step = start_step

    def _follow(self, state: Any) -> None:
        if not self.transition.finalized:
            self.transition.step_to(int(state.global_step) - self.start_step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._follow(state)  # resumed: the step count the checkpoint restored

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._follow(state)  # called once per optimizer step, after gradient accumulation

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.finalize_at_end:
            self.transition.finalize()

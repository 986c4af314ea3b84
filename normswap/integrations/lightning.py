"""The progressive transition in a Lightning ``Trainer``: ``callbacks=[TransitionCallback(t)]``.

α follows the trainer's optimizer steps (``trainer.global_step``), so gradient accumulation does not
run the transition faster, and the transition's progress is saved in Lightning checkpoints and
restored when a run resumes from one (``trainer.fit(..., ckpt_path=...)``).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package, for projects that import pytorch_lightning
    try:
        from pytorch_lightning import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("normswap.integrations.lightning needs Lightning: pip install lightning") from exc

from ..progressive import Transition


class TransitionCallback(Callback):  # type: ignore[misc]
    """Advance ``transition`` once per optimizer step, counted from ``start_step`` (the trainer's global
    step the transition starts at), save it in checkpoints, and with ``finalize_at_end`` replace the
    blends by their targets when training ends."""

    def __init__(self, transition: Transition, finalize_at_end: bool = True, start_step: int = 0) -> None:
        self.transition = transition
        self.finalize_at_end = finalize_at_end
        self.start_step = start_step

    def _follow(self, trainer: Any) -> None:
        if not self.transition.finalized:
            self.transition.step_to(int(trainer.global_step) - self.start_step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._follow(trainer)  # a resumed run starts where the checkpoint's step count says

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._follow(trainer)  # global_step moves only when the optimizer steps

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.finalize_at_end:
            self.transition.finalize()

    def state_dict(self) -> dict[str, Any]:
        return {"transition": self.transition.state_dict(), "start_step": self.start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_step = int(state_dict["start_step"])
        self.transition.load_state_dict(state_dict["transition"])

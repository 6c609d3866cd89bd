"""Hugging Face Trainer integration: `MoEScopeTrainerCallback` records routing during `Trainer.train`.

    cb = MoEScopeTrainerCallback("traces/run-a")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    cb.set_trainer(trainer)   # optional: scalars then reach every report_to logger through trainer.log
    trainer.train()

Steps are `state.global_step` (gradient-accumulation micro-batches fold into one step), each process writes
its own parts (`args.process_index`), evaluation during training is tagged `eval`, and a
`resume_from_checkpoint=` run continues the trace without duplicate rows. At each flush the scalars
`moescope/layer{L}/{load_cv,maxvio,entropy_norm,dead_experts}` are logged: through `trainer.log` when the
trainer is known (TensorBoard, W&B, CSV… and `state.log_history`), else merged into the next `on_log`
entry and `state.log_history`. `TrainingArguments(torch_compile=True)` and `gradient_checkpointing=True` are
recorded the same way as the plain loop (each forward once; recompute forwards in backward are skipped).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..capture.options import CaptureOptions
from ._base import RecordingSession, add_expert_histogram

logger = logging.getLogger("moescope")

__all__ = ["MoEScopeTrainerCallback"]


class MoEScopeTrainerCallback(TrainerCallback):
    """Record MoE routing of the Trainer's model (or its submodule `module`) during train into `run_dir`."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        module: str | None = None,
        log_scalars: bool = True,
        log_histograms: bool = True,
        alerts: bool = True,
        eval_tag: str = "eval",
        trainer: Any = None,
        options: CaptureOptions | None = None,
        recorder_kwargs: Mapping[str, Any] | None = None,
        **capture: Any,
    ) -> None:
        """`capture` takes the options of `moescope.record` (`CaptureOptions`: tokens, flush_every, run, rank, …)."""
        self.module = module
        self.log_scalars = log_scalars
        self.log_histograms = log_histograms
        self.session = RecordingSession(run_dir, alerts=alerts, eval_tag=eval_tag, options=options,
                                        recorder_kwargs=recorder_kwargs, **capture)
        self.session.meta = {"integration": "transformers", **self.session.meta}
        self.rank = self.session.options.rank
        self._trainer = trainer
        self._pending: dict[str, float] = {}
        self._pending_hist: tuple[int, dict[int, np.ndarray]] | None = None

    def close(self) -> None:
        """Flush and detach now: call it in a `finally:` after `trainer.train()`, which has no exception hook."""
        self.session.close()
        self._pending = {}

    def set_trainer(self, trainer: Any) -> None:
        """Log through `trainer.log` (reaches every report_to integration), as transformers' own JIT callback does."""
        self._trainer = trainer

    @property
    def recorder(self) -> Any:
        """The live moescope Recorder (None outside train)."""
        return self.session.recorder

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        """(last step of the window, scalars) of every flush so far."""
        return self.session.history

    # -- lifecycle ----------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        """Attach the recorder to the (unwrapped) model; each process writes parts named by its rank."""
        if self.session.recorder is not None:
            return
        if model is None:
            raise ValueError("MoEScopeTrainerCallback: the Trainer passed no model to on_train_begin")
        target = model.get_submodule(self.module) if self.module else model
        rank = self.rank if self.rank is not None else _rank_of(args)
        self.session.meta.setdefault("world_size", int(getattr(args, "world_size", 1) or 1))
        tok = kw.get("processing_class") or kw.get("tokenizer")
        if self.session.options.tokenizer is None and getattr(tok, "name_or_path", None):
            # the Trainer's own tokenizer says how to decode token ids (report --experts, the Tokens page)
            self.session.options = replace(self.session.options, tokenizer=tok)
        self.session.start(target, rank, self._on_scalars)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Flush the last window, detach every hook, and log its scalars."""
        self.session.close()
        self._emit(state)

    # -- stepping -----------------------------------------------------------------------------
    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Called once per optimizer step (first micro-batch): every micro-batch forward gets this step."""
        self.session.leave_eval()
        self.session.set_step(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Flush a full window, emit its scalars, and tag the evaluation the Trainer is about to run."""
        try:
            self.session.end_step()
        except BaseException:
            self._emit(state)  # the window whose alerts stop training still reaches the logs
            self.session.close()  # the recorder closed itself before raising; forget it so train() can run again
            raise
        if self._pending:
            if self._trainer is not None:
                self._emit(state)
            else:
                control.should_log = True  # the Trainer logs this step, and on_log carries the scalars
        if control.should_evaluate:
            # DefaultFlowCallback (always first) has decided; evaluation runs right after this hook.
            self.session.enter_eval(state.global_step)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Epoch-end evaluation (eval_strategy="epoch") runs right after this hook: tag it too."""
        if control.should_evaluate:
            self.session.enter_eval(state.global_step)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Evaluation finished: back to training forwards."""
        self.session.leave_eval()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        """Without a bound trainer, merge pending scalars into this log entry (and its log_history row)."""
        if not self._pending or self._trainer is not None or logs is None:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    # -- logging ------------------------------------------------------------------------------
    def _on_scalars(self, step: int, metrics: dict[str, float], counts: dict[int, np.ndarray]) -> None:
        if not self.log_scalars:
            return
        # A flush happens inside a forward; logging waits for the step boundary, where the Trainer logs too.
        self._pending.update(metrics)
        self._pending_hist = (step, counts)

    def _emit(self, state: TrainerState) -> None:
        """Send pending scalars out now: trainer.log when bound, else straight into log_history."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        hist, self._pending_hist = self._pending_hist, None
        if self._trainer is not None:
            self._trainer.log(dict(pending))
            if self.log_histograms and hist is not None and state.is_world_process_zero:
                _tb_histograms(self._trainer, state.global_step, hist[1])
        else:
            state.log_history.append({**pending, "step": state.global_step})


def _rank_of(args: Any) -> int:
    """Global rank of this process as the Trainer sees it (0 when not distributed)."""
    for name in ("process_index", "global_rank"):
        v = getattr(args, name, None)
        if isinstance(v, int):
            return v
    return int(os.environ.get("RANK", "0"))


def _tb_histograms(trainer: Any, step: int, counts: dict[int, np.ndarray]) -> None:
    """One bin per expert into the TensorBoardCallback's writer, when report_to includes tensorboard."""
    writer = None
    for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        writer = getattr(cb, "tb_writer", None)
        if writer is not None:
            break
    if writer is None or not hasattr(writer, "add_histogram_raw"):
        return
    for layer, c in counts.items():
        add_expert_histogram(writer, layer, step, c)

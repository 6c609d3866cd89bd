"""Lightning integration: `MoEScopeCallback` records routing during `Trainer.fit` and logs per-layer load scalars.

    trainer = lightning.Trainer(callbacks=[MoEScopeCallback("traces/run-a")], ...)

Steps are `trainer.global_step` (gradient-accumulation micro-batches fold into one step), every rank writes
its own parts, a `ckpt_path=` resume continues the trace without duplicate rows, and at each flush
`moescope/layer{L}/{load_cv,maxvio,entropy_norm,dead_experts}` go to every `trainer.loggers` entry
(plus a one-bin-per-expert histogram on TensorBoard). A compiled LightningModule (`torch.compile(module)`)
and activation-checkpointed layers are recorded the same way (each forward once).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np

from ..capture.options import CaptureOptions
from ._base import RecordingSession, add_expert_histogram

logger = logging.getLogger("moescope")

__all__ = ["MoEScopeCallback"]


class MoEScopeCallback(pl.Callback):
    """Record MoE routing of the LightningModule (or its submodule `module`) during fit into `run_dir`."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        module: str | None = None,
        log_scalars: bool = True,
        log_histograms: bool = True,
        alerts: bool = True,
        val_tag: str = "val",
        options: CaptureOptions | None = None,
        recorder_kwargs: Mapping[str, Any] | None = None,
        **capture: Any,
    ) -> None:
        """`capture` takes the options of `moescope.record` (`CaptureOptions`: tokens, flush_every, run, …)."""
        super().__init__()
        self.module = module
        self.log_scalars = log_scalars
        self.log_histograms = log_histograms
        self.session = RecordingSession(run_dir, alerts=alerts, eval_tag=val_tag, options=options,
                                        recorder_kwargs=recorder_kwargs, **capture)
        self.session.meta = {"integration": "lightning", **self.session.meta}
        self._trainer: pl.Trainer | None = None

    @property
    def recorder(self) -> Any:
        """The live moescope Recorder (None outside fit)."""
        return self.session.recorder

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        """(last step of the window, scalars) of every flush so far."""
        return self.session.history

    # -- lifecycle ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Attach the recorder for fit (the process group already exists here, so the rank is known)."""
        if stage != "fit" or self.session.recorder is not None:
            return
        self._trainer = trainer
        model = pl_module.get_submodule(self.module) if self.module else pl_module
        self.session.meta.setdefault("world_size", int(trainer.world_size))
        self.session.start(model, int(trainer.global_rank), self._log_flush)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Flush the last window and detach every hook."""
        if stage == "fit":
            self.session.close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close at the end of training, while the loggers are still open to receive the last window."""
        self.session.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Keep the trace complete up to the failure and leave no hooks behind."""
        try:
            self.session.close()
        except Exception:  # the original exception is the one the user needs to see
            logger.exception("moescope: closing the recorder after %r failed", exception)

    # -- stepping -----------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Step = optimizer step, constant across the micro-batches of one gradient-accumulation step."""
        self.session.leave_eval()
        self.session.set_step(trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation forwards (sanity check included) go under the `val_tag` tag at the current step."""
        self.session.set_step(trainer.global_step)
        self.session.enter_eval()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back to training forwards."""
        self.session.leave_eval()

    # -- logging ------------------------------------------------------------------------------
    def _log_flush(self, step: int, metrics: dict[str, float], counts: dict[int, np.ndarray]) -> None:
        trainer = self._trainer
        if trainer is None or not self.log_scalars:
            return
        for lg in trainer.loggers:
            lg.log_metrics(dict(metrics), step=step)
            if self.log_histograms and trainer.is_global_zero:
                _histogram(lg, step, counts)


def _histogram(lg: Any, step: int, counts: dict[int, np.ndarray]) -> None:
    """One bin per expert on TensorBoard loggers (other loggers have no histogram they all agree on)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(lg, TensorBoardLogger):
        return
    for layer, c in counts.items():
        add_expert_histogram(lg.experiment, layer, step, c)

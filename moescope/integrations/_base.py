"""What the Lightning and HF callbacks share: owning a Recorder, stepping it, flushing windows, and turning flushes into scalars.

Framework-free on purpose (torch is imported lazily by the recorder), so both integrations stay thin.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from ..capture.options import CaptureOptions
from ._scalars import metrics_from_tables, window_counts, window_steps

logger = logging.getLogger("moescope")


class RecordingSession:
    """One recorder driven by a trainer's global step: flushes every `flush_every` steps and keeps per-flush scalars."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        alerts: bool = True,
        eval_tag: str = "eval",
        options: CaptureOptions | None = None,
        recorder_kwargs: Mapping[str, Any] | None = None,
        **capture: Any,
    ) -> None:
        """`capture` and `recorder_kwargs` are `CaptureOptions` fields (the options of `moescope.record`)."""
        self.run_dir = run_dir
        self.options = CaptureOptions.build(options, **{**dict(recorder_kwargs or {}), **capture})
        self.flush_every = int(self.options.flush_every)
        self.meta = dict(self.options.meta or {})
        self.alerts_enabled = alerts
        self.eval_tag = eval_tag
        self.recorder: Any = None
        #: (step_end, metrics) of every flush so far, in order.
        self.history: list[tuple[int, dict[str, float]]] = []
        #: (step_end, {layer: counts [E]}) of every flush, for histograms.
        self.histograms: list[tuple[int, dict[int, np.ndarray]]] = []
        self._sink: Callable[[int, dict[str, float], dict[int, np.ndarray]], None] | None = None
        self._window: set[int] = set()
        self._tag_cm: contextlib.ExitStack | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(
        self, model: Any, rank: int, sink: Callable[[int, dict[str, float], dict[int, np.ndarray]], None] | None
    ) -> Any:
        """Attach a recorder to `model` writing this rank's parts; `sink` receives each flush's scalars."""
        from ..capture.recorder import Recorder

        rules = self.options.alert_rules
        if rules is None and self.alerts_enabled:
            from ..capture.alerts import default_rules

            # Passing rules (not None) is what makes the recorder evaluate alerts at each flush.
            rules = default_rules()
        self._sink = sink
        self._window.clear()
        self.recorder = Recorder(
            model,
            self.run_dir,
            options=replace(self.options, rank=rank, meta=self.meta, on_flush=self._on_flush, alert_rules=rules),
        )
        self.recorder.start()
        return self.recorder

    def close(self) -> None:
        """Leave any eval tag, flush the last window and detach every hook (idempotent)."""
        self.leave_eval()
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.close()

    # -- stepping -----------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Set the step of the following forwards; a new step after a full window flushes that window first."""
        if self.recorder is None:
            return
        step = int(step)
        if step not in self._window:
            # Flushing from the trainer's step events (not only from the recorder's forward hooks) keeps
            # windows aligned to global steps and lets HF flush at the end of a step, when logs are written.
            self._flush_if_full()
            self._window.add(step)
        self.recorder.step = step

    def end_step(self) -> None:
        """The current step is complete (optimizer stepped): flush now if it fills the window."""
        if self.recorder is not None:
            self._flush_if_full()

    def _flush_if_full(self) -> None:
        if len(self._window) >= self.flush_every:
            self._window.clear()
            self.recorder.flush()

    def enter_eval(self, step: int | None = None) -> None:
        """Tag the following forwards as evaluation (kept apart from training load and scalars)."""
        if self.recorder is None or self._tag_cm is not None or not self.eval_tag:
            return
        if step is not None:
            self.recorder.step = int(step)
        self._tag_cm = contextlib.ExitStack()
        self._tag_cm.enter_context(self.recorder.tag(self.eval_tag))

    def leave_eval(self) -> None:
        """Stop tagging forwards as evaluation."""
        cm, self._tag_cm = self._tag_cm, None
        if cm is not None:
            cm.close()

    # -- flushes ------------------------------------------------------------------------------
    def _on_flush(self, recorder: Any, tables: dict[str, pa.Table]) -> None:
        if self.options.on_flush is not None:  # the user's own on_flush still runs
            self.options.on_flush(recorder, tables)
        load = tables.get("expert_load")
        if load is None or load.num_rows == 0:
            return
        tags = set(load.column("tag").to_pylist()) - {self.eval_tag}
        span = window_steps(load)
        assert span is not None
        step_end = span[1]
        metrics = metrics_from_tables(tables, tags)
        counts = {layer: c for layer, c in window_counts(load, tags).items() if c.sum() > 0}
        if not metrics:
            return
        self.history.append((step_end, metrics))
        self.histograms.append((step_end, counts))
        if self._sink is not None:
            try:
                self._sink(step_end, metrics, counts)
            except Exception:  # a logger failure must not lose the trace or stop training
                logger.exception("moescope: logging flushed scalars failed")


def add_expert_histogram(writer: Any, layer: int, step: int, counts: np.ndarray) -> None:
    """Write one layer's load as a TensorBoard histogram with one bin per expert (bin e holds expert e)."""
    e = np.arange(len(counts), dtype=np.float64)
    cf = np.asarray(counts, dtype=np.float64)
    writer.add_histogram_raw(
        f"moescope/layer{layer}/expert_load",
        min=0.0,
        max=float(len(cf) - 1),
        num=int(cf.sum()),
        sum=float((e * cf).sum()),
        sum_squares=float((e * e * cf).sum()),
        bucket_limits=(e + 0.5).tolist(),  # right edges, so expert e falls in (e − 0.5, e + 0.5]
        bucket_counts=cf.tolist(),
        global_step=step,
    )

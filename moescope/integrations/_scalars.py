"""Per-layer load scalars of one flushed window, logged by the training-loop integrations.

Pure numpy/pyarrow (no torch, no Lightning, no transformers), so it is cheap to import anywhere. The
values are the health rules' own (`moescope.analysis.rules.cell_values`: CV, MaxVio, load entropy, N·f_e),
so a logged curve and an alert never disagree; f_e = c_e / Σc here (a flush's tables carry no top-k).
The Lightning and HF callbacks and the metric sinks (`moescope.integrations.sinks`) all log these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..analysis.rules import DeadExpertRule, cell_values, utilization

#: Utilization N·f_e below this counts as a dead expert: the dead_expert rule's default.
DEAD_UTILIZATION = DeadExpertRule().fail_below


@dataclass(frozen=True)
class LoadScalars:
    """Load-balance scalars of one layer over one window."""

    layer: int
    n_experts: int
    assignments: int
    load_cv: float
    maxvio: float
    entropy_norm: float
    dead_experts: int
    min_utilization: float = math.nan  # min_e N·f_e (1 = fair share, 0 = an expert got nothing)

    def as_metrics(self, prefix: str = "moescope") -> dict[str, float]:
        """Flat `prefix/layer{L}/name` metrics, the names every logger receives."""
        p = f"{prefix}/layer{self.layer}"
        return {
            f"{p}/load_cv": self.load_cv,
            f"{p}/maxvio": self.maxvio,
            f"{p}/entropy_norm": self.entropy_norm,
            f"{p}/dead_experts": float(self.dead_experts),
            f"{p}/min_utilization": self.min_utilization,
        }


def load_scalars(layer: int, counts: np.ndarray, dead_utilization: float = DEAD_UTILIZATION) -> LoadScalars:
    """Scalars of one layer from its per-expert assignment counts `counts` [E]."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    n = int(c.shape[0])
    total = float(c.sum())
    if n == 0 or total <= 0:
        # No assignments in the window: every ratio is undefined, and NaN says so to every logger.
        return LoadScalars(layer, n, 0, math.nan, math.nan, math.nan, 0)
    v = cell_values(c, 1)  # T = Σc: N·f_e = N c_e / Σc
    return LoadScalars(
        layer=layer,
        n_experts=n,
        assignments=int(round(total)),
        load_cv=float(v["cv"]),
        maxvio=float(v["maxvio"]),
        entropy_norm=float(v["load_entropy"]) if v["load_entropy"] is not None else 1.0,
        dead_experts=int((utilization(c, 1, total) < dead_utilization).sum()),
        min_utilization=float(v["min_utilization"]),
    )


def window_counts(expert_load: pa.Table, tags: Iterable[str] | None = None) -> dict[int, np.ndarray]:
    """Per-layer assignment counts [E] summed over every step (and the given tags, default all) of a flushed table."""
    layer = expert_load.column("layer").to_numpy().astype(np.int64)
    expert = expert_load.column("expert").to_numpy().astype(np.int64)
    tokens = expert_load.column("tokens").to_numpy().astype(np.int64)
    keep = np.ones(len(layer), dtype=bool)
    if tags is not None:
        keep = pc.is_in(expert_load.column("tag"), pa.array(list(tags), pa.string())).to_numpy(zero_copy_only=False)
    out: dict[int, np.ndarray] = {}
    for lay in np.unique(layer):
        sel = layer == lay
        # Every (step, tag, layer) carries a row per expert, so the widest expert index gives N even when
        # the tag filter keeps nothing of this layer.
        counts = np.zeros(int(expert[sel].max()) + 1, dtype=np.int64)
        np.add.at(counts, expert[sel & keep], tokens[sel & keep])
        out[int(lay)] = counts
    return out


def window_steps(expert_load: pa.Table) -> tuple[int, int] | None:
    """First and last step of a flushed table (None when it is empty)."""
    if expert_load.num_rows == 0:
        return None
    steps = expert_load.column("step").to_numpy()
    return int(steps.min()), int(steps.max())


def scalars_from_tables(tables: Mapping[str, pa.Table], tags: Iterable[str] | None = None) -> list[LoadScalars]:
    """Per-layer scalars of a flush's tables (the recorder's `on_flush` argument); [] without expert_load."""
    load = tables.get("expert_load")
    if load is None or load.num_rows == 0:
        return []
    return [load_scalars(layer, c) for layer, c in window_counts(load, tags).items()]


def metrics_from_tables(tables: Mapping[str, pa.Table], tags: Iterable[str] | None = None) -> dict[str, float]:
    """Flat logger metrics (`moescope/layer{L}/load_cv`, …) of a flush's tables."""
    out: dict[str, float] = {}
    for s in scalars_from_tables(tables, tags):
        if s.assignments:
            out.update(s.as_metrics())
    return out


@dataclass(frozen=True)
class FlushScalars:
    """What one flush hands to the metric sinks: its run, rank, step span and per-layer scalars."""

    run: str
    rank: int
    step_start: int
    step_end: int
    layers: tuple[LoadScalars, ...]  # layers with assignments in the window, by layer
    counts: Mapping[int, np.ndarray]  # layer -> assignment counts [E] the scalars were computed from

    def metrics(self, prefix: str = "moescope") -> dict[str, float]:
        """Flat `prefix/layer{L}/name` metrics, the same names `metrics_from_tables` gives the callbacks."""
        out: dict[str, float] = {}
        for s in self.layers:
            out.update(s.as_metrics(prefix))
        return out


def flush_scalars(tables: Mapping[str, pa.Table], tags: Iterable[str] | None = None) -> FlushScalars | None:
    """Per-layer scalars of a flush's tables over `tags` (default all); None when no layer had assignments."""
    load = tables.get("expert_load")
    span = window_steps(load) if load is not None else None
    if load is None or span is None:
        return None
    counts = {layer: c for layer, c in window_counts(load, tags).items() if c.sum() > 0}
    if not counts:
        return None
    runs = load.column("run").unique().to_pylist()
    ranks = load.column("rank").unique().to_pylist()
    return FlushScalars(
        run=str(runs[0]) if len(runs) == 1 else ",".join(sorted(map(str, runs))),
        rank=int(ranks[0]) if len(ranks) == 1 else -1,
        step_start=span[0],
        step_end=span[1],
        layers=tuple(load_scalars(layer, c) for layer, c in sorted(counts.items())),
        counts=counts,
    )

"""Snapshot rule: expert clones (near-identical experts by subspace overlap or CKA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import RuleConfig, RuleSpec, Status, choices, finding, limit, register

if TYPE_CHECKING:  # pragma: no cover  (pandas is not imported on the capture path)
    import pandas as pd

#: The similarity metrics `snapshot_experts` writes.
SIMILARITY_METRICS = ("subspace_overlap", "cka")


@dataclass
class ClonesRule(RuleConfig):
    """WARN when an expert pair's similarity (any of `metrics`) exceeds `warn_above` at the latest snapshot."""

    warn_above: float = limit(0.8, 0, 1, lo_open=True)
    metrics: list[str] = choices(list(SIMILARITY_METRICS), SIMILARITY_METRICS)


def clones(rc: ClonesRule, df: pd.DataFrame, runs: Sequence[str]) -> list[dict[str, Any]]:
    """Per run × layer at the latest snapshot: WARN listing pairs above warn_above; SKIP for runs without snapshots."""
    out: list[dict[str, Any]] = []
    if df.empty:
        for run in runs:
            msg = f"run {run}: no expert_similarity snapshot ({' or '.join(rc.metrics)}); run moescope.snapshot_experts"
            out.append(finding("clones", Status.SKIP, {"run": run}, "similarity", None, rc.warn_above, msg))
        return out
    for (run, layer), g in df.groupby(["run", "layer"], sort=True):
        step = int(g["step"].iloc[0])
        cell = {"run": run, "layer": layer, "window_start": step, "window_end": step}
        best = g.sort_values("value", ascending=False).drop_duplicates(["expert_a", "expert_b"])
        hot = best[best["value"] > rc.warn_above]
        top = best.iloc[0]
        if len(hot):
            pairs = [f"{int(a)}-{int(b)}" for a, b in zip(hot["expert_a"], hot["expert_b"])]
            msg = (f"layer {layer}: {len(pairs)} expert pair(s) look like clones at step {step} "
                   f"({top['metric']} up to {top['value']:.2f} > {rc.warn_above:g}): {', '.join(pairs[:6])}"
                   + (" …" if len(pairs) > 6 else ""))
            out.append(finding("clones", Status.WARN, cell, str(top["metric"]), top["value"], rc.warn_above, msg,
                               expert=pairs))
        else:
            msg = (f"layer {layer}: no expert pair above {rc.warn_above:g} at step {step} "
                   f"(highest {top['metric']} {top['value']:.2f})")
            out.append(finding("clones", Status.PASS, cell, str(top["metric"]), top["value"], rc.warn_above, msg))
    return out


register(RuleSpec("clones", ClonesRule, "similarity", "snapshot", clones,
                  "an expert pair's subspace overlap or CKA above warn_above at the latest snapshot (WARN)"))

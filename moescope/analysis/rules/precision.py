"""Table rule: precision sensitivity (the share of sampled tokens whose experts change when the router runs in
float32 instead of the model's dtype; `record(..., precision_check=True)` writes `router_precision`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import RuleConfig, RuleSpec, Status, finding, limit, register

if TYPE_CHECKING:  # pragma: no cover  (pandas is not imported on the capture path)
    import pandas as pd


@dataclass
class PrecisionRule(RuleConfig):
    """WARN when more than `warn_above` of the sampled tokens route to other experts in float32."""

    warn_above: float = limit(0.01, 0, 1)


def precision(rc: PrecisionRule, df: pd.DataFrame, runs: Sequence[str]) -> list[dict[str, Any]]:
    """Per run × layer over all its samples: WARN above warn_above; SKIP for runs recorded without the check."""
    out: list[dict[str, Any]] = []
    judged = set(df["run"]) if not df.empty else set()
    for run in runs:
        if run not in judged:
            out.append(finding("precision", Status.SKIP, {"run": run}, "flip_rate", None, rc.warn_above,
                               f"run {run}: no precision samples (record with precision_check=True)"))
    for row in df.itertuples(index=False):
        cell = {"run": row.run, "layer": int(row.layer), "window_start": int(row.step_start),
                "window_end": int(row.step_end)}
        rate = float(row.flip_rate) if row.flip_rate == row.flip_rate and row.flip_rate is not None else None
        what = (f"layer {int(row.layer)}: {int(row.flipped)} of {int(row.sampled)} sampled tokens"
                f" ({rate:.1%}) route to other experts when the router runs in float32" if rate is not None else "")
        if rate is None:
            out.append(finding("precision", Status.SKIP, cell, "flip_rate", None, rc.warn_above,
                               f"layer {int(row.layer)}: no sampled tokens"))
        elif rate > rc.warn_above:
            out.append(finding("precision", Status.WARN, cell, "flip_rate", rate, rc.warn_above,
                               f"{what} > {rc.warn_above:g}: the model's dtype decides routing (see moescope explain)"))
        else:
            out.append(finding("precision", Status.PASS, cell, "flip_rate", rate, rc.warn_above, what))
    return out


register(RuleSpec("precision", PrecisionRule, "precision", "table", precision,
                  "more than warn_above of sampled tokens change experts when the router runs in float32 (WARN)"))

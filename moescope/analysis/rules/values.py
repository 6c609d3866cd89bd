"""The load_metrics columns the rules read, computed in numpy from one window's per-expert counts.

`analyses/load_metrics.sql` is the definition a trace is judged by; this is the same arithmetic on a host
array, for the online alerts at each flush (no DuckDB on the training path). tests/unit/test_rules.py
asserts the two agree on the same counts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Cell


def collapse_m(n_experts: int, top_k: int) -> int:
    """m = max(k, floor(N/4)): how many busiest experts the collapse rule looks at."""
    return max(int(top_k), int(n_experts) // 4)


def cell_values(
    counts: np.ndarray,
    top_k: int,
    tokens: float | None = None,
    *,
    nonfinite: float | None = None,
    entropy_sum: float | None = None,
    lse_sq_sum: float | None = None,
) -> dict[str, Any]:
    """load_metrics of one layer × window from assignment counts c [N] and the window's router stats.

    T = `tokens` (router_stats) when positive, else Σc/k, as in analyses/utilization.sql.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)  # [N]
    n, k = int(c.shape[0]), max(int(top_k), 1)
    total = float(c.sum())
    t = float(tokens) if tokens is not None and tokens > 0 else total / k
    out: dict[str, Any] = {
        "tokens": t,
        "assignments": total,
        "expected_per_expert": k * t / n if n else None,
        "nonfinite": nonfinite,
        "router_entropy": None,
        "z_loss": None,
    }
    if t > 0 and n > 1 and entropy_sum is not None:
        out["router_entropy"] = float(entropy_sum) / (t * math.log(n))
    if t > 0 and lse_sq_sum is not None:
        out["z_loss"] = float(lse_sq_sum) / t
    if n == 0 or total <= 0:
        out.update(cv=None, maxvio=None, load_entropy=None, min_utilization=None, max_utilization=None,
                   collapse_m=collapse_m(n, k), top_m_share=None)
        return out
    mean = total / n
    util = utilization(c, k, t)
    f = c / total
    nz = f[f > 0]
    m = collapse_m(n, k)
    top = np.sort(c)[::-1][:m]
    out.update(
        cv=float(c.std() / mean),
        maxvio=float(c.max() / mean - 1.0),
        load_entropy=float(-(nz * np.log(nz)).sum() / math.log(n)) if n > 1 else None,
        min_utilization=float(util.min()),
        max_utilization=float(util.max()),
        collapse_m=m,
        top_m_share=float(top.sum() / total),
    )
    return out


def utilization(counts: np.ndarray, top_k: int, tokens: float) -> np.ndarray:
    """N·f_e with f_e = c_e/(kT), per expert [N] (1.0 = fair share)."""
    c = np.asarray(counts, dtype=np.float64)
    denom = max(int(top_k), 1) * float(tokens)
    return c.shape[0] * c / denom if denom > 0 else np.full(c.shape, np.nan)


def cell_from_counts(
    run: str,
    layer: int,
    window: tuple[int | None, int | None],
    counts: np.ndarray,
    top_k: int,
    tokens: float | None = None,
    **router: float | None,
) -> Cell:
    """A `Cell` for the window rules from one layer's counts [N] and router stats (nonfinite, entropy_sum, lse_sq_sum)."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    values = cell_values(c, top_k, tokens, **router)
    util = utilization(c, top_k, values["tokens"]) if values["tokens"] else None
    return Cell(run, int(layer), window[0], window[1], int(c.shape[0]), int(top_k), values, c, util)

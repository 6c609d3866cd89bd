"""Router over-confidence: a router that stopped mixing.

The mean router entropy H(p(t)) over a window's tokens, normalised by ln N (router_stats.entropy_sum /
tokens / ln N), is 1 for a uniform router and 0 for a one-hot one. Below `warn_below` the router sends
each token to its first choice with near certainty: top-k mixing and the load-balancing gradient through
the probabilities vanish, which usually precedes a collapse (the demo's collapse run sits at 0.003–0.08,
its balanced run at 0.97–1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Cell, RuleConfig, RuleSpec, Status, finding, limit, register


@dataclass
class OverconfidenceRule(RuleConfig):
    """WARN when the mean router entropy H(p)/ln N over a window is below `warn_below`."""

    warn_below: float = limit(0.1, 0, 1, lo_open=True, hi_open=True, doc="share of ln N")


def overconfidence(rc: OverconfidenceRule, cell: Cell, min_tokens: float) -> dict[str, Any]:
    """WARN when router_entropy < warn_below; SKIP without router tokens or with N < 2."""
    thr = rc.warn_below
    v = cell.get("router_entropy")
    if v is None or not cell.get("tokens"):
        why = "no router entropy in this window (router_stats absent or N < 2)"
        return finding("overconfidence", Status.SKIP, cell, "router_entropy", None, thr, f"{cell.where}: {why}")
    if v < thr:
        msg = (f"{cell.where}: router stopped mixing: mean router entropy {v:.3f} of ln N < {thr:g} "
               "(near one-hot routing probabilities)")
        return finding("overconfidence", Status.WARN, cell, "router_entropy", v, thr, msg)
    msg = f"{cell.where}: mean router entropy {v:.2f} of ln N (≥ {thr:g})"
    return finding("overconfidence", Status.PASS, cell, "router_entropy", v, thr, msg)


register(RuleSpec("overconfidence", OverconfidenceRule, "router_entropy", "window", overconfidence,
                  "mean router entropy H(p)/ln N below warn_below: a router that stopped mixing (WARN)",
                  online=True))

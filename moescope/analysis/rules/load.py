"""Load rules (DESIGN.md metric catalogue): dead experts, load CV, MaxVio, collapse onto a few experts.

Every load rule needs enough data: where the expected assignments per expert kT/N is below
[health].min_tokens the rule reports SKIP with the reason, never PASS or FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Cell, RuleConfig, RuleSpec, Status, experts_text, finding, grade, limit, register, skip_reason


@dataclass
class DeadExpertRule(RuleConfig):
    """FAIL when an expert's utilization N·f_e over a window is below `fail_below`."""

    fail_below: float = limit(0.05, 0, 1, lo_open=True, doc="N·f_e below this is a dead expert")


@dataclass
class LoadCVRule(RuleConfig):
    """WARN when the load CV std(c)/mean(c) exceeds `warn_above` (FAIL above `fail_above` when set)."""

    warn_above: float = limit(0.5, 0, lo_open=True)
    fail_above: float | None = limit(None, 0, lo_open=True, optional=True)


@dataclass
class MaxVioRule(RuleConfig):
    """WARN when MaxVio = max(c)/mean(c) − 1 exceeds `warn_above`, FAIL above `fail_above`."""

    warn_above: float = limit(1.0, 0, lo_open=True)
    fail_above: float | None = limit(3.0, 0, lo_open=True, optional=True)


@dataclass
class CollapseRule(RuleConfig):
    """FAIL when the m = max(k, N/4) busiest experts carry at least `share` of the assignments."""

    share: float = limit(0.9, 0, 1, lo_open=True)


def _skip(rule: str, metric: str, cell: Cell, reason: str) -> dict[str, Any]:
    return finding(rule, Status.SKIP, cell, metric, None, None, f"{cell.where}: {reason}")


def dead_expert(rc: DeadExpertRule, cell: Cell, min_tokens: float) -> dict[str, Any]:
    """FAIL naming every expert with N·f_e < fail_below; PASS otherwise."""
    if (why := skip_reason(cell, min_tokens)) is not None:
        return _skip("dead_expert", "utilization", cell, why)
    thr, n = rc.fail_below, cell.n_experts
    v = cell.get("min_utilization")
    util = cell.utilization
    dead = [] if util is None else [int(e) for e in np.flatnonzero(util < thr)]
    if dead:
        msg = (f"{cell.where}: {len(dead)} of {n} experts get under {thr:g} of their fair share "
               f"(N·f below {thr:g}; lowest {v or 0:.3f}): experts {experts_text(dead)}")
        return finding("dead_expert", Status.FAIL, cell, "utilization", v, thr, msg, expert=dead)
    msg = f"{cell.where}: every expert gets at least {thr:g} of its fair share (lowest N·f {v or 0:.2f})"
    return finding("dead_expert", Status.PASS, cell, "utilization", v, thr, msg)


def load_cv(rc: LoadCVRule, cell: Cell, min_tokens: float) -> dict[str, Any]:
    """WARN/FAIL when the load CV passes its limits."""
    if (why := skip_reason(cell, min_tokens)) is not None:
        return _skip("load_cv", "load_cv", cell, why)
    v = cell.get("cv") or 0.0
    status, thr = grade(v, rc.warn_above, rc.fail_above)
    bad = status is not Status.PASS
    busiest = cell.busiest(cell.top_k) if bad else []
    msg = f"{cell.where}: load CV (std/mean of expert load) {v:.2f} {'>' if bad else '≤'} {thr:g}"
    if bad:
        msg += f": uneven expert load (busiest {experts_text(busiest)})" if busiest else ": uneven expert load"
    return finding("load_cv", status, cell, "load_cv", v, thr, msg, expert=busiest or None)


def maxvio(rc: MaxVioRule, cell: Cell, min_tokens: float) -> dict[str, Any]:
    """WARN/FAIL when the busiest expert's load passes its limits relative to the mean."""
    if (why := skip_reason(cell, min_tokens)) is not None:
        return _skip("maxvio", "maxvio", cell, why)
    v = cell.get("maxvio") or 0.0
    status, thr = grade(v, rc.warn_above, rc.fail_above)
    busiest = cell.busiest(1)
    who = f"expert {busiest[0]}" if busiest else "the busiest expert"
    bad = status is not Status.PASS
    msg = f"{cell.where}: {who} carries {v + 1:.2f}× the mean load (MaxVio {v:.2f} {'>' if bad else '≤'} {thr:g})"
    return finding("maxvio", status, cell, "maxvio", v, thr, msg, expert=busiest if bad else None)


def collapse(rc: CollapseRule, cell: Cell, min_tokens: float) -> dict[str, Any]:
    """FAIL when the m = max(k, ⌊N/4⌋) busiest experts carry ≥ share; SKIP where m ≥ N (nothing to collapse onto)."""
    if (why := skip_reason(cell, min_tokens)) is not None:
        return _skip("collapse", "top_m_share", cell, why)
    n, share = cell.n_experts, rc.share
    m = int(cell.get("collapse_m") or max(cell.top_k, n // 4))
    if m >= n:
        # With k ≥ N every expert is among the "busiest m": the share is 1 by construction, not a collapse.
        return _skip("collapse", "top_m_share", cell, f"m = max(k, N/4) = {m} ≥ N = {n}: collapse is undefined")
    v = cell.get("top_m_share") or 0.0
    top = cell.busiest(m)
    if v >= share:
        msg = (f"{cell.where}: routing collapsed: the {m} busiest experts ({experts_text(top)}) carry {v:.1%} "
               f"of assignments (≥ {share:.0%}; m = max(k, N/4) = {m} of {n})")
        return finding("collapse", Status.FAIL, cell, "top_m_share", v, share, msg, expert=top)
    msg = f"{cell.where}: the {m} busiest experts carry {v:.1%} of assignments (< {share:.0%}, no collapse)"
    return finding("collapse", Status.PASS, cell, "top_m_share", v, share, msg)


register(RuleSpec("dead_expert", DeadExpertRule, "min_utilization", "window", dead_expert,
                  "an expert gets under fail_below of its fair share N·f_e (FAIL)", online=True))
register(RuleSpec("load_cv", LoadCVRule, "cv", "window", load_cv,
                  "load CV std(c)/mean(c) above warn_above (WARN) / fail_above (FAIL)", online=True))
register(RuleSpec("maxvio", MaxVioRule, "maxvio", "window", maxvio,
                  "MaxVio max(c)/mean(c) − 1 above warn_above (WARN) / fail_above (FAIL)", online=True))
register(RuleSpec("collapse", CollapseRule, "top_m_share", "window", collapse,
                  "the m = max(k, N/4) busiest experts carry ≥ share of assignments (FAIL)", online=True))

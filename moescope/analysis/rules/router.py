"""Router rules: non-finite router logits in a window, and router z-loss growth over a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import Cell, RuleConfig, RuleSpec, Status, finding, limit, register, window_label


@dataclass
class NonFiniteRule(RuleConfig):
    """FAIL when more than `fail_above` tokens had NaN/Inf router logits in a window."""

    fail_above: int = limit(0, 0, integer=True)


@dataclass
class ZLossRule(RuleConfig):
    """WARN when a window's router z-loss is more than `growth` times the run's first window."""

    growth: float = limit(10.0, 1, lo_open=True)


def nonfinite(rc: NonFiniteRule, cell: Cell, min_tokens: float) -> dict[str, Any]:
    """FAIL on more than fail_above tokens with NaN/Inf logits (judged on any amount of data)."""
    thr = rc.fail_above
    v = cell.get("nonfinite")
    if v is None or v != v:  # None or NaN: no router_stats, or logits not read (stats=False)
        return finding("nonfinite", Status.SKIP, cell, "nonfinite", None, thr,
                       f"{cell.where}: router logits not inspected in this window (no router_stats, or stats=False)")
    if v > thr:
        msg = f"{cell.where}: {int(v)} tokens had NaN/Inf router logits (of {int(cell.get('tokens') or 0)})"
        return finding("nonfinite", Status.FAIL, cell, "nonfinite", v, thr, msg)
    return finding("nonfinite", Status.PASS, cell, "nonfinite", v, thr, f"{cell.where}: no NaN/Inf router logits")


def z_loss(rc: ZLossRule, cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per window of one run × layer (in step order): WARN when z-loss grew past `growth`× its first nonzero window."""
    growth = rc.growth
    first = next((c for c in cells if (c.get("z_loss") or 0) > 0), None)
    out = []
    for cell in cells:
        z = cell.get("z_loss")
        if first is None or z is None:
            msg = f"{cell.where}: no router z-loss recorded (lse_sq_sum is empty or zero)"
            out.append(finding("z_loss", Status.SKIP, cell, "z_loss_growth", None, growth, msg))
            continue
        z0 = float(first.get("z_loss") or 0.0)
        ratio = z / z0
        label = window_label(first.window_start, first.window_end)
        if ratio > growth:
            msg = (f"{cell.where}: router z-loss grew {ratio:.1f}× since {label} ({z0:.3g} → {z:.3g}; > {growth:g}×): "
                   "router logits are growing")
            out.append(finding("z_loss", Status.WARN, cell, "z_loss_growth", ratio, growth, msg))
        else:
            msg = f"{cell.where}: router z-loss {z:.3g}, {ratio:.2f}× its value in {label} (≤ {growth:g}×)"
            out.append(finding("z_loss", Status.PASS, cell, "z_loss_growth", ratio, growth, msg))
    return out


# z_loss compares a window with the run's first one, so it needs the whole series: offline only.
register(RuleSpec("z_loss", ZLossRule, "z_loss", "series", z_loss,
                  "router z-loss grew more than growth× since the run's first window (WARN)"))
register(RuleSpec("nonfinite", NonFiniteRule, "nonfinite", "window", nonfinite,
                  "more than fail_above tokens with NaN/Inf router logits (FAIL)", online=True))

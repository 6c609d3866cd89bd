"""Health rules over a Trace: the collapse, imbalance, instability and clone findings of DESIGN.md.

`health(tr, run=None, config=None)` returns one row per rule × run × layer × step window with the
columns of `COLUMNS`. Statuses: PASS, WARN, FAIL, SKIP (not enough data to judge: expected assignments
per expert kT/N below `min_tokens`, or the table a rule reads is absent), ERROR (the rule itself failed).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..config import HealthConfig, load_config
from ..format.writer import TraceError
from . import metrics as M
from .selection import Selection, Window, window_label

if TYPE_CHECKING:  # pragma: no cover
    from .trace import Trace

#: The columns of a health DataFrame, in order (a contract `moescope check` and the dashboard read).
COLUMNS = [
    "rule", "status", "run", "layer", "expert", "window", "window_start", "window_end",
    "metric", "value", "threshold", "message",
]
#: Status severity, for sorting and for "the worst status" summaries.
SEVERITY = {"PASS": 0, "SKIP": 1, "WARN": 2, "FAIL": 3, "ERROR": 4}

_LOAD_RULES = ("dead_expert", "load_cv", "maxvio", "collapse")
_ROUTER_RULES = ("z_loss", "nonfinite")


def _f(x: Any) -> float | None:
    """A finite float or None (NaN/NULL from SQL)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _grade(value: float, warn_above: float, fail_above: float | None) -> tuple[str, float]:
    """(status, threshold crossed or checked) of a value against WARN and optional FAIL limits."""
    if fail_above is not None and value > fail_above:
        return "FAIL", fail_above
    if value > warn_above:
        return "WARN", warn_above
    return "PASS", warn_above


def _row(rule: str, status: str, cell: dict[str, Any], metric: str, value: Any, threshold: Any, message: str,
         expert: Any = None) -> dict[str, Any]:
    return {
        "rule": rule,
        "status": status,
        "run": cell.get("run"),
        "layer": None if cell.get("layer") is None else int(cell["layer"]),
        "expert": expert,
        "window": window_label(cell.get("window_start"), cell.get("window_end")),
        "window_start": None if cell.get("window_start") is None else int(cell["window_start"]),
        "window_end": None if cell.get("window_end") is None else int(cell["window_end"]),
        "metric": metric,
        "value": _f(value),
        "threshold": _f(threshold),
        "message": message,
    }


def _experts(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:8])
    return shown + (f" … (+{len(ids) - 8})" if len(ids) > 8 else "")


def _skip_reason(lm: dict[str, Any], min_tokens: int) -> str | None:
    exp = _f(lm.get("expected_per_expert"))
    if exp is None:
        return "no tokens in this window"
    if exp < min_tokens:
        return (f"too little data: {exp:.1f} expected assignments per expert (kT/N) < min_tokens {min_tokens}")
    return None


def _load_rules(cfg: HealthConfig, lm: pd.DataFrame, util: pd.DataFrame, names: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    groups = {k: g for k, g in util.groupby(["run", "layer", "window"], sort=False)} if len(util) else {}
    for cell in lm.to_dict("records"):
        if cell.get("assignments") is None or _f(cell.get("assignments")) is None:
            continue  # router_stats without expert_load: only router rules apply here
        skip = _skip_reason(cell, cfg.min_tokens)
        experts = groups.get((cell["run"], cell["layer"], cell["window"]))
        n, k = int(cell["n_experts"]), int(cell["top_k"])
        where = f"layer {cell['layer']}"
        for name in names:
            if skip is not None:
                metric = {"dead_expert": "utilization", "load_cv": "load_cv", "maxvio": "maxvio",
                          "collapse": "top_m_share"}[name]
                out.append(_row(name, "SKIP", cell, metric, None, None, f"{where}: {skip}"))
                continue
            if name == "dead_expert":
                thr = cfg.dead_expert.fail_below
                dead = [] if experts is None else sorted(int(e) for e in experts.loc[experts["utilization"] < thr, "expert"])
                v = cell["min_utilization"]
                if dead:
                    msg = (f"{where}: {len(dead)} of {n} experts get under {thr:g} of their fair share "
                           f"(N·f below {thr:g}; lowest {_f(v) or 0:.3f}): experts {_experts(dead)}")
                    out.append(_row(name, "FAIL", cell, "utilization", v, thr, msg, expert=dead))
                else:
                    msg = f"{where}: every expert gets at least {thr:g} of its fair share (lowest N·f {_f(v) or 0:.2f})"
                    out.append(_row(name, "PASS", cell, "utilization", v, thr, msg))
            elif name == "load_cv":
                r = cfg.load_cv
                v = _f(cell["cv"]) or 0.0
                status, thr = _grade(v, r.warn_above, r.fail_above)
                cmp = ">" if status != "PASS" else "≤"
                msg = f"{where}: load CV (std/mean of expert load) {v:.2f} {cmp} {thr:g}"
                out.append(_row(name, status, cell, "load_cv", v, thr, msg + (": uneven expert load" if status != "PASS" else "")))
            elif name == "maxvio":
                r = cfg.maxvio
                v = _f(cell["maxvio"]) or 0.0
                status, thr = _grade(v, r.warn_above, r.fail_above)
                busiest: list[int] = []
                if experts is not None and len(experts):
                    busiest = [int(experts.sort_values(["assignments", "expert"], ascending=[False, True])["expert"].iloc[0])]
                who = f"expert {busiest[0]}" if busiest else "the busiest expert"
                cmp = ">" if status != "PASS" else "≤"
                msg = f"{where}: {who} carries {v + 1:.2f}× the mean load (MaxVio {v:.2f} {cmp} {thr:g})"
                out.append(_row(name, status, cell, "maxvio", v, thr, msg, expert=busiest if status != "PASS" else None))
            elif name == "collapse":
                share = cfg.collapse.share
                m = int(cell["collapse_m"]) if _f(cell.get("collapse_m")) is not None else max(k, n // 4)
                v = _f(cell["top_m_share"]) or 0.0
                top: list[int] = []
                if experts is not None and len(experts):
                    top = [int(e) for e in experts.sort_values(["assignments", "expert"], ascending=[False, True])["expert"].iloc[:m]]
                if v >= share:
                    msg = (f"{where}: routing collapsed: the {m} busiest experts ({_experts(top)}) carry {v:.1%} "
                           f"of assignments (≥ {share:.0%}; m = max(k, N/4) = {m} of {n})")
                    out.append(_row(name, "FAIL", cell, "top_m_share", v, share, msg, expert=top))
                else:
                    msg = f"{where}: the {m} busiest experts carry {v:.1%} of assignments (< {share:.0%}, no collapse)"
                    out.append(_row(name, "PASS", cell, "top_m_share", v, share, msg))
    return out


def _router_rules(cfg: HealthConfig, lm: pd.DataFrame, names: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if "nonfinite" in names:
        thr = cfg.nonfinite.fail_above
        for cell in lm.to_dict("records"):
            where = f"layer {cell['layer']}"
            v = _f(cell.get("nonfinite"))
            if v is None:
                out.append(_row("nonfinite", "SKIP", cell, "nonfinite", None, thr, f"{where}: no router_stats in this window"))
            elif v > thr:
                msg = f"{where}: {int(v)} tokens had NaN/Inf router logits (of {int(_f(cell['tokens']) or 0)})"
                out.append(_row("nonfinite", "FAIL", cell, "nonfinite", v, thr, msg))
            else:
                out.append(_row("nonfinite", "PASS", cell, "nonfinite", v, thr, f"{where}: no NaN/Inf router logits"))
    if "z_loss" in names and len(lm):
        growth = cfg.z_loss.growth
        for _, g in lm.sort_values("window_start").groupby(["run", "layer"], sort=False):
            cells = g.to_dict("records")
            first = next((c for c in cells if (_f(c.get("z_loss")) or 0) > 0), None)
            for cell in cells:
                where = f"layer {cell['layer']}"
                z = _f(cell.get("z_loss"))
                if first is None or z is None:
                    msg = f"{where}: no router z-loss recorded (lse_sq_sum is empty or zero)"
                    out.append(_row("z_loss", "SKIP", cell, "z_loss_growth", None, growth, msg))
                    continue
                z0 = float(first["z_loss"])
                ratio = z / z0
                label = window_label(first["window_start"], first["window_end"])
                if ratio > growth:
                    msg = (f"{where}: router z-loss grew {ratio:.1f}× since {label} ({z0:.3g} → {z:.3g}; > {growth:g}×): "
                           "router logits are growing")
                    out.append(_row("z_loss", "WARN", cell, "z_loss_growth", ratio, growth, msg))
                else:
                    msg = f"{where}: router z-loss {z:.3g}, {ratio:.2f}× its value in {label} (≤ {growth:g}×)"
                    out.append(_row("z_loss", "PASS", cell, "z_loss_growth", ratio, growth, msg))
    return out


def _clone_rule(cfg: HealthConfig, tr: Trace, sel: Selection, runs: list[str]) -> list[dict[str, Any]]:
    r = cfg.clones
    df = M.clones(tr.cursor(), sel, r.metrics)
    out: list[dict[str, Any]] = []
    if df.empty:
        for run in runs:
            msg = f"run {run}: no expert_similarity snapshot ({' or '.join(r.metrics)}); run moescope.snapshot_experts"
            out.append(_row("clones", "SKIP", {"run": run}, "similarity", None, r.warn_above, msg))
        return out
    for (run, layer), g in df.groupby(["run", "layer"], sort=True):
        step = int(g["step"].iloc[0])
        cell = {"run": run, "layer": layer, "window_start": step, "window_end": step}
        best = g.sort_values("value", ascending=False).drop_duplicates(["expert_a", "expert_b"])
        hot = best[best["value"] > r.warn_above]
        top = best.iloc[0]
        if len(hot):
            pairs = [f"{int(a)}-{int(b)}" for a, b in zip(hot["expert_a"], hot["expert_b"])]
            msg = (f"layer {layer}: {len(pairs)} expert pair(s) look like clones at step {step} "
                   f"({top['metric']} up to {top['value']:.2f} > {r.warn_above:g}): {', '.join(pairs[:6])}"
                   + (" …" if len(pairs) > 6 else ""))
            out.append(_row("clones", "WARN", cell, str(top["metric"]), top["value"], r.warn_above, msg, expert=pairs))
        else:
            msg = f"layer {layer}: no expert pair above {r.warn_above:g} at step {step} (highest {top['metric']} {top['value']:.2f})"
            out.append(_row("clones", "PASS", cell, str(top["metric"]), top["value"], r.warn_above, msg))
    return out


def _error(rule: str, run: Any, e: Exception) -> dict[str, Any]:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return _row(rule, "ERROR", {"run": run}, rule, None, None, f"rule failed: {e.__class__.__name__}: {text}")


def health(tr: Trace, run: Any = None, config: HealthConfig | str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Evaluate every enabled health rule on `tr` (optionally one run or a list of runs); see COLUMNS."""
    cfg = config if isinstance(config, HealthConfig) else load_config(config)
    runs = [run] if isinstance(run, str) else (list(run) if run is not None else list(tr.runs))
    missing = [r for r in runs if r not in tr.runs]
    if missing:
        raise ValueError(f"no run {missing[0]!r} in this trace (runs: {', '.join(tr.runs)})")
    sel = Selection(run=runs)
    rows: list[dict[str, Any]] = []
    # Rules sharing a window share one pass over the load tables.
    by_window: dict[Any, list[str]] = {}
    for name in (*_LOAD_RULES, *_ROUTER_RULES):
        if cfg.rule(name).enabled:
            by_window.setdefault(_window_key(cfg.window_of(name)), []).append(name)
    for wkey, names in by_window.items():
        window: Window = wkey
        try:
            lm = M.load_metrics(tr.cursor(), sel, window)
            load_names = [n for n in names if n in _LOAD_RULES]
            util = M.utilization(tr.cursor(), sel, window) if {"dead_expert", "maxvio", "collapse"} & set(load_names) else pd.DataFrame()
            rows += _load_rules(cfg, lm, util, load_names)
            rows += _router_rules(cfg, lm, [n for n in names if n in _ROUTER_RULES])
        except TraceError:
            raise
        except Exception as e:  # one broken rule must not hide the others' findings
            rows += [_error(n, None, e) for n in names]
    for run_name in runs:
        if not any(r["run"] == run_name for r in rows):
            rows.append(_row("data", "SKIP", {"run": run_name}, "tokens", None, None,
                             f"run {run_name}: no expert_load or router_stats rows to judge"))
    if cfg.clones.enabled:
        try:
            rows += _clone_rule(cfg, tr, sel, runs)
        except TraceError:
            raise
        except Exception as e:
            rows.append(_error("clones", None, e))
    df = pd.DataFrame(rows, columns=COLUMNS)
    order = {name: i for i, name in enumerate((*_LOAD_RULES, *_ROUTER_RULES, "clones", "data"))}
    df["_o"] = df["rule"].map(order)
    df = df.sort_values(["run", "layer", "window_start", "_o"], na_position="first", kind="stable").drop(columns="_o")
    df = df.reset_index(drop=True)
    df["layer"] = df["layer"].astype("Int64")
    df["window_start"] = df["window_start"].astype("Int64")
    df["window_end"] = df["window_end"].astype("Int64")
    df["expert"] = df["expert"].astype(object).where(df["expert"].notna(), None)
    return df


def _window_key(w: Window) -> Window:
    return None if w in (None, "thirds") else w


def worst_status(df: pd.DataFrame) -> str:
    """The most severe status among findings (PASS for none)."""
    if df.empty:
        return "PASS"
    return max(df["status"], key=lambda s: SEVERITY.get(s, 0))

"""Health findings of a trace: every registered rule (`moescope.analysis.rules`) over the selected runs.

`health(con, sel, config)` is a pure function of a connection holding the trace views (DuckDB, or the
`SparkConnection` of `moescope.analysis.spark`: the same SQL, translated), a Selection and a config; `Trace.health()` resolves the run names and calls it. One row per rule × run × layer × step
window with the columns of `COLUMNS`. Statuses: PASS, WARN, FAIL, SKIP (not enough data to judge: expected
assignments per expert kT/N below `min_tokens`, or the table a rule reads is absent), ERROR (the rule
itself failed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from ..config import HealthConfig, as_config
from ..format.writer import TraceError
from . import metrics as M
from .engine import _has_table
from .rules import COLUMNS, REGISTRY, STATUS_ORDER, Cell, Status, finding, rules, worst
from .selection import Selection, Window

__all__ = ["COLUMNS", "STATUS_ORDER", "cells", "health", "worst_status"]


def _window_key(w: Window) -> Window:
    return None if w in (None, "thirds") else w


def cells(lm: pd.DataFrame, util: pd.DataFrame) -> list[Cell]:
    """One `Cell` per load_metrics row, with its per-expert assignments and utilization [N] from `util`."""
    # Group boundaries over numpy columns (one pandas group object per cell costs ~1 ms: minutes for 1,000 runs).
    groups: dict[tuple[Any, Any, Any], tuple[int, int]] = {}
    if len(util):
        u = util.sort_values(["run", "layer", "window"], kind="stable")
        keys = list(zip(u["run"], u["layer"], u["window"], strict=True))
        e_all = u["expert"].astype(int).to_numpy()
        a_all = u["assignments"].astype(float).to_numpy()
        z_all = u["utilization"].astype(float).to_numpy()
        start = 0
        for i in range(1, len(keys) + 1):
            if i == len(keys) or keys[i] != keys[start]:
                groups[keys[start]] = (start, i)
                start = i
    out = []
    for row in lm.to_dict("records"):
        n, k = int(row["n_experts"]), int(row["top_k"])
        span = groups.get((row["run"], row["layer"], row["window"]))
        assign = utilz = None
        if span is not None:
            ids = e_all[span[0] : span[1]]
            size = max(n, int(ids.max()) + 1)
            assign, utilz = np.zeros(size), np.full(size, np.nan)
            assign[ids] = a_all[span[0] : span[1]]
            utilz[ids] = z_all[span[0] : span[1]]
        out.append(Cell(row["run"], int(row["layer"]), row.get("window_start"), row.get("window_end"), n, k, row,
                        assign, utilz))
    return out


def _error(rule: str, run: Any, e: Exception) -> dict[str, Any]:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return finding(rule, Status.ERROR, {"run": run}, rule, None, None, f"rule failed: {e.__class__.__name__}: {text}")


def _runs(con: duckdb.DuckDBPyConnection, sel: Selection) -> list[str]:
    if sel.run is not None:
        return [sel.run] if isinstance(sel.run, str) else [str(r) for r in sel.run]
    return [str(r[0]) for r in con.execute("SELECT DISTINCT run FROM runs ORDER BY run").fetchall()]


def health(
    con: duckdb.DuckDBPyConnection,
    sel: Selection | None = None,
    config: HealthConfig | str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Evaluate every enabled rule of the registry on the rows `sel` picks from `con`; see COLUMNS."""
    cfg = as_config(config)
    sel = sel or Selection()
    runs = _runs(con, sel)
    rows: list[dict[str, Any]] = []
    # Rules sharing a window share one pass over the load tables.
    by_window: dict[Any, list[str]] = {}
    for spec in (*rules("window"), *rules("series")):
        if cfg.rule(spec.name).enabled:
            by_window.setdefault(_window_key(cfg.window_of(spec.name)), []).append(spec.name)
    for window, names in by_window.items():
        try:
            lm = M.load_metrics(con, sel, window)
            util = M.utilization(con, sel, window)
            cs = cells(lm, util)
            rows += _evaluate(cfg, cs, names)
        except TraceError:
            raise
        except Exception as e:  # one broken window must not hide the other rules' findings
            rows += [_error(n, None, e) for n in names]
    judged = {r["run"] for r in rows}  # a set: a scan of every finding per run grows with runs²
    for run_name in runs:
        if run_name not in judged:
            rows.append(finding("data", Status.SKIP, {"run": run_name}, "tokens", None, None,
                                f"run {run_name}: no expert_load or router_stats rows to judge"))
    rows += recording_losses(con, runs)
    rows += integrity(con, runs)
    for spec in rules("snapshot"):
        rc = cfg.rule(spec.name)
        if not rc.enabled:
            continue
        try:
            rows += spec.evaluate(rc, M.clones(con, sel, rc.metrics), runs)
        except TraceError:
            raise
        except Exception as e:
            rows.append(_error(spec.name, None, e))
    for spec in rules("table"):
        rc = cfg.rule(spec.name)
        if not rc.enabled:
            continue
        try:
            rows += spec.evaluate(rc, getattr(M, spec.metric)(con, sel), runs)
        except TraceError:
            raise
        except Exception as e:
            rows.append(_error(spec.name, None, e))
    return _frame(rows)


def recording_losses(con: duckdb.DuckDBPyConnection, runs: Sequence[str]) -> list[dict[str, Any]]:
    """One ERROR finding per run × rank whose manifest counts steps that never reached the disk.

    Failed writes and dropped flushes (`on_full="drop"`) lose steps the data cannot show (a gap looks like a
    shorter run), so the manifest's counters are the only witness: one query over the `runs` table.
    """
    if not runs:
        return []
    got = con.execute("SELECT run, rank, counters FROM runs WHERE list_contains(?, run) ORDER BY run, rank",
                      [list(runs)]).fetchall()
    out = []
    for run, rank, text in got:
        c = json.loads(text or "{}")
        errors, dropped = list(c.get("write_errors") or []), int(c.get("dropped_flushes") or 0)
        lost = [r for r in c.get("lost_steps") or [] if isinstance(r, list) and len(r) == 2]
        if not (errors or dropped or lost):
            continue
        n = sum(int(b) - int(a) + 1 for a, b in lost)
        steps = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in lost) or "unknown (an older writer)"
        why = [f"{len(errors)} write(s) failed" + (f" (first: {errors[0]})" if errors else "")] if errors else []
        why += [f"{dropped} flush(es) dropped: writer queue full (on_full='drop')"] if dropped else []
        rank_txt = f" rank {rank}" if rank else ""
        out.append(finding("recording", Status.ERROR, {"run": run}, "lost_steps", n if lost else None, 0,
                           f"run {run}{rank_txt}: {n or 'some'} step(s) not recorded: steps {steps}; "
                           + "; ".join(why)))
    return out


#: Router-stat sums a run recording statistics always writes as numbers: the hot path adds nothing for a
#: non-finite token (it counts it in `nonfinite`), so a NaN or NULL here is damage, not a router event.
_STAT_SUMS = ("entropy_sum", "lse_sq_sum", "lse_sum", "margin_sum")
#: The key of one row per table: the recorder writes each (rank, step, tag, layer[, expert]) once.
_ROW_KEYS = {"expert_load": "rank, step, tag, layer, expert", "router_stats": "rank, step, tag, layer"}


def _steps(lo: Any, hi: Any) -> str:
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def integrity(con: duckdb.DuckDBPyConnection, runs: Sequence[str]) -> list[dict[str, Any]]:
    """ERROR findings for rows a trace's footers cannot show: one key written twice, NaN or NULL router stats.

    A key in two parts doubles its counts (a part's rows copied into another, a step recorded twice); a NaN in
    one step's `lse_sq_sum` would silently leave that step out of the z-loss mean (layers whose spec reads no
    logits, manifest `logits: false`, have NULL logit statistics by design). One grouped query per table.
    """
    if not runs:
        return []
    out: list[dict[str, Any]] = []
    for table, key in _ROW_KEYS.items():
        if not _has_table(con, table):
            continue
        got = con.execute(
            f"SELECT run, count(*), min(step), max(step) FROM (SELECT run, {key} FROM {table} "
            f"WHERE list_contains(?, run) GROUP BY run, {key} HAVING count(*) > 1) GROUP BY run ORDER BY run",
            [list(runs)]).fetchall()
        for run, n, lo, hi in got:
            out.append(finding("data", Status.ERROR, {"run": run}, f"duplicated_{table}_rows", int(n), 0,
                               f"run {run}: {n} ({key}) key(s) of {table} appear in more than one row "
                               f"(steps {_steps(lo, hi)}): counts would be doubled; the trace holds copied rows "
                               "or a step recorded twice"))
    if _has_table(con, "router_stats"):
        # manifest_layers: `logits` false (no logits read: every logit statistic NULL by design) and `lse` false
        # (probabilities read in place of logits: the lse columns NULL by design) exempt those columns
        join, logits_ok, lse_ok = ("LEFT JOIN manifest_layers m ON m.run = s.run AND m.layer = s.layer",
                                   "coalesce(m.logits, true)", "coalesce(m.lse, true)") \
            if _has_table(con, "manifest_layers") else ("", "true", "true")
        bad = " OR ".join([f"{c} IS NULL OR isnan({c})" for c in _STAT_SUMS if not c.startswith("lse")]
                          + ["nonfinite IS NULL"]
                          + [f"({lse_ok} AND ({c} IS NULL OR isnan({c})))" for c in _STAT_SUMS if c.startswith("lse")])
        got = con.execute(
            f"SELECT s.run, count(*), min(s.step), max(s.step) FROM router_stats s JOIN runs r USING (run) {join} "
            f"WHERE list_contains(?, s.run) AND coalesce(json_extract(r.capture, '$.stats')::VARCHAR, 'true') "
            f"<> 'false' AND {logits_ok} AND ({bad}) GROUP BY s.run ORDER BY s.run", [list(runs)]).fetchall()
        for run, n, lo, hi in got:
            out.append(finding("data", Status.ERROR, {"run": run}, "nan_router_stats", int(n), 0,
                               f"run {run}: {n} router_stats row(s) with NaN or NULL sums (steps {_steps(lo, hi)}) "
                               "in a run that recorded router statistics: the z-loss, entropy and non-finite "
                               "rules would judge fewer steps than were recorded"))
    return out


def _evaluate(cfg: HealthConfig, cs: Sequence[Cell], names: Sequence[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in names:
        spec, rc = REGISTRY[name], cfg.rule(name)
        if spec.scope == "window":
            out += [spec.evaluate(rc, c, cfg.min_tokens) for c in cs]
        else:  # series: the windows of one run × layer in step order
            series: dict[tuple[str, int], list[Cell]] = {}
            for c in sorted(cs, key=lambda c: (c.window_start is None, c.window_start or 0)):
                series.setdefault((c.run, c.layer), []).append(c)
            for group in series.values():
                out += spec.evaluate(rc, group)
    return out


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    order = {name: i for i, name in enumerate(("recording", *REGISTRY, "data"))}
    df["_o"] = df["rule"].map(order)
    df = df.sort_values(["run", "layer", "window_start", "_o"], na_position="first", kind="stable").drop(columns="_o")
    df = df.reset_index(drop=True)
    for col in ("layer", "window_start", "window_end"):
        df[col] = df[col].astype("Int64")
    df["expert"] = df["expert"].astype(object).where(df["expert"].notna(), None)
    return df


def worst_status(df: pd.DataFrame) -> str:
    """The most severe status among findings (PASS for none), by the one `Status` order."""
    return worst(df["status"]) if not df.empty else Status.PASS.value

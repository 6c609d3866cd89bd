"""Drift: compare the expert load of a baseline selection (run, tag, steps) with a current one, per layer."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import data as D
from moescope.dashboard import figures as F
from moescope.dashboard.data import ALL_TAGS, UNTAGGED, describe_side, drift_side

dash.register_page(__name__, path="/drift", name="Drift", title="moescope · Drift", order=4)


def _side_controls(prefix: str, name: str, side: dict[str, Any], data: Any) -> list[Any]:
    """One row of the comparison: run, tag and step window of a side."""
    run = side["run"]
    tags = data.tags(run)
    lo, hi = data.step_ranges().get(run, (0, 0))
    return [
        html.Div(name, className=f"ms-side-name {'base' if prefix == 'b_' else 'cur'}"),
        C.choice(f"{prefix}run", "Run", data.run_names(), run),
        C.choice(f"{prefix}tag", "Tag", [ALL_TAGS, *[t or UNTAGGED for t in tags]],
                 ALL_TAGS if side.get("tag") is None else (side["tag"] or UNTAGGED),
                 labels=["all tags", *[t or "untagged" for t in tags]]),
        C.steps_slider(f"{prefix}steps", "Steps", lo, hi, side.get("steps")),
    ]


def _table(drift: pd.DataFrame) -> Any:
    cols = [c for c in ("layer", "status", "js", "threshold", "tv", "psi", "chi2", "n_baseline", "n_current", "unit",
                        "message") if c in drift]
    return C.table(drift, "drift-table", columns=cols, page_size=12)


def unknown_sides(query: dict[str, Any], runs: list[str], tags: dict[str, list[str]],
                  side_runs: dict[str, str | None]) -> list[str]:
    """One line per URL key naming a run or tag the trace does not have (a typo must not compare nothing).

    side_runs: prefix -> the run that side reads (the URL's, else the page's default)."""
    problems = []
    for prefix, name in (("b_", "baseline"), ("c_", "current")):
        run = query.get(f"{prefix}run")
        if run and run not in runs:
            problems.append(f"The {name} run {run!r} is not in this trace (runs: {', '.join(runs)}).")
            continue
        tag = query.get(f"{prefix}tag")
        side_run = side_runs.get(prefix)
        if tag and tag not in (ALL_TAGS, UNTAGGED) and tag not in tags.get(side_run or "", []):
            names = ", ".join(t or "untagged" for t in tags.get(side_run or "", [])) or "none"
            problems.append(f"The {name} tag {tag!r} is not in run {side_run} (tags: {names}).")
    return problems


def layout(**query: Any) -> html.Div:
    """The drift page (extra URL keys: b_run, b_tag, b_steps, c_run, c_tag, c_steps)."""
    data, state = C.page_state(query, prefer="tags")
    runs, ranges = data.run_names(), data.step_ranges()
    d_base, d_cur = data.default_drift()
    base = drift_side(query, "b_", d_base, runs, ranges)
    cur = drift_side(query, "c_", d_cur, runs, ranges)
    head = C.header("Drift", "Does routing differ between two slices (English vs code, train vs eval, early vs late)? "
                    "Jensen–Shannon distance per layer against a bootstrap threshold fitted on the baseline.")
    if state.layer is None:
        return html.Div([head, C.message("This trace has no MoE layers to show.", "warn")])
    problems = unknown_sides(query, runs, {r: data.tags(r) for r in runs}, {"b_": base["run"], "c_": cur["run"]})
    if problems:
        # compare nothing rather than an empty slice: an empty side would read as "no drift"
        return html.Div([head, *[C.message(p + " Pick one below.", "error") for p in problems],
                         html.Div([*_side_controls("b_", "Baseline", base, data), C.layer_control(state, data),
                                   *_side_controls("c_", "Current", cur, data)], className="ms-selbar ms-drift-ctl")])
    tv_min = float(data.config.drift.tv_min)  # the drift rule's setting (moescope.toml), as check uses it
    key = (D.sel_key(base), D.sel_key(cur))
    return html.Div(
        [
            head,
            *([C.message(state.notice, "warn", id="ms-notice")] if state.notice else []),
            html.Div(
                [
                    *_side_controls("b_", "Baseline", base, data),
                    C.layer_control(state, data),
                    *_side_controls("c_", "Current", cur, data),
                ],
                className="ms-selbar ms-drift-ctl",
            ),
            C.message(f"Baseline: {describe_side(base)}   →   current: {describe_side(cur)}", "info"),
            C.card(C.guard("drift", lambda: C.figure(data, "drift-bars", key, lambda: F.drift_bars(
                data.drift(base, cur), tv_min)))),
            C.card(C.guard("expert deltas", lambda: C.figure(data, "drift-deltas", (*key, state.layer), lambda: (
                F.expert_deltas(data.expert_shares(base), data.expert_shares(cur), state.layer))))),
            C.card(C.guard("drift table", lambda: _table(data.drift(base, cur))), title="Per layer"),
        ]
    )

"""Overview: the runs in the trace, the worst health status per run × layer, and the findings."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F

dash.register_page(__name__, path="/", name="Overview", title="moescope · Overview", order=0)


def _runs_table(runs: pd.DataFrame) -> Any:
    df = runs.copy()
    df["steps"] = [
        f"{int(a)}–{int(b)} ({int(n)})" if pd.notna(a) else "" for a, b, n in zip(df["first_step"], df["last_step"],
                                                                                      df["steps"])
    ]
    df["routing"] = ["counts only" if n == 0 else f"{int(n):,} token rows" for n in df["routing_rows"]]
    df["tokens"] = [f"{int(t):,}" if pd.notna(t) else "" for t in df["tokens"]]
    df = df.rename(columns={"top_k": "top-k", "routing": "token level"})
    cols = ["run", "model", "layers", "experts", "top-k", "steps", "tokens", "tags", "token level", "snapshots"]
    return C.table(df, "ov-runs", columns=[c for c in cols if c in df], page_size=10)


def _findings_table(findings: pd.DataFrame) -> Any:
    if findings.empty:
        return C.message("No WARN or FAIL findings: every rule passed (or was skipped for too little data).", "info")
    df = findings.copy()
    df["layer"] = df["layer"].map(lambda v: "" if pd.isna(v) else int(v))
    cols = ["status", "run", "layer", "window", "rule", "expert", "metric", "value", "threshold", "message"]
    return C.table(df, "ov-findings", columns=cols, page_size=12)


def _stats(data: Any) -> Any:
    runs = data.runs()
    health = data.health()
    counts = health["status"].value_counts() if not health.empty else pd.Series(dtype=int)

    def stat(label: str, value: Any, status: str = "") -> html.Div:
        style = {"borderTopColor": F.status_color(status)} if status else {}
        return html.Div([html.Div(str(value), className="ms-stat-value"), html.Div(label, className="ms-stat-label")],
                        className="ms-stat", style=style)

    return html.Div(
        [
            stat("runs", len(runs)),
            stat("MoE layers", int(runs["layers"].fillna(0).sum())),
            stat("steps recorded", int(runs["steps"].fillna(0).sum())),
            stat("FAIL findings", int(counts.get("FAIL", 0) + counts.get("ERROR", 0)), "FAIL"),
            stat("WARN findings", int(counts.get("WARN", 0)), "WARN"),
            stat("PASS findings", int(counts.get("PASS", 0)), "PASS"),
        ],
        className="ms-stats",
    )


def layout(**query: Any) -> html.Div:
    """The overview page for the URL's query parameters."""
    data, _state = C.page_state(query)
    return html.Div(
        [
            C.header("Overview", f"{len(data.run_names())} run(s) in {data.root.resolve()}"),
            C.guard("summary", lambda: _stats(data)),
            C.card(C.guard("runs", lambda: _runs_table(data.runs())), title="Runs"),
            C.card(
                C.guard("health grid", lambda: C.figure(data, "ov-health-grid", (), lambda: F.health_grid(
                    data.health_grid(), data.run_names()))),
                html.P("Worst status of the health rules per run and layer. Click a cell to open its findings over "
                       "steps.", className="ms-note"),
                title="Health",
            ),
            C.card(C.guard("findings", lambda: _findings_table(data.findings())), title="Findings (WARN and worse)"),
            C.guard("alerts", lambda: _alerts_card(data.alerts())),
        ]
    )


def _alerts_card(alerts: pd.DataFrame) -> Any:
    """The online alerts kept in the trace (raised while recording), newest first; nothing when there are none."""
    if alerts.empty:
        return None
    cols = ["step", "run", "layer", "status", "rule", "value", "threshold", "message"]
    return C.card(C.table(alerts, "ov-alerts", columns=cols, page_size=10),
                  title=f"Alerts raised while recording ({len(alerts)})")


@dash.callback(
    dash.Output("_pages_location", "pathname"),
    dash.Output("_pages_location", "search", allow_duplicate=True),
    dash.Input("ov-health-grid", "clickData"),
    prevent_initial_call=True,
)
def _open_cell(click: dict[str, Any] | None) -> Any:
    """A click on a run × layer cell opens the Collapse page for that run and layer."""
    from moescope.dashboard.state import ViewState, to_query

    if not click or not click.get("points"):
        return dash.no_update, dash.no_update
    pt = click["points"][0]
    try:
        layer = int(str(pt["x"]).lstrip("L"))
    except (KeyError, ValueError):
        return dash.no_update, dash.no_update
    return "/collapse", to_query(ViewState(run=str(pt["y"]), layer=layer))

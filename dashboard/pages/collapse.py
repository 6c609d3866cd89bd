"""Collapse: the health findings of a run on a step timeline per layer, and the metrics the rules read.

Threshold lines come from the rules' settings (`data.config`: moescope.toml or the registry's defaults), so
a line sits exactly where its rule fires.
"""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
import plotly.graph_objects as go
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F

dash.register_page(__name__, path="/collapse", name="Collapse", title="moescope · Collapse", order=2)


def _findings_table(findings: pd.DataFrame, layer: int) -> Any:
    df = findings[(findings["layer"] == layer) & (findings["status"] != "PASS")].copy()
    if df.empty:
        return C.message(f"Layer {layer}: no WARN or FAIL findings.", "info")
    cols = ["status", "rule", "window", "expert", "metric", "value", "threshold", "message"]
    return C.table(df, "col-findings", columns=cols, page_size=10)


def _mark_alerts(fig: Any, alerts: pd.DataFrame) -> Any:
    """Online alerts kept in the trace as markers on the findings timeline (at the step of the flush that raised
    them, on their layer's row)."""
    if alerts.empty:
        return fig
    fig.add_trace(go.Scatter(
        x=alerts["step"].astype(int), y=[f"L{int(v)}" for v in alerts["layer"]], mode="markers", name="online alert",
        marker={"symbol": "x-thin", "size": 13, "line": {"width": 3, "color": F.status_color("FAIL")}},
        hovertext=[f"{r.status} {r.rule} at step {int(r.step)}: {r.message}" for r in alerts.itertuples()],
        hovertemplate="%{hovertext}<extra></extra>",
    ))
    return fig


def thresholds(config: Any) -> dict[str, dict[str, Any]]:
    """Keyword arguments of each curve's threshold lines, read off the rules' settings (none for a disabled rule)."""
    def on(name: str) -> Any:
        rc = config.rule(name)
        return rc if rc.enabled else None

    out: dict[str, dict[str, Any]] = {"min_utilization": {}, "top_m_share": {}, "maxvio": {}, "router_entropy": {}}
    if (r := on("dead_expert")) is not None:
        out["min_utilization"] = {"threshold": r.fail_below, "threshold_label": f"dead expert < {r.fail_below:g}"}
    if (r := on("collapse")) is not None:
        out["top_m_share"] = {"threshold": r.share, "threshold_label": f"collapse ≥ {r.share:g}"}
    if (r := on("maxvio")) is not None:
        out["maxvio"] = {"threshold": r.warn_above, "threshold_label": f"WARN > {r.warn_above:g}"}
        if r.fail_above is not None:
            out["maxvio"].update(threshold2=r.fail_above, threshold2_label=f"FAIL > {r.fail_above:g}")
    if (r := on("overconfidence")) is not None:
        out["router_entropy"] = {"threshold": r.warn_below, "threshold_label": f"WARN: over-confident < {r.warn_below:g}"}
    return out


def layout(**query: Any) -> html.Div:
    """The collapse page for the URL's query parameters."""
    data, state = C.page_state(query)
    if state.run is None or state.layer is None:
        return html.Div([C.header("Collapse"), C.message("This trace has no MoE layers to show.", "warn")])
    run, layer, steps = state.run, state.layer, state.steps

    def lm() -> pd.DataFrame:
        return data.load_metrics(run, steps)

    key = (run, layer, steps)
    lines = thresholds(data.config)

    def curve(gid: str, column: str, title: str, ytitle: str, **kw: Any) -> Any:
        return C.figure(data, gid, key, lambda: F.metric_curves(lm(), column, title, ytitle, layer, **kw))

    return html.Div(
        [
            C.header("Collapse", "When and where the health rules fire: dead experts, collapse onto a few experts, "
                     "load imbalance, router logit growth."),
            C.selection_bar(state, data),
            C.card(C.guard("timeline", lambda: C.figure(data, "col-timeline", (run, layer), lambda: (
                _mark_alerts(F.findings_timeline(data.health(run), data.layers(run), run, layer), data.alerts(run)))))),
            C.row(
                C.card(C.guard("min utilization", lambda: curve(
                    "col-minutil", "min_utilization", "Least-used expert: min N·f", "min N·f", **lines["min_utilization"]))),
                C.card(C.guard("top-m share", lambda: curve(
                    "col-topm", "top_m_share", "Share of the m busiest experts", "share (m = max(k, N/4))",
                    **lines["top_m_share"]))),
            ),
            C.row(
                C.card(C.guard("maxvio", lambda: curve(
                    "col-maxvio", "maxvio", "MaxVio: max / mean load − 1", "MaxVio", **lines["maxvio"]))),
                C.card(C.guard("router entropy", lambda: curve(
                    "col-entropy", "router_entropy", "Router entropy H(p)/ln N", "entropy", **lines["router_entropy"]))),
            ),
            C.card(C.guard("findings", lambda: _findings_table(data.health(run), layer)),
                   title=f"Findings in layer {layer}"),
        ]
    )

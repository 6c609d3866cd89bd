"""Systems: what the recorded routing costs a deployment -- capacity drops, expert-parallel balance, cache hits."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
import plotly.graph_objects as go
from dash import html

from moescope import whatif
from moescope.dashboard import components as C
from moescope.dashboard import figures as F
from moescope.dashboard.state import as_int

dash.register_page(__name__, path="/systems", name="Systems", title="moescope · Systems", order=7)

#: Capacity factors the drop-rate curve is drawn at.
FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
#: Expert-parallel group sizes offered.
DEVICES = (2, 4, 8, 16, 32, 64)
POLICY_STYLE = {
    "lru": ("LRU", "#4269d0", "solid"),
    "lfu": ("LFU", "#efb118", "solid"),
    "belady": ("Belady (optimal bound)", "#3ca951", "dot"),
}


# -- data (cached per selection; the DashboardData lock keeps one query at a time on its connection) ------------


def _cached(data: Any, key: tuple[Any, ...], compute: Any) -> Any:
    return data.cached(key, compute)  # the dashboard's LRU plus its connection lock


def capacity_data(data: Any, run: str, steps: tuple[int, int] | None) -> pd.DataFrame:
    """Drop rates at FACTORS for every layer of `run` over the step window."""
    return _cached(
        data,
        ("whatif-capacity", run, steps),
        lambda: whatif.capacity_drops(data.trace, run=run, factors=FACTORS, steps=steps),
    )


def placement_data(data: Any, run: str, devices: int) -> pd.DataFrame:
    """Held-out balancedness per layer: round-robin, greedy LPT, LPT with one spare replica per device."""

    def compute() -> pd.DataFrame:
        plain = whatif.suggest_placement(data.trace, devices=devices, run=run).report
        rep = whatif.suggest_placement(data.trace, devices=devices, run=run, replicas=devices).report
        if plain.empty:
            return pd.DataFrame()
        out = plain[["layer", "eval_start", "eval_end", "balancedness_before", "balancedness_after"]].rename(
            columns={"balancedness_before": "round-robin", "balancedness_after": "LPT"}
        )
        out[f"LPT + {devices} replicas"] = rep["balancedness_after"].to_numpy()
        return out

    return _cached(data, ("whatif-placement", run, devices), compute)


def cache_data(data: Any, run: str, layer: int, steps: tuple[int, int] | None) -> pd.DataFrame:
    """Hit rates of one layer for cache sizes 1..N (empty when the run has no token-level routing)."""

    def compute() -> pd.DataFrame:
        try:
            return whatif.cache_hit_rates(data.trace, run=run, layer=layer, steps=steps)
        except ValueError:  # count-only run: the figure says so
            return pd.DataFrame(columns=whatif.CACHE_COLUMNS)

    return _cached(data, ("whatif-cache", run, layer, steps), compute)


# -- figures (DataFrames in, plotly out) ---------------------------------------------------------------------


def _fig(title: str, xtitle: str, ytitle: str, height: int = 340) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=F.TEMPLATE, title_text=title, height=height)
    fig.update_xaxes(title_text=xtitle)
    fig.update_yaxes(title_text=ytitle)
    return fig


def capacity_figure(cap: pd.DataFrame, layer: int) -> go.Figure:
    """Drop rate vs capacity factor: the selected layer strong, the others faint, the model's own rate dotted."""
    title = "Token drops vs capacity factor"
    if cap.empty or cap["drop_rate"].notna().sum() == 0:
        note = cap["note"].dropna().iloc[0] if len(cap) and cap["note"].notna().any() else "no routing in this window"
        return F.empty_figure(title, note)
    fig = _fig(title, "capacity factor", "dropped assignments")
    for lay in sorted(int(x) for x in cap["layer"].unique()):
        g = cap[cap["layer"] == lay].sort_values("capacity_factor")
        strong = lay == layer
        fig.add_trace(
            go.Scatter(
                x=g["capacity_factor"], y=g["drop_rate"], mode="lines+markers" if strong else "lines",
                name=f"layer {lay}", showlegend=False,
                line={"color": "#1f4e9e" if strong else "#c3cad6", "width": 2.4 if strong else 1.2},
                hovertemplate=f"layer {lay}<br>cf %{{x}}<br>dropped %{{y:.1%}}<extra></extra>",
            )
        )
    fig.data = tuple(sorted(fig.data, key=lambda t: t.name == f"layer {layer}"))
    sel = cap[cap["layer"] == layer]
    reported = sel["reported_drop_rate"].dropna()
    if len(reported):
        fig.add_hline(y=float(reported.iloc[0]), line={"color": F.status_color("WARN"), "dash": "dot", "width": 1},
                      annotation_text="model-reported", annotation_position="top right")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    src = "" if sel.empty else str(sel["source"].iloc[0])
    text = f"<b>layer {layer}</b> · others in grey" + (" · lower bound from counts" if src == "counts" else "")
    fig.add_annotation(text=text, x=1, y=1.0, xref="paper", yref="paper", xanchor="right", yanchor="bottom",
                       showarrow=False, font={"size": 11, "color": F.MUTED})
    return fig


def balance_figure(cmp: pd.DataFrame, devices: int, layer: int) -> go.Figure:
    """Balancedness (mean/max device load) per layer for three placements, judged on the held-out window."""
    title = f"Expert-parallel balance on {devices} devices (held-out steps)"
    if cmp.empty:
        return F.empty_figure(title, "not enough steps to fit on one window and judge on a later one")
    a, b = int(cmp["eval_start"].iloc[0]), int(cmp["eval_end"].iloc[0])
    fig = _fig(f"{title}: steps {a}–{b}", "layer", "balancedness = mean / max device load")
    names = [c for c in cmp.columns if c not in ("layer", "eval_start", "eval_end")]
    for name, color in zip(names, ("#9498a0", "#4269d0", "#3ca951")):
        fig.add_trace(
            go.Bar(
                x=[f"layer {int(x)}" for x in cmp["layer"]], y=cmp[name], name=name, marker_color=color,
                marker_line={"width": [2 if int(x) == layer else 0 for x in cmp["layer"]], "color": F.INK},
                hovertemplate=f"{name}<br>%{{x}}<br>balancedness %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(barmode="group", legend={"orientation": "h", "y": -0.2})
    fig.update_yaxes(range=[0, 1.05])
    return fig


def cache_figure(hits: pd.DataFrame, layer: int) -> go.Figure:
    """Hit rate vs cache size (experts kept on the device) for LRU, LFU and the Belady bound."""
    title = f"Expert cache hit rate, layer {layer}"
    if hits.empty:
        return F.empty_figure(title, "needs token-level routing (record with tokens > 0)")
    fig = _fig(title, "cache size (experts on device)", "hit rate")
    for policy, g in hits.groupby("policy"):
        label, color, dash_ = POLICY_STYLE.get(str(policy), (str(policy), F.INK, "solid"))
        g = g.sort_values("cache_size")
        fig.add_trace(
            go.Scatter(
                x=g["cache_size"], y=g["hit_rate"], mode="lines+markers", name=label,
                line={"color": color, "dash": dash_, "width": 2},
                hovertemplate=f"{label}<br>%{{x}} experts<br>hit rate %{{y:.1%}}<extra></extra>",
            )
        )
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    fig.update_layout(legend={"orientation": "h", "y": -0.2})
    return fig


# -- page -----------------------------------------------------------------------------------------------------


def layout(**query: Any) -> html.Div:
    """The systems page (extra URL key: devices)."""
    data, state = C.page_state(query)
    return C.guard("systems", lambda: _page(data, state, query))


def _page(data: Any, state: Any, query: dict[str, Any]) -> html.Div:
    head = C.header(
        "Systems",
        "What the recorded routing would cost a deployment: tokens dropped at a capacity factor, device "
        "balance of an expert-parallel placement, and hit rates of an expert cache for offloading.",
    )
    if state.run is None or state.layer is None:
        return html.Div([head, C.message("This trace has no MoE layers to show.", "warn")])
    run, layer, steps = state.run, state.layer, state.steps
    devices = as_int(query.get("devices"))
    devices = devices if devices in DEVICES else 8
    dev_ctl = C.choice("devices", "EP devices", list(DEVICES), devices, labels=[f"{d} devices" for d in DEVICES],
                       width="140px")
    key = (run, layer, steps)
    return html.Div(
        [
            head,
            C.selection_bar(state, data, extra=[dev_ctl]),
            C.row(
                C.card(C.guard("capacity", lambda: C.figure(
                    data, "sys-capacity", key, lambda: capacity_figure(capacity_data(data, run, steps), layer)))),
                C.card(C.guard("cache", lambda: C.figure(
                    data, "sys-cache", key, lambda: cache_figure(cache_data(data, run, layer, steps), layer)))),
            ),
            C.card(C.guard("placement", lambda: C.figure(
                data, "sys-balance", (run, layer, devices), lambda: balance_figure(
                    placement_data(data, run, devices), devices, layer)))),
            C.message(
                "Capacity = ceil(cf·k·T/N) per expert per forward pass, second choices dropped first. Placement: "
                "fitted on the first half of the run's steps (greedy LPT; replicas split a hot expert's load as in "
                "DeepSeek's EPLB), judged on the second half, step window ignored. Cache: one cache per layer, "
                "a token's experts requested together. CLI: moescope whatif TRACE capacity|placement|cache.",
                "info",
            ),
        ]
    )

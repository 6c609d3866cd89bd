"""Layout pieces every page uses: the selection bar, graphs, cards, tables and message boxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from dash import dash_table, dcc, html

from .data import DashboardData
from .figures import FONT, STATUS_COLORS
from .state import ViewState

#: Pattern-matching id type of the selection bar's controls (app.py turns their values into the URL).
SEL = "ms-sel"

GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": "hover", "responsive": True,
                "toImageButtonOptions": {"scale": 2}}


def header(title: str, subtitle: str = "") -> html.Div:
    """A page's title and one line saying what the page shows."""
    return html.Div(
        [html.H2(title, className="ms-title"), html.P(subtitle, className="ms-subtitle") if subtitle else None],
        className="ms-header",
    )


def run_control(state: ViewState, data: DashboardData) -> html.Div:
    """The run dropdown of the selection bar."""
    runs = data.run_names()
    return html.Div(
        [
            html.Label("Run"),
            dcc.Dropdown(
                id={"type": SEL, "key": "run"}, options=[{"label": r, "value": r} for r in runs],
                value=state.run, clearable=False, searchable=len(runs) > 8, className="ms-dd",
            ),
        ],
        className="ms-ctl ms-ctl-run",
    )


def layer_control(state: ViewState, data: DashboardData) -> html.Div:
    """The layer dropdown of the selection bar (labels say N experts × top-k)."""
    layers = data.layers(state.run)
    li = data.layer_info()
    info = {int(r.layer): r for r in li[li["run"] == state.run].itertuples()}

    def label(x: int) -> str:
        r = info.get(x)
        if r is None or pd.isna(r.n_experts) or pd.isna(r.top_k):
            return f"layer {x}"
        return f"layer {x} · {int(r.n_experts)}×top-{int(r.top_k)}"

    return html.Div(
        [
            html.Label("Layer"),
            dcc.Dropdown(
                id={"type": SEL, "key": "layer"}, options=[{"label": label(x), "value": x} for x in layers],
                value=state.layer, clearable=False, searchable=len(layers) > 12, className="ms-dd",
            ),
        ],
        className="ms-ctl ms-ctl-layer",
    )


def selection_bar(
    state: ViewState, data: DashboardData, *, run: bool = True, layer: bool = True, steps: bool = True,
    extra: Sequence[Any] = (),
) -> html.Div:
    """Run, layer and step-window controls (plus a page's own), initialised from the URL; a change rewrites it."""
    items: list[Any] = []
    if run:
        items.append(run_control(state, data))
    if layer:
        items.append(layer_control(state, data))
    if steps:
        lo, hi = data.step_ranges().get(state.run or "", (0, 0))
        items.append(steps_slider("steps", "Steps", lo, hi, state.steps))
    if extra:
        items += [html.Div(className="ms-sep"), *extra]
    bar = html.Div(items, className="ms-selbar")
    if state.notice:
        return html.Div([bar, message(state.notice, "warn", id="ms-notice")])
    return bar


def graph(fig: go.Figure | dict[str, Any], id: str | dict[str, Any] | None = None, className: str = "",
          uirevision: str | None = None) -> dcc.Graph:
    """A plotly graph with the dashboard's toolbar settings.

    `uirevision` (default: the id) keeps the user's zoom and legend choices when a live refresh redraws it.
    """
    rev = uirevision if uirevision is not None else (str(id) if id is not None else None)
    if rev is not None:
        if isinstance(fig, go.Figure):
            fig = go.Figure(fig).update_layout(uirevision=rev)
        else:  # a cached plotly JSON dict: a shallow copy, the cached one stays as it was
            fig = {**fig, "layout": {**(fig.get("layout") or {}), "uirevision": rev}}
    kw: dict[str, Any] = {"figure": fig, "config": GRAPH_CONFIG, "className": f"ms-graph {className}".strip()}
    if id is not None:
        kw["id"] = id
    return dcc.Graph(**kw)


def figure(data: DashboardData, id: str, key: tuple[Any, ...], build: Any, className: str = "") -> dcc.Graph:
    """A graph whose figure is built once per (id, key) and cached: a warm page skips plotly's validation."""
    fig = data.cache.get(("figure", id, data.trace.data_version, *key), lambda: build().to_plotly_json())
    return graph(fig, id=id, className=className, uirevision=repr((id, *key)))


def card(*children: Any, title: str | None = None, className: str = "") -> html.Div:
    """A white panel holding a chart or a table."""
    body = [html.H3(title, className="ms-card-title")] if title else []
    return html.Div([*body, *children], className=f"ms-card {className}".strip())


def row(*children: Any) -> html.Div:
    """Panels side by side (two columns at 1280 px, stacked on narrow screens)."""
    return html.Div(list(children), className="ms-row")


def message(text: str, kind: str = "info", id: str | None = None) -> html.Div:
    """A one-line message box: info, warn or error."""
    kw: dict[str, Any] = {"className": f"ms-msg ms-msg-{kind}"}
    if id is not None:
        kw["id"] = id
    return html.Div(text, **kw)


def status_badge(status: str) -> html.Span:
    """A coloured PASS/WARN/FAIL/SKIP/ERROR badge."""
    return html.Span(status, className="ms-badge", style={"backgroundColor": STATUS_COLORS.get(status, "#999")})


def _cell(v: Any, brackets: bool = True) -> Any:
    """A value a DataTable can show (lists and arrays as text, NaN as blank)."""
    if isinstance(v, (list, tuple)) or hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        try:
            v = v.tolist() if hasattr(v, "tolist") else list(v)
        except Exception:  # noqa: BLE001 - odd objects just print
            return str(v)
        if isinstance(v, list):
            text = ", ".join(str(x) for x in v)
            return f"[{text}]" if brackets else text
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, (int, float, str)) or v is None:
        return v
    return str(v)


def table(
    df: pd.DataFrame, id: str, *, page_size: int = 12, columns: Sequence[str] | None = None, status_col: str = "status",
    numbers: int = 4, brackets: bool = False,
) -> dash_table.DataTable:
    """A sortable, filterable table of a DataFrame, status cells coloured (lists shown comma-separated)."""
    cols = list(columns) if columns is not None else list(df.columns)
    view = df[cols] if len(df) else pd.DataFrame(columns=cols)
    records = [{str(c): _cell(v, brackets) for c, v in zip(cols, rec)} for rec in view.itertuples(index=False, name=None)]
    spec = []
    for c in cols:
        numeric = len(view) and pd.api.types.is_numeric_dtype(view[c]) and not pd.api.types.is_bool_dtype(view[c])
        col: dict[str, Any] = {"name": str(c), "id": str(c)}
        if numeric and pd.api.types.is_float_dtype(view[c]):
            big = float(view[c].abs().max()) >= 1000 if view[c].notna().any() else False
            # Counts stored as floats read best as grouped integers; small statistics keep 4 significant digits.
            col.update(type="numeric", format={"specifier": ",.0f" if big else f".{numbers}~g"})
        elif numeric:
            col.update(type="numeric", format={"specifier": ","})
        spec.append(col)
    cond = [
        {"if": {"filter_query": f'{{{status_col}}} = "{s}"', "column_id": status_col},
         "backgroundColor": color, "color": "white", "fontWeight": "600"}
        for s, color in STATUS_COLORS.items() if s
    ] if status_col in cols else []
    return dash_table.DataTable(
        id=id, data=records, columns=spec, page_size=page_size, sort_action="native", filter_action="native",
        style_table={"overflowX": "auto"}, style_cell={"fontFamily": FONT, "fontSize": "13px", "padding": "6px 10px",
                                                       "textAlign": "left", "maxWidth": "520px", "whiteSpace": "normal",
                                                       "height": "auto"},
        style_header={"backgroundColor": "#f3f5f9", "fontWeight": "600", "borderBottom": "1px solid #d5dae3"},
        style_data={"borderBottom": "1px solid #eef0f4"}, style_data_conditional=cond,
        style_as_list_view=True,
    )


#: What a page opens on when its URL names no run: "health" (the worst run, and its worst layer), "snapshots"
#: (a run with expert snapshots), "tags" (a run with two data-slice tags), "routing" (a run with token-level rows).
Prefer = str


def preferred_runs(data: DashboardData, prefer: Prefer = "health") -> tuple[list[str], dict[str, int]]:
    """Runs in the order a page wants to open them, and each run's worst layer (most FAIL, then WARN findings).

    Every ranking ends with the health order (worst status, then most FAIL and WARN findings), so among runs
    that have snapshots or tags the worst one opens first; a trace whose health cannot be computed keeps the
    discovery order.
    """
    from .data import STATUS_ORDER

    runs = data.run_names()
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    try:
        grid = data.health_grid()
    except Exception:  # noqa: BLE001 - a default is a convenience; the pages report broken health themselves
        grid = pd.DataFrame(columns=["run", "layer", "status", "warn", "fail"])
    # Whole-frame operations, not one pandas group per run (seconds on a root of 1,000 runs).
    g = grid.assign(_r=grid["status"].map(rank).fillna(-1))
    agg = g.groupby("run", sort=False).agg(r=("_r", "max"), fail=("fail", "sum"), warn=("warn", "sum"))
    score: dict[str, tuple[int, int, int]] = {
        str(run): (int(r), int(f), int(w)) for run, r, f, w in zip(agg.index, agg["r"], agg["fail"], agg["warn"],
                                                                  strict=True)}
    tops = g.sort_values(["run", "_r", "fail", "warn", "layer"], ascending=[True, False, False, False, True],
                         kind="stable").drop_duplicates("run")
    worst_layer: dict[str, int] = {str(run): int(layer) for run, layer in zip(tops["run"], tops["layer"], strict=True)}

    def has(run: str) -> bool:
        if prefer == "snapshots":  # the runs table counts snapshots of every run in one query
            runs_df = data.runs()
            rows = runs_df.loc[runs_df["run"] == run, "snapshots"]
            return bool(len(rows) and rows.iloc[0] > 0)
        if prefer == "tags":
            return len([t for t in data.tags(run) if t]) >= 2
        if prefer == "routing":
            runs_df = data.runs()
            rows = runs_df.loc[runs_df["run"] == run, "routing_rows"]
            return bool(len(rows) and rows.iloc[0] > 0)
        return True

    order = {r: i for i, r in enumerate(runs)}
    ranked = sorted(runs, key=lambda r: (not has(r), tuple(-x for x in score.get(r, (-1, 0, 0))), order[r]))
    return ranked, worst_layer


def page_state(query: dict[str, Any], prefer: Prefer = "health") -> tuple[DashboardData, ViewState]:
    """The app's data and the URL's selection made valid for the trace (what every page layout starts with).

    A URL without a run opens the run the page most wants to show (`prefer`, see preferred_runs); a URL naming a
    run, layer or step window the trace does not have opens the default instead and says so (`state.notice`,
    shown by the selection bar), never an empty or all-green page that looks like an answer.
    """
    from .data import current
    from .state import explain, from_query, resolve

    data = current()
    asked = from_query(query)
    runs, layers, ranges = data.context()
    ranked, worst_layer = preferred_runs(data, prefer)
    state = resolve(asked, runs, layers, ranges, prefer=ranked, prefer_layer=worst_layer)
    notice = explain(asked, state, runs, layers, ranges)
    return data, state.with_(notice=notice) if notice else state


def guard(title: str, build: Any) -> Any:
    """Build one panel; a failure shows as a message in its place instead of breaking the page."""
    import logging

    try:
        return build()
    except Exception as e:  # noqa: BLE001 - one broken panel must not take the page down
        logging.getLogger("moescope.dashboard").exception("panel %r failed", title)
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        return message(f"{title}: {first}", "error")


def choice(key: str, label: str, options: Sequence[Any], value: Any, *, labels: Sequence[str] | None = None,
           width: str = "") -> html.Div:
    """A page-specific dropdown that, like the selection bar, writes `key=value` into the URL."""
    opts = [{"label": (labels[i] if labels else str(o)), "value": o} for i, o in enumerate(options)]
    return html.Div(
        [html.Label(label), dcc.Dropdown(id={"type": SEL, "key": key}, options=opts, value=value, clearable=False,
                                         searchable=len(opts) > 10, className="ms-dd")],
        className="ms-ctl", style={"minWidth": width} if width else {},
    )


def steps_slider(key: str, label: str, lo: int, hi: int, value: Sequence[int] | None) -> html.Div:
    """A page-specific step-window slider that writes `key=lo-hi` into the URL."""
    v = list(value) if value else [lo, hi]
    return html.Div(
        [
            html.Label([f"{label} ", html.Span(f"{v[0]}–{v[1]}", className="ms-steps-value")]),
            dcc.RangeSlider(id={"type": SEL, "key": key}, min=lo, max=hi, value=v, step=1, marks=None,
                            allowCross=False, updatemode="mouseup", tooltip={"placement": "bottom"}),
        ],
        className="ms-ctl ms-ctl-steps",
    )

"""Flight: the flight recorder's dumps (record(..., flight_steps=N)) and what `moescope explain` reads in them."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F

dash.register_page(__name__, path="/flight", name="Flight", title="moescope · Flight", order=8)

NO_DUMPS = ("No flight dumps in this trace. Record with moescope.record(model, path, flight_steps=N): the last N "
            "steps' router evidence is kept on the device and written to RUN/flight/ when an alert fires "
            "(non-finite logits, collapse, dead expert) or when you call rec.dump_flight().")


def dump_key(run: Any, name: Any) -> str:
    """The URL value naming a dump: 'RUN/NAME' (dump names hold no '/')."""
    return f"{run}/{name}"


def _findings(data: Any, run: str, name: str) -> Any:
    """The dump's heading and its findings, problems first, each with its numbers."""
    head, df = data.flight_findings(run, name)
    items = []
    for f in df.itertuples():
        problem = f.severity == "problem"
        badge = html.Span(f.severity, className="ms-badge",
                          style={"backgroundColor": F.status_color("FAIL" if problem else "SKIP")})
        items.append(html.Li([badge, " ", html.Span(f.text, className="ms-finding-text"),
                              html.Div(f.numbers, className="ms-note ms-finding-numbers") if f.numbers else None],
                             className=f"ms-finding ms-finding-{f.severity}"))
    n = int((df["severity"] == "problem").sum()) if len(df) else 0
    summary = f"{n} problem(s), {len(df) - n} note(s)" if len(df) else "nothing to report"
    return html.Div([html.P([html.B(head), f" · {summary}"], id="fl-head"),
                     html.Ul(items, id="fl-findings", className="ms-findings")])


def _dumps_table(dumps: pd.DataFrame) -> Any:
    df = dumps.copy()
    df["step"] = df["step"].map(lambda v: "" if pd.isna(v) else int(v))
    return C.table(df, "fl-dumps", columns=["run", "step", "reason", "alerts", "layers", "name", "error"],
                   page_size=8, status_col="")


def layout(**query: Any) -> html.Div:
    """The flight page (extra URL key: dump as 'RUN/NAME')."""
    data, state = C.page_state(query)
    return C.guard("flight", lambda: _page(data, state, query))


def _page(data: Any, state: Any, query: dict[str, Any]) -> html.Div:
    head = C.header("Flight", "What the flight recorder kept when something went wrong, and what it says "
                    "(the same findings as `moescope explain`).")
    dumps = data.flight_dumps()
    if dumps.empty:
        return html.Div([head, C.message(NO_DUMPS, "info", id="fl-none")])
    ok = dumps[dumps["error"] == ""]
    keys = [dump_key(r, n) for r, n in zip(ok["run"], ok["name"])]
    labels = [f"{r} · step {int(s)} · {why}" for r, s, why in zip(ok["run"], ok["step"], ok["reason"])]
    key = query.get("dump")
    if key not in keys:  # the selected run's newest dump, else the trace's newest
        mine = [k for k, r in zip(keys, ok["run"]) if r == state.run]
        key = (mine or keys or [None])[-1]
    parts: list[Any] = [head]
    if key is not None:
        parts.append(html.Div([C.choice("dump", "Flight dump", keys, key, labels=labels, width="420px")],
                              className="ms-selbar"))
    parts.append(C.card(C.guard("dumps", lambda: _dumps_table(dumps)), title=f"Dumps in this trace ({len(dumps)})"))
    if key is not None:
        run, name = key.rsplit("/", 1)
        parts.append(C.card(C.guard("findings", lambda: _findings(data, run, name)),
                            title="What went wrong (problems first, with their numbers)"))
    else:
        parts.append(C.message("No readable flight dump: see the error column above.", "error"))
    return html.Div(parts)

"""SQL: a console over the trace's views, in locked mode (moescope.analysis.console: read-only at any depth,
no file access, a cursor of its own per query, row, byte, memory and time limits)."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html

from moescope.dashboard import components as C
from moescope.dashboard.data import SQL_MAX_BYTES, current

dash.register_page(__name__, path="/sql", name="SQL", title="moescope · SQL", order=6)

EXAMPLES = {
    "Load per expert": "SELECT layer, expert, SUM(tokens) AS assignments\nFROM expert_load\n{where}"
    "GROUP BY layer, expert\nORDER BY layer, expert",
    "z-loss per step": "SELECT step, layer, SUM(lse_sq_sum) / SUM(tokens) AS z_loss\nFROM router_stats\n{where}"
    "GROUP BY step, layer\nORDER BY step, layer",
    "Top experts per token id": "SELECT token_id, expert, COUNT(*) AS n\nFROM assignments\n{where}"
    "GROUP BY token_id, expert\nORDER BY n DESC\nLIMIT 50",
}


def _example(name: str, run: str | None) -> str:
    where = f"WHERE run = '{run}'\n" if run and "'" not in run else ""
    return EXAMPLES[name].format(where=where)


def _schema(views: dict[str, list[tuple[str, str]]]) -> Any:
    return html.Div(
        [html.Details([html.Summary(name), html.Ul([html.Li([html.Code(c), f" {t}"]) for c, t in cols])],
                      open=name in ("expert_load", "router_stats")) for name, cols in views.items()],
        className="ms-schema",
    )


def layout(**query: Any) -> html.Div:
    """The SQL console."""
    data, state = C.page_state(query)
    first = next(iter(EXAMPLES))
    return html.Div(
        [
            C.header("SQL", "Query the trace's views with DuckDB SQL. Read-only: one SELECT at a time over the "
                     f"views below (no file access, no settings), at most {data.sql_limits[0]:,} rows, "
                     f"{SQL_MAX_BYTES >> 20} MB and {data.sql_limits[1]:g} s per query."),
            html.Div(
                [
                    html.Div(
                        [
                            C.card(
                                dcc.Textarea(id="sql-query", value=_example(first, state.run), className="ms-sql",
                                             spellCheck=False),
                                html.Div(
                                    [html.Button("Run", id="sql-run", n_clicks=0, className="ms-btn ms-btn-primary")]
                                    + [html.Button(name, id={"type": "sql-ex", "name": name}, n_clicks=0,
                                                   className="ms-btn") for name in EXAMPLES],
                                    className="ms-btnrow",
                                ),
                            ),
                            dcc.Loading(html.Div(
                                [C.message("Press Run to execute the query.", "info", id="sql-msg"),
                                 html.Div(id="sql-result")]
                            ), type="dot", delay_show=300),
                        ],
                        className="ms-sql-main",
                    ),
                    C.card(C.guard("schema", lambda: _schema(data.views())), title="Views",
                           className="ms-sql-side"),
                ],
                className="ms-sql-layout",
            ),
            dcc.Store(id="sql-run-name", data=state.run),
        ]
    )


@dash.callback(
    Output("sql-msg", "children"),
    Output("sql-msg", "className"),
    Output("sql-result", "children"),
    Input("sql-run", "n_clicks"),
    State("sql-query", "value"),
    prevent_initial_call=True,
)
def _run(n_clicks: int, query: str | None) -> tuple[str, str, Any]:
    """Run the query in locked mode; refusals and errors come back as the message line."""
    res = current().run_sql(query or "")
    if not res.ok:
        return res.message, "ms-msg ms-msg-error", None
    kind = "warn" if res.truncated else "ok"
    return res.message, f"ms-msg ms-msg-{kind}", C.table(res.frame, "sql-table", page_size=15, status_col="status")


@dash.callback(
    Output("sql-query", "value"),
    Input({"type": "sql-ex", "name": dash.ALL}, "n_clicks"),
    State("sql-run-name", "data"),
    prevent_initial_call=True,
)
def _fill(clicks: list[int], run: str | None) -> Any:
    """An example button puts its query into the editor."""
    trig = dash.ctx.triggered_id
    if not trig or not any(clicks):
        return dash.no_update
    return _example(trig["name"], run)

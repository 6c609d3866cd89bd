"""Systems: what the recorded routing costs a deployment -- capacity drops, expert-parallel balance, cache hits.

Data from `DashboardData.whatif_*` (moescope/dashboard/data.py), figures from `figures.*_figure`, like every page."""

from __future__ import annotations

from typing import Any

import dash
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F
from moescope.dashboard.state import as_int

dash.register_page(__name__, path="/systems", name="Systems", title="moescope · Systems", order=7)

#: Expert-parallel group sizes offered.
DEVICES = (2, 4, 8, 16, 32, 64)


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
                    data, "sys-capacity", key, lambda: F.capacity_figure(data.whatif_capacity(run, steps), layer)))),
                C.card(C.guard("cache", lambda: C.figure(
                    data, "sys-cache", key, lambda: F.cache_figure(data.whatif_cache(run, layer, steps), layer)))),
            ),
            C.card(C.guard("placement", lambda: C.figure(
                data, "sys-balance", (run, layer, devices), lambda: F.balance_figure(
                    data.whatif_placement(run, devices), devices, layer)))),
            C.message(
                "Capacity = ceil(cf·k·T/N) per expert per forward pass, second choices dropped first. Placement: "
                "fitted on the first half of the run's steps (greedy LPT; replicas split a hot expert's load as in "
                "DeepSeek's EPLB), judged on the second half, step window ignored. Cache: one cache per layer, "
                "a token's experts requested together. CLI: moescope whatif TRACE capacity|placement|cache.",
                "info",
            ),
        ]
    )

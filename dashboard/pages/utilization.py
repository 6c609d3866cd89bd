"""Utilization: per-expert load of one layer over steps, every layer's aux loss and z-loss, layer × expert load."""

from __future__ import annotations

from typing import Any

import dash
from dash import html
from moescope_dashboard import components as C
from moescope_dashboard import figures as F

dash.register_page(__name__, path="/utilization", name="Utilization", title="moescope · Utilization", order=1)


def layout(**query: Any) -> html.Div:
    """The utilization page for the URL's query parameters."""
    data, state = C.page_state(query)
    if state.run is None or state.layer is None:
        return html.Div([C.header("Utilization"), C.message("This trace has no MoE layers to show.", "warn")])
    run, layer, steps = state.run, state.layer, state.steps
    return html.Div(
        [
            C.header("Utilization", "Share of assignments each expert receives, as N·f (1 = fair share), "
                     "and the router losses over steps."),
            C.selection_bar(state, data),
            C.card(C.guard("utilization heatmap", lambda: C.graph(
                F.utilization_heatmap(data.utilization(run, steps), layer), id="util-heatmap"))),
            C.card(C.guard("load lines", lambda: C.graph(
                F.load_lines(data.utilization(run, steps), layer), id="util-lines"))),
            C.row(
                C.card(C.guard("aux loss", lambda: C.graph(F.metric_curves(
                    data.load_metrics(run, steps), "aux_loss", "Switch aux loss N·Σ f·P (1 = uniform)", "aux loss",
                    layer, threshold=1.0, threshold_label="uniform"), id="util-aux"))),
                C.card(C.guard("z-loss", lambda: C.graph(F.metric_curves(
                    data.load_metrics(run, steps), "z_loss", "Router z-loss: mean logsumexp(logits)²", "z-loss",
                    layer), id="util-z"))),
            ),
            C.card(C.guard("layer heatmap", lambda: C.graph(
                F.layer_expert_heatmap(data.layer_utilization(run, steps), layer), id="util-layers"))),
        ]
    )

"""Utilization: per-expert load of one layer over steps, every layer's aux loss and z-loss, layer × expert load."""

from __future__ import annotations

from typing import Any

import dash
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F

dash.register_page(__name__, path="/utilization", name="Utilization", title="moescope · Utilization", order=1)


def _dead_below(data: Any) -> float | None:
    """The dead_expert rule's limit from the dashboard's config (None when the rule is off)."""
    rc = data.config.rule("dead_expert")
    return rc.fail_below if rc.enabled else None


def _precision_card(data: Any, run: str, layer: int, steps: Any) -> Any:
    """The float32 flip rate per layer (record(..., precision_check=True)); nothing when the run has no rows."""
    prec = data.precision(run, steps)
    if prec.empty:
        return None
    rc = data.config.rule("precision")
    warn = rc.warn_above if rc.enabled else None
    return C.card(C.guard("precision", lambda: C.figure(
        data, "util-precision", (run, layer, steps, warn), lambda: F.precision_bars(prec, layer, warn))))


def layout(**query: Any) -> html.Div:
    """The utilization page for the URL's query parameters."""
    data, state = C.page_state(query)
    if state.run is None or state.layer is None:
        return html.Div([C.header("Utilization"), C.message("This trace has no MoE layers to show.", "warn")])
    run, layer, steps = state.run, state.layer, state.steps
    key = (run, layer, steps)

    def util() -> Any:
        return data.utilization(run, steps)

    def lm() -> Any:
        return data.load_metrics(run, steps)

    return html.Div(
        [
            C.header("Utilization", "Share of assignments each expert receives, as N·f (1 = fair share), "
                     "and the router losses over steps."),
            C.selection_bar(state, data),
            C.card(C.guard("utilization heatmap", lambda: C.figure(
                data, "util-heatmap", key, lambda: F.utilization_heatmap(util(), layer)))),
            C.card(C.guard("load lines", lambda: C.figure(
                data, "util-lines", key, lambda: F.load_lines(util(), layer, dead_below=_dead_below(data))))),
            C.row(
                C.card(C.guard("aux loss", lambda: C.figure(data, "util-aux", key, lambda: F.metric_curves(
                    lm(), "aux_loss", "Switch aux loss N·Σ f·P (1 = uniform)", "aux loss", layer, threshold=1.0,
                    threshold_label="uniform")))),
                C.card(C.guard("z-loss", lambda: C.figure(data, "util-z", key, lambda: F.metric_curves(
                    lm(), "z_loss", "Router z-loss: mean logsumexp(logits)²", "z-loss", layer)))),
            ),
            C.card(C.guard("layer heatmap", lambda: C.figure(
                data, "util-layers", key, lambda: F.layer_expert_heatmap(data.layer_utilization(run, steps), layer)))),
            C.guard("precision", lambda: _precision_card(data, run, layer, steps)),
        ]
    )

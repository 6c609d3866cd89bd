"""Similarity: expert × expert similarity per layer and checkpoint (clones show as bright off-diagonal cells),
and the singular spectra of the experts' weights."""

from __future__ import annotations

from typing import Any

import dash
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F
from moescope.dashboard.state import as_int

dash.register_page(__name__, path="/similarity", name="Similarity", title="moescope · Similarity", order=3)

#: How the metrics of snapshot_experts read on screen.
METRIC_NAMES = {"subspace_overlap": "subspace overlap", "subspace_overlap_centered": "subspace overlap (centered)",
                "cka": "linear CKA"}


def layout(**query: Any) -> html.Div:
    """The similarity page for the URL's query parameters (extra keys: ckpt, matrix)."""
    data, state = C.page_state(query)
    head = C.header("Similarity", "How alike the experts are. Upcycled experts start as clones; pairs above 0.8 "
                    "are outlined.")
    if state.run is None or state.layer is None:
        return html.Div([head, C.message("This trace has no MoE layers to show.", "warn")])
    run, layer = state.run, state.layer
    steps = data.snapshot_steps(run)
    if not steps:
        runs = data.runs()
        others = [r for r, n in zip(runs["run"], runs["snapshots"]) if n > 0]
        hint = f" Runs with snapshots: {', '.join(others)}." if others else ""
        return html.Div([head, C.selection_bar(state, data, steps=False), C.message(
            f"Run {run!r} has no expert snapshots. Write them with moescope.snapshot_experts(model, path, step=...)."
            + hint, "info")])
    ckpt = as_int(query.get("ckpt"))
    ckpt = ckpt if ckpt in steps else steps[-1]
    sim = data.similarity(run)
    sim = sim[(sim["layer"] == layer) & (sim["step"] == ckpt)]
    metrics = sorted(sim["metric"].unique(), key=lambda m: (m not in METRIC_NAMES, m))
    spectra = data.spectra(run, layer, ckpt)
    matrices = sorted(spectra["matrix"].unique()) if not spectra.empty else []
    matrix = query.get("matrix") if query.get("matrix") in matrices else (matrices[0] if matrices else None)
    bar = C.selection_bar(state, data, steps=False, extra=[
        C.choice("ckpt", "Checkpoint", steps, ckpt, labels=[f"step {s}" for s in steps], width="150px"),
        *([C.choice("matrix", "Spectra matrix", matrices, matrix, width="150px")] if matrices else []),
    ])
    heatmaps = [
        C.card(C.guard(m, lambda m=m: C.figure(
            data, f"sim-{m.replace('_', '-')}", (run, layer, ckpt), lambda: F.similarity_heatmap(
                sim[sim["metric"] == m], f"Layer {layer}, step {ckpt}: {METRIC_NAMES.get(m, m)}"))))
        for m in metrics
    ] or [C.message(f"No similarity rows for layer {layer} at step {ckpt}.", "info")]
    pairs = [heatmaps[i : i + 2] for i in range(0, len(heatmaps), 2)]
    return html.Div(
        [
            head,
            bar,
            *[C.row(*p) for p in pairs],
            C.card(C.guard("spectra", lambda: C.figure(data, "sim-spectra", (run, layer, ckpt, matrix), lambda: (
                F.spectra_lines(spectra, matrix or "", f"Layer {layer}, step {ckpt}: singular values of {matrix}"))))),
        ]
    )

"""Similarity: expert × expert similarity per layer, the first snapshot beside a later one (clones show as
outlined off-diagonal cells), clone pairs counted per snapshot, and the singular spectra of the experts' weights."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F
from moescope.dashboard.state import as_int

dash.register_page(__name__, path="/similarity", name="Similarity", title="moescope · Similarity", order=3)

#: How the metrics of snapshot_experts read on screen.
METRIC_NAMES = {"subspace_overlap": "subspace overlap", "subspace_overlap_centered": "subspace overlap (centered)",
                "cka": "linear CKA"}


def clone_rule() -> tuple[float, list[str]]:
    """(threshold, metrics) of the clones health rule: the one definition of what counts as a clone."""
    from moescope.config import ClonesRule

    rule = ClonesRule()
    return float(rule.warn_above), list(rule.metrics)


def clones_per_snapshot(sim: pd.DataFrame, threshold: float, metrics: list[str]) -> pd.DataFrame:
    """Per snapshot step × layer: expert pairs whose similarity (largest over `metrics`) exceeds `threshold`.

    The clones rule judges the latest snapshot only; this shows every snapshot, so an upcycled run reads as
    clones at the start that diverge (or do not) later.
    """
    cols = ["step", "layer", "pairs", "clone_pairs", "highest", "metric", "status", "examples"]
    df = sim[(sim["expert_a"] != sim["expert_b"]) & sim["metric"].isin(metrics)] if not sim.empty else sim
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.assign(a=df[["expert_a", "expert_b"]].min(axis=1), b=df[["expert_a", "expert_b"]].max(axis=1))
    best = df.sort_values("value", ascending=False).drop_duplicates(["step", "layer", "a", "b"])
    rows = []
    for (step, layer), g in best.groupby(["step", "layer"], sort=True):
        hot = g[g["value"] > threshold]
        top = g.iloc[0]
        rows.append({
            "step": int(step), "layer": int(layer), "pairs": len(g), "clone_pairs": len(hot),
            "highest": float(top["value"]), "metric": str(top["metric"]),
            "status": "WARN" if len(hot) else "PASS",
            "examples": ", ".join(f"{int(a)}-{int(b)}" for a, b in zip(hot["a"], hot["b"]))[:120],
        })
    return pd.DataFrame(rows, columns=cols)


def _heatmap(data: Any, sim: pd.DataFrame, run: str, layer: int, step: int, metric: str, side: str,
             threshold: float) -> Any:
    part = sim[(sim["layer"] == layer) & (sim["step"] == step) & (sim["metric"] == metric)]
    # the outlined cells of this metric (the table below counts the rule's view: any of its metrics)
    n = int(clones_per_snapshot(part, threshold, [metric])["clone_pairs"].sum())
    title = f"Step {step}: {METRIC_NAMES.get(metric, metric)} · {n} pair{'s' if n != 1 else ''} above {threshold:g}"
    return C.card(C.guard(f"{side} snapshot", lambda: C.figure(
        data, f"sim-{side}", (run, layer, step, metric), lambda: F.similarity_heatmap(part, title, threshold))))


def layout(**query: Any) -> html.Div:
    """The similarity page for the URL's query parameters (extra keys: ckpt, metric, matrix)."""
    data, state = C.page_state(query, prefer="snapshots")
    head = C.header("Similarity", "How alike the experts are. Upcycled experts start as clones; pairs above the "
                    "clones rule's threshold are outlined, at the first snapshot and at a later one.")
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
    sim_all = data.similarity(run)
    threshold, rule_metrics = clone_rule()
    # the clones rule's own metrics first, in its order: the default view is the one the rule reads first
    metrics = sorted(sim_all["metric"].unique(), key=lambda m: (
        rule_metrics.index(m) if m in rule_metrics else len(rule_metrics), m not in METRIC_NAMES, m))
    metric = query.get("metric") if query.get("metric") in metrics else (metrics[0] if metrics else None)
    spectra = data.spectra(run, layer, ckpt)
    matrices = sorted(spectra["matrix"].unique()) if not spectra.empty else []
    matrix = query.get("matrix") if query.get("matrix") in matrices else (matrices[0] if matrices else None)
    bar = C.selection_bar(state, data, steps=False, extra=[
        C.choice("ckpt", "Compare with", steps, ckpt, labels=[f"step {s}" for s in steps], width="150px"),
        *([C.choice("metric", "Metric", metrics, metric, labels=[METRIC_NAMES.get(m, m) for m in metrics],
                    width="220px")] if metrics else []),
        *([C.choice("matrix", "Spectra matrix", matrices, matrix, width="150px")] if matrices else []),
    ])
    counts = clones_per_snapshot(sim_all, threshold, rule_metrics)
    if metric is None:
        pair: Any = C.message(f"No similarity rows in run {run}.", "info")
    elif ckpt == steps[0]:
        pair = _heatmap(data, sim_all, run, layer, ckpt, metric, "first", threshold)
    else:
        pair = C.row(_heatmap(data, sim_all, run, layer, steps[0], metric, "first", threshold),
                     _heatmap(data, sim_all, run, layer, ckpt, metric, "later", threshold))
    rule_text = " or ".join(METRIC_NAMES.get(m, m) for m in rule_metrics)
    return html.Div(
        [
            head,
            bar,
            pair,
            C.card(C.guard("clones per snapshot", lambda: C.table(counts, "sim-clones", page_size=12)),
                   title=f"Clone pairs per snapshot ({rule_text} > {threshold:g}; the clones rule judges the latest)"),
            C.card(C.guard("spectra", lambda: C.figure(data, "sim-spectra", (run, layer, ckpt, matrix), lambda: (
                F.spectra_lines(spectra, matrix or "", f"Layer {layer}, step {ckpt}: singular values of {matrix}"))))),
        ]
    )

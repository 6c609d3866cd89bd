"""Figure functions: DataFrames in, plotly figures out. No queries here (those live in data.py).

One palette function, `expert_color`, colours expert e the same on every page, whatever the layer's size,
and one status palette colours PASS/WARN/FAIL everywhere.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

#: Distinct, colour-blind-aware hues for the first experts (Observable 10, then ten more of similar weight).
_EXPERT_BASE = (
    "#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5", "#9c6b4e", "#9498a0",
    "#1b9e77", "#d95f02", "#17becf", "#e7298a", "#b5bd00", "#1d3557", "#a6761d", "#6a3d9a", "#b8336a", "#5f9ea0",
)

STATUS_COLORS = {
    "PASS": "#2e9e5b",
    "SKIP": "#b7bec9",
    "WARN": "#f0a202",
    "FAIL": "#d6453d",
    "ERROR": "#7b2cbf",
    "": "#eef1f5",
}

#: The neutral colour of the utilization scale: fair share (N·f = 1) on every page and every run.
UTIL_NEUTRAL = "#f7f7f7"
#: Diverging scale for log2(N·f_e): blue = starved, white = fair share (log2 1 = 0, the middle), red = overloaded.
UTIL_SCALE = [[0.0, "#2c5fa8"], [0.25, "#9cc3e6"], [0.5, UTIL_NEUTRAL], [0.75, "#f4a582"], [1.0, "#b2182b"]]
#: Sequential scale for similarities in [0, 1].
SIM_SCALE = [[0.0, "#f7fbff"], [0.4, "#9ecae1"], [0.8, "#2171b5"], [1.0, "#08306b"]]

FONT = "Inter, system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e8ebf0"


def expert_color(expert: int) -> str:
    """The colour of expert `expert` on every page (fixed per id, independent of the layer's expert count)."""
    e = int(expert)
    if 0 <= e < len(_EXPERT_BASE):
        return _EXPERT_BASE[e]
    # Beyond the base palette: golden-angle hues at alternating lightness stay distinguishable.
    h = (e * 0.618033988749895) % 1.0
    lightness = 0.45 if e % 2 else 0.58
    r, g, b = colorsys.hls_to_rgb(h, lightness, 0.62)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def expert_colors(n: int) -> list[str]:
    """Colours of experts 0..n-1."""
    return [expert_color(e) for e in range(int(n))]


def status_color(status: str) -> str:
    """The colour of a finding status."""
    return STATUS_COLORS.get(str(status), STATUS_COLORS[""])


def _template() -> go.layout.Template:
    """The dashboard's light theme: layout defaults only (a lean template keeps building a figure cheap)."""
    axis = {"gridcolor": GRID, "zerolinecolor": GRID, "linecolor": "#c9ced6", "showline": True, "ticks": "outside",
            "tickcolor": "#c9ced6", "automargin": True, "title": {"standoff": 8}}
    return go.layout.Template(
        layout={
            "font": {"family": FONT, "size": 12, "color": INK},
            "title": {"font": {"size": 15, "color": INK}, "x": 0.0, "xanchor": "left", "xref": "paper", "y": 0.97},
            "margin": {"l": 64, "r": 24, "t": 52, "b": 52},
            "colorway": list(_EXPERT_BASE),
            "paper_bgcolor": "white",
            "plot_bgcolor": "white",
            "xaxis": axis,
            "yaxis": {**axis, "ticks": ""},
            "hoverlabel": {"font": {"family": FONT, "size": 12}, "bgcolor": "white"},
            "hovermode": "closest",
            "legend": {"font": {"size": 11}, "bgcolor": "rgba(255,255,255,0.8)"},
        }
    )


TEMPLATE = _template()


def _fig(title: str, xtitle: str = "", ytitle: str = "", height: int = 360) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(template=TEMPLATE, title_text=title, height=height)
    fig.update_xaxes(title_text=xtitle)
    fig.update_yaxes(title_text=ytitle)
    return fig


def empty_figure(title: str, message: str, height: int = 300) -> go.Figure:
    """A titled, axis-free figure carrying a message (no data for this selection)."""
    fig = _fig(title, height=height)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 13, "color": MUTED})
    return fig


def _step_label(start: Any, end: Any) -> str:
    s, e = int(start), int(end)
    return f"step {s}" if s == e else f"steps {s}–{e}"


# -- overview ------------------------------------------------------------------------------------------

_STATUS_CODES = ["", "PASS", "SKIP", "WARN", "FAIL", "ERROR"]


def health_grid(grid: pd.DataFrame, runs: Sequence[str] | None = None) -> go.Figure:
    """Run × layer grid of the worst finding status (colour) with WARN/FAIL counts (text)."""
    if grid.empty:
        return empty_figure("Health by run and layer", "no findings (the health rules returned nothing)")
    runs = list(runs) if runs is not None else list(dict.fromkeys(grid["run"]))
    layers = sorted(int(x) for x in grid["layer"].unique())
    code = {s: i for i, s in enumerate(_STATUS_CODES)}
    z, text, hover = [], [], []
    for run in runs:
        zr, tr, hr = [], [], []
        for layer in layers:
            row = grid[(grid["run"] == run) & (grid["layer"] == layer)]
            if row.empty:
                zr.append(0)
                tr.append("")
                hr.append(f"{run} · layer {layer}: no findings")
                continue
            r = row.iloc[0]
            zr.append(code.get(r["status"], 0))
            counts = []
            if int(r["fail"]):
                counts.append(f"{int(r['fail'])} fail")
            if int(r["warn"]):
                counts.append(f"{int(r['warn'])} warn")
            tr.append(r["status"] + ("<br>" + ", ".join(counts) if counts else ""))
            hr.append(f"{run} · layer {layer}: {r['status']} ({int(r['findings'])} findings)")
        z.append(zr)
        text.append(tr)
        hover.append(hr)
    n = len(_STATUS_CODES)
    scale = []
    for i, s in enumerate(_STATUS_CODES):  # a stepped scale: one flat band per status code
        scale += [[i / n, status_color(s)], [(i + 1) / n, status_color(s)]]
    fig = _fig("Health by run and layer", "layer", "", height=max(180, 70 + 52 * len(runs)))
    fig.add_trace(
        go.Heatmap(
            z=z, x=[f"L{x}" for x in layers], y=runs, text=text, texttemplate="%{text}", hovertext=hover,
            hoverinfo="text", colorscale=scale, zmin=-0.5, zmax=n - 0.5, showscale=False, xgap=3, ygap=3,
            textfont={"color": "white", "size": 12},
        )
    )
    fig.update_yaxes(autorange="reversed", showgrid=False, type="category")
    fig.update_xaxes(showgrid=False, side="top", type="category", ticks="")
    fig.update_layout(margin={"t": 64, "l": 100})
    return fig


# -- utilization ---------------------------------------------------------------------------------------


def _ratio_text(exp: int) -> str:
    """'4' for 2**2, '1/4' for 2**-2: a ratio tick label."""
    return str(2**exp) if exp >= 0 else f"1/{2 ** -exp}"


def util_log_scale(values: Any, n_experts: int) -> tuple[Any, float, dict[str, Any]]:
    """Utilization N·f on a log-symmetric scale around fair share: (log2 values, bound B, colorbar settings).

    A ratio is symmetric in log space (2× over and 2× under are equally far from fair share), so the heatmaps
    plot log2(N·f) between -B and +B: fair share sits exactly in the middle of the colour scale on every page
    and run. B is the largest |log2 N·f| seen (at least 1, at most log2 N); dead experts clip to -B.
    Plotly ignores `zmid` when zmin and zmax are both set, hence the explicit symmetric bounds.
    """
    import numpy as np

    u = np.asarray(values, dtype=float)
    cap = max(1.0, math.log2(max(int(n_experts), 2)))
    pos = u[np.isfinite(u) & (u > 0)]
    seen = float(np.abs(np.log2(pos)).max()) if pos.size else 1.0
    if (u[np.isfinite(u)] <= 0).any():
        seen = cap  # a dead expert is as starved as the scale can show
    bound = float(min(cap, max(1.0, math.ceil(seen))))
    with np.errstate(divide="ignore"):
        z = np.log2(np.clip(u, 2.0**-bound, 2.0**bound))
    z = np.where(np.isnan(u), np.nan, z)
    ticks = list(range(-int(bound), int(bound) + 1))
    labels = [_ratio_text(t) for t in ticks]
    if (u[np.isfinite(u)] < 2.0**-bound).any():
        labels[0] = "≤" + labels[0]  # dead experts clip to the floor
    colorbar = {"title": {"text": "N·f"}, "thickness": 12, "tickmode": "array", "tickvals": ticks,
                "ticktext": labels}
    return z, bound, colorbar


def utilization_heatmap(util: pd.DataFrame, layer: int) -> go.Figure:
    """Expert × step-window heatmap of utilization N·f_e in one layer (1.0 = fair share)."""
    df = util[util["layer"] == layer]
    title = f"Layer {layer}: utilization per expert over steps (N·f, 1 = fair share)"
    if df.empty:
        return empty_figure(title, "no expert_load rows for this selection")
    piv = df.pivot_table(index="expert", columns="window_start", values="utilization", aggfunc="first")
    ends = df.groupby("window_start")["window_end"].first()
    n = int(df["n_experts"].max()) if "n_experts" in df else len(piv.index)
    z, bound, colorbar = util_log_scale(piv.to_numpy(), n)
    vals = piv.to_numpy()
    hover = [[f"expert {e} · {_step_label(s, ends[s])}<br>utilization {vals[i][j]:.2f}" for j, s in
              enumerate(piv.columns)] for i, e in enumerate(piv.index)]
    fig = _fig(title, "step", "expert", height=max(260, 90 + 22 * len(piv.index)))
    fig.add_trace(
        go.Heatmap(
            z=z, x=list(piv.columns), y=[int(e) for e in piv.index], colorscale=UTIL_SCALE,
            zmin=-bound, zmax=bound, hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
            colorbar=colorbar,
        )
    )
    fig.update_yaxes(dtick=1 if n <= 32 else None, autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False)
    return fig


def load_lines(util: pd.DataFrame, layer: int, max_points: int = 40, dead_below: float | None = 0.05) -> go.Figure:
    """One line per expert: utilization over steps, with the fair share (1.0) and dead-expert levels.

    dead_below: the dead_expert rule's `fail_below` of the dashboard's config (None: the rule is off, no line).
    """
    df = util[util["layer"] == layer]
    title = f"Layer {layer}: per-expert load over steps"
    if df.empty:
        return empty_figure(title, "no expert_load rows for this selection")
    starts = sorted(df["window_start"].unique())
    if len(starts) > max_points:
        # Lines need fewer points than the heatmap: a window with no tokens for an expert would otherwise
        # drop its line to the floor and back, and 16 such lines read as noise.
        width = math.ceil(len(starts) / max_points)
        first = {s: starts[(i // width) * width] for i, s in enumerate(starts)}
        df = df.assign(window_start=df["window_start"].map(first))
        df = df.groupby(["expert", "window_start"], as_index=False)["utilization"].mean()
    fig = _fig(title, "step", "utilization N·f (log)", height=340)
    for e, g in df.groupby("expert", sort=True):
        fig.add_trace(
            go.Scatter(
                x=g["window_start"], y=g["utilization"].clip(lower=1e-3), mode="lines", name=f"E{int(e)}",
                line={"color": expert_color(int(e)), "width": 1.8},
                hovertemplate=f"expert {int(e)}<br>step %{{x}}<br>N·f %{{y:.3f}}<extra></extra>",
            )
        )
    fig.add_hline(y=1.0, line={"color": MUTED, "dash": "dash", "width": 1})
    levels = [(1.0, "fair share", MUTED, 8)]
    if dead_below is not None and dead_below > 0:  # a log axis has no place for 0
        fig.add_hline(y=dead_below, line={"color": status_color("FAIL"), "dash": "dot", "width": 1})
        levels.append((dead_below, f"dead < {dead_below:g}", status_color("FAIL"), -8))
    # On a log axis annotations take log10 positions (shapes take data values): place the labels by hand.
    for y, text, color, shift in levels:
        fig.add_annotation(x=0, xref="paper", xanchor="left", y=math.log10(y), yref="y", yshift=shift,
                           text=text, showarrow=False, font={"color": color, "size": 11})
    fig.update_yaxes(type="log", dtick=1)
    fig.update_layout(legend={"orientation": "v", "x": 1.01, "y": 1, "title": {"text": "expert"}})
    return fig


def metric_curves(
    lm: pd.DataFrame, column: str, title: str, ytitle: str, layer: int | None = None,
    threshold: float | None = None, threshold_label: str = "", threshold2: float | None = None,
    threshold2_label: str = "",
) -> go.Figure:
    """One line per layer of a load metric over steps; the selected layer drawn strong, the others faint."""
    if lm.empty or column not in lm or lm[column].notna().sum() == 0:
        return empty_figure(title, f"no {column.replace('_', ' ')} data for this selection")
    fig = _fig(title, "step", ytitle, height=300)
    layers = sorted(int(x) for x in lm["layer"].unique())
    for lay in layers:
        g = lm[lm["layer"] == lay]
        strong = layer is None or lay == layer
        fig.add_trace(
            go.Scatter(
                x=g["window_start"], y=g[column], mode="lines", name=f"layer {lay}",
                line={"color": "#1f4e9e" if strong else "#c3cad6", "width": 2.4 if strong else 1.2},
                hovertemplate=f"layer {lay}<br>step %{{x}}<br>{ytitle} %{{y:.4g}}<extra></extra>",
                showlegend=False,
            )
        )
    # Draw the selected layer last so it sits on top of the faint ones.
    fig.data = tuple(sorted(fig.data, key=lambda t: t.name == f"layer {layer}"))
    for value, label, status in ((threshold, threshold_label, "FAIL" if threshold2 is None else "WARN"),
                                 (threshold2, threshold2_label, "FAIL")):
        if value is not None:
            fig.add_hline(y=value, line={"color": status_color(status), "dash": "dot", "width": 1},
                          annotation_text=label, annotation_position="top left",
                          annotation_font={"color": status_color(status), "size": 11})
    if layer is not None:
        fig.add_annotation(text=f"<b>layer {layer}</b> · others in grey", x=1, y=1.0, xref="paper", yref="paper",
                           xanchor="right", yanchor="bottom", showarrow=False, font={"size": 11, "color": MUTED})
    return fig


def layer_expert_heatmap(lu: pd.DataFrame, layer: int | None = None) -> go.Figure:
    """Layer × expert heatmap of utilization over the selected window."""
    title = "Utilization by layer and expert (selected window)"
    if lu.empty:
        return empty_figure(title, "no expert_load rows for this selection")
    piv = lu.pivot_table(index="layer", columns="expert", values="utilization", aggfunc="first")
    n = int(lu["n_experts"].max())
    z, bound, colorbar = util_log_scale(piv.to_numpy(), n)
    fig = _fig(title, "expert", "layer", height=max(200, 100 + 30 * len(piv.index)))
    fig.add_trace(
        go.Heatmap(
            z=z, x=[int(c) for c in piv.columns], y=[int(i) for i in piv.index], colorscale=UTIL_SCALE,
            zmin=-bound, zmax=bound, xgap=1, ygap=1, colorbar=colorbar, customdata=piv.to_numpy(),
            # cells show and hover the ratio itself; the colour is its log
            texttemplate="%{customdata:.2f}" if piv.size <= 256 else None,
            hovertemplate="layer %{y} · expert %{x}<br>utilization %{customdata:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(dtick=1 if n <= 32 else None, showgrid=False)
    fig.update_yaxes(dtick=1, autorange="reversed", showgrid=False)
    if layer is not None and layer in piv.index:
        fig.add_shape(type="rect", xref="paper", x0=0, x1=1, y0=layer - 0.5, y1=layer + 0.5,
                      line={"color": INK, "width": 2})
    return fig


# -- collapse ------------------------------------------------------------------------------------------


def findings_timeline(findings: pd.DataFrame, layers: Sequence[int], run: str, selected: int | None = None) -> go.Figure:
    """Per layer, the worst finding status of each step window as a bar along the step axis."""
    title = f"{run}: findings over steps, per layer"
    df = findings[findings["layer"].notna() & findings["window_start"].notna()] if not findings.empty else findings
    if df.empty:
        return empty_figure(title, "no windowed findings for this run")
    fig = _fig(title, "step", "", height=max(200, 90 + 40 * len(layers)))
    rows = []
    for (layer, ws, we), g in df.groupby(["layer", "window_start", "window_end"]):
        order = {s: i for i, s in enumerate(("PASS", "SKIP", "WARN", "FAIL", "ERROR"))}
        worst = max(g["status"], key=lambda s: order.get(s, -1))
        bad = g[g["status"].isin(["WARN", "FAIL", "ERROR"])]
        lines = [f"{r.status} {r.rule}: {r.message}" for r in bad.itertuples()][:6] or ["all rules pass"]
        rows.append((int(layer), int(ws), int(we), worst, "<br>".join(lines)))
    for status in ("PASS", "SKIP", "WARN", "FAIL", "ERROR"):
        sub = [r for r in rows if r[3] == status]
        if not sub:
            continue
        fig.add_trace(
            go.Bar(
                y=[f"L{r[0]}" for r in sub], x=[r[2] - r[1] + 1 for r in sub], base=[r[1] for r in sub],
                orientation="h", name=status, marker={"color": status_color(status), "line": {"color": "white",
                                                                                          "width": 2}},
                hovertext=[f"layer {r[0]} · {_step_label(r[1], r[2])}<br>{r[4]}" for r in sub],
                hovertemplate="%{hovertext}<extra></extra>", width=0.7,
            )
        )
    cats = [f"L{x}" for x in sorted(layers)]
    fig.update_yaxes(categoryorder="array", categoryarray=cats[::-1], type="category", showgrid=False)
    fig.update_layout(barmode="overlay", legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02,
                                                 "yanchor": "bottom"})
    if selected is not None:
        fig.add_annotation(text=f"◀ layer {selected}", x=1.0, xref="paper", y=f"L{selected}", showarrow=False,
                           xanchor="left", font={"size": 11, "color": INK})
        fig.update_layout(margin={"r": 80})
    return fig


# -- similarity ----------------------------------------------------------------------------------------


def similarity_heatmap(sim: pd.DataFrame, title: str, threshold: float = 0.8) -> go.Figure:
    """Expert × expert similarity matrix (values in [0, 1]); pairs above `threshold` are outlined as clones."""
    if sim.empty:
        return empty_figure(title, "no similarity snapshot for this selection")
    piv = sim.pivot_table(index="expert_a", columns="expert_b", values="value", aggfunc="first")
    idx = sorted(set(piv.index) | set(piv.columns))
    piv = piv.reindex(index=idx, columns=idx)
    # Snapshots may store one triangle only; mirror it so the matrix reads the same both ways.
    piv = piv.combine_first(piv.T)
    n = len(idx)
    fig = _fig(title, "expert", "expert", height=360)
    fig.add_trace(
        go.Heatmap(
            z=piv.to_numpy(), x=[int(i) for i in idx], y=[int(i) for i in idx], colorscale=SIM_SCALE, zmin=0, zmax=1,
            xgap=1, ygap=1, texttemplate="%{z:.2f}" if n <= 12 else None, textfont={"size": 10},
            hovertemplate="experts %{y} & %{x}<br>%{z:.3f}<extra></extra>", colorbar={"thickness": 12},
        )
    )
    shapes = []
    for a in range(n):
        for b in range(a + 1, n):
            v = piv.iat[a, b]
            if pd.notna(v) and v > threshold:
                for x, y in ((idx[b], idx[a]), (idx[a], idx[b])):
                    shapes.append({"type": "rect", "x0": x - 0.5, "x1": x + 0.5, "y0": y - 0.5, "y1": y + 0.5,
                                   "line": {"color": status_color("WARN"), "width": 2}})
    # one layout update: add_shape per cell validates the whole figure each time (seconds for 16 clones)
    fig.update_layout(shapes=shapes)
    fig.update_xaxes(dtick=1 if n <= 32 else None, showgrid=False)
    fig.update_yaxes(dtick=1 if n <= 32 else None, autorange="reversed", showgrid=False)
    return fig


def log_ticks(lo: float, hi: float, max_ticks: int = 10) -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis over [lo, hi]: 1-2-5 steps per decade while they fit, else decades.

    Every label is the full number ('0.2', '5', '20'), unlike Plotly's 'D2' minor labels that read '1, 5, 2'.
    """
    if not (lo > 0 and hi > 0) or not (math.isfinite(lo) and math.isfinite(hi)):
        return [], []
    lo, hi = min(lo, hi), max(lo, hi)
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1, 2, 5), (1,)):
        vals = [m * 10.0**d for d in range(d0, d1 + 1) for m in mults]
        # keep one tick below and above the data so the axis ends are labelled
        below = [v for v in vals if v <= lo][-1:]
        above = [v for v in vals if v >= hi][:1]
        inside = below + [v for v in vals if lo < v < hi] + above
        if len(inside) <= max_ticks or mults == (1,):
            return inside, [f"{v:g}" for v in inside]
    return [], []  # pragma: no cover - the loop always returns


def spectra_lines(spectra: pd.DataFrame, matrix: str, title: str) -> go.Figure:
    """Singular values by index, one line per expert (log scale), for one weight matrix."""
    df = spectra[spectra["matrix"] == matrix] if not spectra.empty else spectra
    if df.empty:
        return empty_figure(title, "no spectra snapshot for this selection")
    fig = _fig(title, "singular value index", "σ (log)", height=360)
    for e, g in df.groupby("expert", sort=True):
        fig.add_trace(
            go.Scatter(
                x=g["idx"], y=g["sigma"], mode="lines", name=f"E{int(e)}",
                line={"color": expert_color(int(e)), "width": 1.6},
                hovertemplate=f"expert {int(e)}<br>σ%{{x}} = %{{y:.4g}}<extra></extra>",
            )
        )
    vals, texts = log_ticks(float(df["sigma"][df["sigma"] > 0].min()), float(df["sigma"].max()))
    fig.update_yaxes(type="log", tickmode="array", tickvals=vals, ticktext=texts)
    fig.update_layout(legend={"title": {"text": "expert"}})
    return fig


# -- drift ---------------------------------------------------------------------------------------------


def drift_bars(drift: pd.DataFrame, tv_threshold: float = 0.05) -> go.Figure:
    """Per layer Jensen–Shannon distance and total variation, with each layer's JS threshold and the TV bar."""
    title = "Drift per layer: baseline vs current expert load"
    if drift.empty:
        return empty_figure(title, "no layers to compare (is either selection empty?)")
    df = drift.sort_values("layer")
    x = [f"L{int(v)}" for v in df["layer"]]
    flagged = df["flagged"].fillna(False).astype(bool) if "flagged" in df else pd.Series(False, index=df.index)
    fig = _fig(title, "layer", "distance", height=340)
    # Flagged and unflagged JS bars are two traces sharing one slot, so the legend explains the amber bars.
    for mask, name, color in ((~flagged, "JS distance", "#4269d0"), (flagged, "JS distance, drift flagged",
                                                                      status_color("WARN"))):
        if mask.any() or name == "JS distance":
            fig.add_trace(go.Bar(x=[v for v, m in zip(x, mask) if m], y=df["js"][mask.to_numpy()], name=name,
                                 marker={"color": color}, offsetgroup="js",
                                 hovertemplate="%{x}<br>JS %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Bar(x=x, y=df["tv"], name="TV", marker={"color": "#97bbf5"}, offsetgroup="tv",
                         hovertemplate="%{x}<br>TV %{y:.4f}<extra></extra>"))
    if "threshold" in df:
        # A short red line over each layer's JS bar (JS sits left of centre in its group, TV right of it).
        for i, thr in enumerate(df["threshold"]):
            if pd.notna(thr):
                fig.add_shape(type="line", xref="x", yref="y", x0=i - 0.34, x1=i - 0.01, y0=thr, y1=thr,
                              line={"color": status_color("FAIL"), "width": 3})
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="JS threshold",
                                 line={"color": status_color("FAIL"), "width": 3}, hoverinfo="skip"))
    fig.add_hline(y=tv_threshold, line={"color": MUTED, "dash": "dot", "width": 1},
                  annotation_text=f"TV {tv_threshold:g}", annotation_position="top right",
                  annotation_font={"size": 11, "color": MUTED})
    fig.update_xaxes(categoryorder="array", categoryarray=x)
    fig.update_layout(barmode="group", bargap=0.3,
                      legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"})
    return fig


def precision_bars(prec: pd.DataFrame, layer: int | None = None, warn_above: float | None = None) -> go.Figure:
    """Per layer: the share of sampled tokens whose experts change when the router runs in float32 (flip rate),
    the selected layer highlighted, the precision rule's WARN line."""
    title = "Precision sensitivity: tokens that change experts in float32"
    if prec.empty:
        return empty_figure(title, "not recorded (record(..., precision_check=True))")
    df = prec.sort_values("layer")
    x = [f"L{int(v)}" for v in df["layer"]]
    colors = [status_color("WARN") if warn_above is not None and pd.notna(r) and r > warn_above else "#4269d0"
              for r in df["flip_rate"]]
    line = [2 if layer is not None and int(v) == int(layer) else 0 for v in df["layer"]]
    fig = _fig(title, "layer", "flip rate", height=300)
    fig.add_trace(go.Bar(x=x, y=df["flip_rate"], marker={"color": colors, "line": {"width": line, "color": INK}},
                         customdata=df[["flipped", "sampled"]].to_numpy(), name="flip rate",
                         hovertemplate="%{x}<br>%{customdata[0]} of %{customdata[1]} sampled tokens flipped"
                                       "<br>flip rate %{y:.2%}<extra></extra>"))
    if warn_above is not None:
        fig.add_hline(y=warn_above, line={"color": status_color("WARN"), "dash": "dot", "width": 1},
                      annotation_text=f"WARN above {warn_above:.2%}", annotation_position="top right",
                      annotation_font={"size": 11, "color": MUTED})
    fig.update_yaxes(tickformat=".1%", rangemode="tozero")
    fig.update_xaxes(categoryorder="array", categoryarray=x)
    return fig


def expert_deltas(base: pd.DataFrame, cur: pd.DataFrame, layer: int) -> go.Figure:
    """Per expert in one layer: current minus baseline share of assignments (percentage points)."""
    title = f"Layer {layer}: change in each expert's share of assignments (current − baseline)"
    b = base[base["layer"] == layer].set_index("expert")["share"] if not base.empty else pd.Series(dtype=float)
    c = cur[cur["layer"] == layer].set_index("expert")["share"] if not cur.empty else pd.Series(dtype=float)
    experts = sorted(set(b.index) | set(c.index))
    if not experts:
        return empty_figure(title, "no expert_load rows for these selections")
    b = b.reindex(experts).fillna(0.0)
    c = c.reindex(experts).fillna(0.0)
    delta = (c - b) * 100
    fig = _fig(title, "expert", "Δ share (percentage points)", height=320)
    fig.add_trace(
        go.Bar(
            x=[int(e) for e in experts], y=delta, marker={"color": [expert_color(int(e)) for e in experts]},
            customdata=list(zip(b * 100, c * 100)), name="Δ share",
            hovertemplate="expert %{x}<br>baseline %{customdata[0]:.2f}%<br>current %{customdata[1]:.2f}%"
            "<br>Δ %{y:+.2f} pp<extra></extra>",
        )
    )
    fig.add_hline(y=0, line={"color": INK, "width": 1})
    fig.update_xaxes(dtick=1 if len(experts) <= 32 else None, showgrid=False)
    return fig


# -- tokens --------------------------------------------------------------------------------------------


def token_heatmap(tok: pd.DataFrame, n_experts: int, title: str) -> go.Figure:
    """Layer × token position: colour = first-choice expert, text = all chosen experts; x labels = the tokens."""
    if tok.empty:
        return empty_figure(title, "no token-level routing for this sequence")
    piv = tok.pivot_table(index="layer", columns="pos", values="expert0", aggfunc="first")
    chosen = tok.pivot_table(index="layer", columns="pos", values="experts", aggfunc="first")
    texts = tok.drop_duplicates("pos").set_index("pos")["text"].reindex(piv.columns)
    n = max(int(n_experts), int(tok["expert0"].max()) + 1, 1)
    scale = []
    for e in range(n):  # stepped scale: expert e gets its own flat band, in its palette colour
        scale += [[e / n, expert_color(e)], [(e + 1) / n, expert_color(e)]]
    label = [[", ".join(str(x) for x in (v if isinstance(v, list) else [])) for v in row] for row in chosen.to_numpy()]
    width = max(1180, 90 + 30 * len(piv.columns))
    fig = _fig(title, "token", "layer", height=max(170, 100 + 34 * len(piv.index)))
    fig.add_trace(
        go.Heatmap(
            z=piv.to_numpy(), x=list(range(len(piv.columns))), y=[int(i) for i in piv.index], colorscale=scale,
            zmin=-0.5, zmax=n - 0.5, text=label, texttemplate="%{text}", textfont={"size": 9, "color": "white"},
            customdata=[[texts.iloc[j] for j in range(len(piv.columns))] for _ in piv.index],
            hovertemplate="layer %{y} · token %{customdata}<br>experts %{text}<extra></extra>", xgap=1, ygap=2,
            showscale=False,  # the expert legend under the chart names the colours
        )
    )
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(piv.columns))), ticktext=list(texts), tickangle=0,
                     showgrid=False, side="top", tickfont={"family": "ui-monospace, Menlo, Consolas, monospace"})
    fig.update_yaxes(dtick=1, autorange="reversed", showgrid=False)
    fig.update_layout(width=width, margin={"t": 80, "r": 16, "b": 16})
    return fig


# -- systems what-ifs (the Systems page) ----------------------------------------------------------------------

#: Line style of each expert-cache policy: label, colour, dash.
POLICY_STYLE = {
    "lru": ("LRU", "#4269d0", "solid"),
    "lfu": ("LFU", "#efb118", "solid"),
    "belady": ("Belady (optimal bound)", "#3ca951", "dot"),
}


def capacity_figure(cap: pd.DataFrame, layer: int) -> go.Figure:
    """Drop rate vs capacity factor: the selected layer strong, the others faint, the model's own rate dotted."""
    title = "Token drops vs capacity factor"
    if cap.empty or cap["drop_rate"].notna().sum() == 0:
        note = cap["note"].dropna().iloc[0] if len(cap) and cap["note"].notna().any() else "no routing in this window"
        return empty_figure(title, note)
    fig = _fig(title, "capacity factor", "dropped assignments", height=340)
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
    fig.data = tuple(sorted(fig.data, key=lambda t: t.name == f"layer {layer}"))  # the selected layer on top
    sel = cap[cap["layer"] == layer]
    reported = sel["reported_drop_rate"].dropna()
    if len(reported):
        fig.add_hline(y=float(reported.iloc[0]), line={"color": status_color("WARN"), "dash": "dot", "width": 1},
                      annotation_text="model-reported", annotation_position="top right")
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    src = "" if sel.empty else str(sel["source"].iloc[0])
    text = f"<b>layer {layer}</b> · others in grey" + (" · lower bound from counts" if src == "counts" else "")
    fig.add_annotation(text=text, x=1, y=1.0, xref="paper", yref="paper", xanchor="right", yanchor="bottom",
                       showarrow=False, font={"size": 11, "color": MUTED})
    return fig


def balance_figure(cmp: pd.DataFrame, devices: int, layer: int) -> go.Figure:
    """Balancedness (mean/max device load) per layer for three placements, judged on the held-out window."""
    title = f"Expert-parallel balance on {devices} devices (held-out steps)"
    if cmp.empty:
        return empty_figure(title, "not enough steps to fit on one window and judge on a later one")
    a, b = int(cmp["eval_start"].iloc[0]), int(cmp["eval_end"].iloc[0])
    fig = _fig(f"{title}: steps {a}–{b}", "layer", "balancedness = mean / max device load", height=340)
    names = [c for c in cmp.columns if c not in ("layer", "eval_start", "eval_end")]
    for name, color in zip(names, ("#9498a0", "#4269d0", "#3ca951")):
        fig.add_trace(
            go.Bar(
                x=[f"layer {int(x)}" for x in cmp["layer"]], y=cmp[name], name=name, marker_color=color,
                marker_line={"width": [2 if int(x) == layer else 0 for x in cmp["layer"]], "color": INK},
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
        return empty_figure(title, "needs token-level routing (record with tokens > 0)")
    fig = _fig(title, "cache size (experts on device)", "hit rate", height=340)
    for policy, g in hits.groupby("policy"):
        label, color, dash = POLICY_STYLE.get(str(policy), (str(policy), INK, "solid"))
        g = g.sort_values("cache_size")
        fig.add_trace(
            go.Scatter(
                x=g["cache_size"], y=g["hit_rate"], mode="lines+markers", name=label,
                line={"color": color, "dash": dash, "width": 2},
                hovertemplate=f"{label}<br>%{{x}} experts<br>hit rate %{{y:.1%}}<extra></extra>",
            )
        )
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    fig.update_layout(legend={"orientation": "h", "y": -0.2})
    return fig

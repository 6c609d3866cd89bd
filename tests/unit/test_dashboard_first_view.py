"""What a new user sees first in the dashboard: colour scales that put fair share at the neutral colour,
readable log ticks, each page opening on the run worth seeing, and a quiet server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("dash")
pytest.importorskip("plotly")

from moescope import dashboard as glue  # noqa: E402

F = glue.figures
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_traces"


def _colour_at(scale: list[list[Any]], pos: float) -> str:
    """The colour a stepped-free scale gives at position `pos` when pos is one of its stops."""
    for p, c in scale:
        if abs(float(p) - pos) < 1e-12:
            return str(c)
    raise AssertionError(f"no colour stop at {pos} in {scale}")


def _midpoint(trace: Any) -> float:
    """Where z = log2(1) = 0 (fair share) lands on the colour scale, as a fraction from zmin to zmax."""
    return (0.0 - trace.zmin) / (trace.zmax - trace.zmin)


def _util_frame(values: list[float], n: int = 16) -> pd.DataFrame:
    rows = [{"layer": 0, "expert": e, "window_start": w * 10, "window_end": w * 10 + 9, "utilization": v,
             "n_experts": n} for w in range(2) for e, v in enumerate(values)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("values", [
    [1.0] * 16,                                             # balanced: everything at fair share
    [3.54, 1.91, 1.0, 0.5] + [0.0] * 12,                    # collapsed: the example
    [8.0, 8.0] + [0.0] * 14,                                # top-2 of 16 fully collapsed
    [1.2, 0.8] * 8,
])
def test_fair_share_is_the_neutral_colour(values: list[float]) -> None:
    util = _util_frame(values)
    figs = [F.utilization_heatmap(util, 0),
            F.layer_expert_heatmap(util[util["window_start"] == 0].drop(columns=["window_start", "window_end"]), 0)]
    for fig in figs:
        hm = fig.data[0]
        assert hm.zmin == -hm.zmax and hm.zmax >= 1  # symmetric bounds in log2 space
        assert hm.zmid is None  # plotly ignores zmid when both bounds are set: never rely on it
        assert _midpoint(hm) == 0.5
        scale = [list(s) for s in hm.colorscale]
        assert _colour_at(scale, 0.5) == F.UTIL_NEUTRAL
        z = np.asarray(hm.z, dtype=float)
        u = np.asarray(values)
        row = z[:, 0] if z.shape[0] == 16 else z[0]  # expert × window, or layer × expert
        assert np.allclose(row[u == 1.0], 0.0)  # fair share plots at the middle
        assert (row[u > 1.0] > 0).all() and (row[u < 1.0] < 0).all()  # over: red side, under: blue side
        ticks = dict(zip(hm.colorbar.tickvals, hm.colorbar.ticktext))
        assert ticks[0] == "1" and ticks[1] == "2" and ticks[-1] == "1/2"  # labels in ratio units


def test_dead_experts_clip_to_the_bottom_of_the_scale() -> None:
    fig = F.utilization_heatmap(_util_frame([8.0, 8.0] + [0.0] * 14), 0)
    hm = fig.data[0]
    z = np.asarray(hm.z, dtype=float)
    assert hm.zmax == 4  # log2(16): the most a 16-expert layer can show
    assert z.max() == 3 and z.min() == -4  # 8x fair share; dead experts at the floor, not -inf
    assert "utilization 0.00" in hm.hovertext[5][0]  # hover shows the ratio, not its log
    assert hm.colorbar.ticktext[0] == "≤1/16"


def test_log_ticks_read_as_numbers() -> None:
    vals, texts = F.log_ticks(0.13, 4.2)
    assert texts == ["0.1", "0.2", "0.5", "1", "2", "5"]
    assert vals == sorted(vals)
    vals, texts = F.log_ticks(1e-4, 1e3)  # too many 1-2-5 steps: decades only
    assert texts == ["0.0001", "0.001", "0.01", "0.1", "1", "10", "100", "1000"]
    assert F.log_ticks(0.0, 1.0) == ([], [])


def test_spectra_axis_uses_full_labels() -> None:
    spectra = pd.DataFrame({"expert": [0] * 4 + [1] * 4, "matrix": "w_in", "idx": list(range(4)) * 2,
                            "sigma": [4.0, 1.5, 0.4, 0.12, 3.0, 1.0, 0.3, 0.2]})
    fig = F.spectra_lines(spectra, "w_in", "spectra")
    assert fig.layout.yaxis.type == "log"
    assert list(fig.layout.yaxis.ticktext) == ["0.1", "0.2", "0.5", "1", "2", "5"]
    assert fig.layout.yaxis.dtick is None  # not 'D2', whose minor labels read '1, 5, 2'


# -- each page opens on the run worth seeing (sample_traces/: the default demo's output) -------------------------

needs_samples = pytest.mark.skipif(not (SAMPLES / "collapse" / "manifest.json").is_file(),
                                   reason="sample_traces/ not present")


@pytest.fixture(scope="module")
def sample_app() -> Any:
    app = glue.create_app(SAMPLES, warm=False)
    yield app
    app.moescope_data.close()


def _walk(node: Any) -> Any:
    yield node
    children = getattr(node, "children", None)
    for child in children if isinstance(children, (list, tuple)) else [children]:
        if child is not None and not isinstance(child, (str, int, float)):
            yield from _walk(child)


def _page(app: Any, page: str, **query: str) -> Any:
    from dash._get_app import app_context

    token = app_context.set(app)
    try:
        return glue.app.page_module(page).layout(**query)
    finally:
        app_context.reset(token)


def _control(tree: Any, key: str) -> Any:
    """The value of the selection control `key` (run, layer, b_tag, ...) in a rendered page."""
    for node in _walk(tree):
        if getattr(node, "id", None) == {"type": "ms-sel", "key": key}:
            return node.value
    raise AssertionError(f"no control {key!r} on the page")


def _text(tree: Any) -> str:
    return " ".join(str(n.children) for n in _walk(tree) if isinstance(getattr(n, "children", None), str))


@needs_samples
@pytest.mark.parametrize("page, run, layer", [
    ("utilization", "collapse", 1),   # the worst health: collapse FAILs, and worst in layer 1
    ("collapse", "collapse", 1),
    ("similarity", "upcycled", None),  # the only run with expert snapshots
    ("tokens", "collapse", 1),        # every demo run keeps token-level rows: the worst one
])
def test_pages_open_on_the_run_worth_seeing(sample_app: Any, page: str, run: str, layer: int | None) -> None:
    tree = _page(sample_app, page)
    assert _control(tree, "run") == run
    if layer is not None:
        assert _control(tree, "layer") == layer
    # a URL that names a run keeps it
    assert _control(_page(sample_app, page, run="balanced"), "run") == "balanced"


@needs_samples
def test_drift_opens_english_to_code_like_the_demo(sample_app: Any) -> None:
    tree = _page(sample_app, "drift")
    assert (_control(tree, "b_run"), _control(tree, "b_tag")) == ("shift", "english")
    assert (_control(tree, "c_run"), _control(tree, "c_tag")) == ("shift", "code")
    assert "Baseline: shift · tag english   →   current: shift · tag code" in _text(tree)
    assert sample_app.moescope_data.baseline_tags("shift") == ["english", "code"]


@needs_samples
def test_similarity_shows_first_and_later_snapshot_with_clones_per_snapshot(sample_app: Any) -> None:
    tree = _page(sample_app, "similarity")
    graphs = {n.id: n.figure for n in _walk(tree) if type(n).__name__ == "Graph"}
    first, later = graphs["sim-first"], graphs["sim-later"]
    assert first["layout"]["title"]["text"].startswith("Step 0:")
    assert later["layout"]["title"]["text"].startswith("Step 120:")
    table = next(n for n in _walk(tree) if getattr(n, "id", None) == "sim-clones")
    steps = {(r["step"], r["layer"]): r for r in table.data}
    assert {s for s, _ in steps} == {0, 60, 120}
    # upcycled experts are clones at the first snapshot: every pair of 16 experts, in every layer
    assert all(steps[(0, layer)]["clone_pairs"] == 120 for layer in (0, 1))
    assert steps[(120, 0)]["clone_pairs"] < 120
    # the default metric is the clones rule's first; each title counts the cells its heatmap outlines
    assert first["layout"]["title"]["text"] == "Step 0: subspace overlap · 120 pairs above 0.8"
    n_later = int(later["layout"]["title"]["text"].split("· ")[1].split(" pair")[0])
    assert 0 < n_later <= steps[(120, 0)]["clone_pairs"]
    assert len(later["layout"].get("shapes", [])) == 2 * n_later  # both triangles outlined


@needs_samples
@pytest.mark.parametrize("page", ["utilization", "collapse", "similarity", "tokens", "drift"])
def test_typo_in_url_run_is_said_not_silent(sample_app: Any, page: str) -> None:
    tree = _page(sample_app, page, run="colapse")
    text = _text(tree)
    assert "This trace has no run 'colapse'" in text and "balanced, collapse, shift, upcycled" in text


@needs_samples
@pytest.mark.parametrize("query, says", [
    ({"b_tag": "englsh"}, "The baseline tag 'englsh' is not in run shift (tags: untagged, code, english)"),
    ({"b_run": "collapse", "b_tag": "english"}, "The baseline tag 'english' is not in run collapse (tags: untagged)"),
    ({"c_run": "shift", "c_tag": "cdoe"}, "The current tag 'cdoe' is not in run shift (tags: untagged, code, english)"),
    ({"b_run": "shfit"}, "The baseline run 'shfit' is not in this trace"),
])
def test_typo_in_drift_selection_compares_nothing(sample_app: Any, query: dict[str, str], says: str) -> None:
    tree = _page(sample_app, "drift", **query)
    assert says in _text(tree)
    ids = {str(getattr(n, "id", None)) for n in _walk(tree)}
    assert "drift-bars" not in ids and "drift-table" not in ids  # no empty comparison that reads as "no drift"


def test_url_state_defaults_and_notices() -> None:
    S = glue.state
    runs, layers, ranges = ["a", "b", "c"], {"a": [0, 1], "b": [0, 1], "c": [0, 1]}, {r: (0, 99) for r in "abc"}
    got = S.resolve(S.ViewState(), runs, layers, ranges, prefer=["c", "a"], prefer_layer={"c": 1})
    assert got == S.ViewState("c", 1)
    assert S.resolve(S.ViewState("a"), runs, layers, ranges, prefer=["c"], prefer_layer={"c": 1}) == S.ViewState("a", 0)
    asked = S.ViewState("zz", 5, (500, 600))
    assert "no run 'zz'" in S.explain(asked, got, runs, layers, ranges)
    assert "has no layer 5" in S.explain(S.ViewState("c", 5), S.ViewState("c", 1), runs, layers, ranges)
    assert "outside run c's steps 0–99" in S.explain(S.ViewState("c", 1, (500, 600)), S.ViewState("c", 1), runs,
                                                      layers, ranges)
    assert S.explain(S.ViewState(), got, runs, layers, ranges) is None
    # a URL without a run: the controls show the page's default run and layer, and changing another control keeps
    # them (instead of jumping back to the first run)
    assert S.merge_controls(S.ViewState(), {"run": "c", "layer": 1}) == S.ViewState("c", 1)
    assert S.to_query(got.with_(notice="x")) == "?run=c&layer=1"  # the notice never reaches a link

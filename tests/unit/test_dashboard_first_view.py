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

"""Caches finer than the trace's data version: a flush appended to one run recomputes only what reads that run.

Every comparison is against a fresh open of the same files (the answer the cache must give), on hand-built
runs: `a` is being written, `b` is finished.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from trace_helpers import layer_spec, routing_frame, stats_frame

import moescope
from moescope.analysis import drift as drift_mod
from moescope.analysis.live import sequence_units, version_of
from moescope.analysis.selection import Selection
from moescope.config import HealthConfig
from moescope.dashboard.data import DashboardData
from moescope.format.writer import write_run

N, K, LAYERS = 4, 2, (0, 1)
SPECS = [layer_spec(layer, N, K) for layer in LAYERS]


def _tables(steps: range, seed: int, tags: tuple[str, ...] = ("base", "cur"), seqs: int = 3, seq_len: int = 6,
            skew: float = 0.0) -> dict[str, pd.DataFrame]:
    """Routing of `seqs` sequences per step × tag and the matching expert_load and router_stats."""
    rng = np.random.default_rng(seed)
    rows, load = [], {}
    for step in steps:
        for tag in tags:
            for seq in range(seqs):
                for layer in LAYERS:
                    p = rng.dirichlet(np.full(N, 5.0))
                    p[0] += skew
                    p /= p.sum()
                    for pos in range(seq_len):
                        ex = [int(e) for e in rng.choice(N, size=K, replace=False, p=p)]
                        rows.append({"step": step, "tag": tag, "seq": seq, "pos": pos, "layer": layer, "experts": ex})
                        for e in ex:
                            load[(step, tag, layer, e)] = load.get((step, tag, layer, e), 0) + 1
    el = pd.DataFrame([{"step": s, "tag": t, "layer": la, "expert": e, "tokens": c, "prob_sum": 0.0, "weight_sum": 0.0}
                       for (s, t, la, e), c in sorted(load.items())])
    stats = stats_frame([{"step": s, "tag": t, "layer": la, "tokens": seqs * seq_len}
                         for s in steps for t in tags for la in LAYERS])
    return {"routing": routing_frame(rows), "expert_load": el, "router_stats": stats}


@pytest.fixture
def runs(trace_root: Path, make_run: Callable[..., Path]) -> dict[str, Path]:
    return {"a": make_run("a", layers=SPECS, **_tables(range(0, 6), seed=1)),
            "b": make_run("b", layers=SPECS, **_tables(range(0, 6), seed=2))}


@pytest.fixture
def data(trace_root: Path, runs: dict[str, Path]) -> Any:
    d = DashboardData(trace_root, config=HealthConfig())
    yield d
    d.close()


def _fresh(root: Path, call: Callable[[moescope.Trace], pd.DataFrame]) -> pd.DataFrame:
    with moescope.open(root) as tr:
        return call(tr)


def _append(run_dir: Path, steps: range, seed: int, **kw: Any) -> None:
    write_run(run_dir, _tables(steps, seed, **kw), run=run_dir.name)


def test_run_versions_move_only_for_the_run_written(data: Any, runs: dict[str, Path]) -> None:
    tr = data.trace
    before_a, before_b = version_of(tr, ["a"]), version_of(tr, ["b"])
    _append(runs["a"], range(6, 8), seed=3)
    assert data.refresh()
    assert version_of(tr, ["a"]) != before_a and version_of(tr, ["b"]) == before_b
    assert version_of(tr, ["b", "a"]) == version_of(tr, ["a", "b"])  # a key, not an order


def test_health_recomputes_only_the_run_written(
    data: Any, runs: dict[str, Path], trace_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real = data.trace.health
    monkeypatch.setattr(data.trace, "health", lambda run=None, config=None: calls.append(run) or real(run, config))
    first = data.health()
    assert calls == [["a", "b"]]  # every run in one pass on the first open
    b_before = data._health_runs["b"][1]
    a_end = int(data.health("a")["window_end"].max())
    pd.testing.assert_frame_equal(first, _fresh(trace_root, lambda t: t.health(config=HealthConfig())))

    # a's recording goes on: a collapsing router (expert 0 takes nearly everything) in the new steps
    _append(runs["a"], range(6, 12), seed=4, skew=50.0)
    assert data.refresh()
    after = data.health()
    assert calls == [["a", "b"], ["a"]]  # b's findings were not recomputed
    assert data._health_runs["b"][1] is b_before  # the very object kept for b
    assert int(data.health("a")["window_end"].max()) == 11 > a_end  # a's windows moved with its new steps
    pd.testing.assert_frame_equal(after, _fresh(trace_root, lambda t: t.health(config=HealthConfig())))
    assert data.health() is after  # nothing new: the assembled frame itself is served
    assert len(calls) == 2


def test_per_run_views_survive_a_flush_to_another_run(data: Any, runs: dict[str, Path]) -> None:
    util_b, util_a = data.utilization("b"), data.utilization("a")
    pair_b = data.drift({"run": "b", "tag": "base"}, {"run": "b", "tag": "cur"})
    _append(runs["a"], range(6, 8), seed=5)
    assert data.refresh()
    assert data.utilization("b") is util_b
    assert data.drift({"run": "b", "tag": "base"}, {"run": "b", "tag": "cur"}) is pair_b
    assert data.utilization("a") is not util_a
    assert data.utilization("a")["assignments"].sum() > util_a["assignments"].sum()


def _drift_fresh(root: Path, base: dict[str, Any], cur: dict[str, Any]) -> pd.DataFrame:
    return _fresh(root, lambda t: t.drift(baseline=base, current=cur))


def test_drift_after_appending_to_the_current_side_equals_a_fresh_one(
    data: Any, runs: dict[str, Path], trace_root: Path
) -> None:
    base, cur = {"run": "b", "tag": "base"}, {"run": "a", "tag": "cur"}
    before = data.drift(base, cur)
    _append(runs["a"], range(6, 9), seed=6, skew=3.0)
    assert data.refresh()
    after = data.drift(base, cur)
    assert (after["n_current"] > before["n_current"]).all()
    pd.testing.assert_frame_equal(after, _drift_fresh(trace_root, base, cur))


def test_a_baseline_change_invalidates_the_threshold(data: Any, runs: dict[str, Path], trace_root: Path) -> None:
    base, cur = {"run": "a", "tag": "base"}, {"run": "b", "tag": "cur"}
    before = data.drift(base, cur)
    _append(runs["a"], range(6, 10), seed=7, skew=2.0)
    assert data.refresh()
    after = data.drift(base, cur)
    assert (after["n_baseline"] > before["n_baseline"]).all() and (after["n_units"] > before["n_units"]).all()
    assert not np.allclose(after["bootstrap"].astype(float), before["bootstrap"].astype(float))
    pd.testing.assert_frame_equal(after, _drift_fresh(trace_root, base, cur))


def test_units_kept_across_flushes_equal_the_raw_rows(data: Any, runs: dict[str, Path], trace_root: Path) -> None:
    """A flush that continues a sequence already on disk (same step, tag, seq) adds to that unit, not a new one."""
    sel = Selection.of({"run": "a", "tag": "base"})
    first = sequence_units(data.trace, sel)
    # step 5 again: its sequences are split across two parts; step 6 is new
    _append(runs["a"], range(5, 7), seed=8, tags=("base",))
    assert data.refresh()
    kept = sequence_units(data.trace, sel)
    assert kept["unit"].max() == first["unit"].max() + 3  # 3 new sequences (step 6), step 5's are continued
    with moescope.open(trace_root) as tr:
        fresh = sequence_units(tr, sel)
        cols = ["unit", "layer", "expert", "c"]
        pd.testing.assert_frame_equal(kept.sort_values(cols).reset_index(drop=True),
                                      fresh.sort_values(cols).reset_index(drop=True))
        # per sequence, the kept rows sum to the analysis's own SQL over the raw rows (step 5 across both parts)
        raw = tr.cursor().execute(
            "SELECT rank, step, tag, seq, CAST(layer AS BIGINT) AS layer, CAST(e AS BIGINT) AS expert, "
            "CAST(COUNT(*) AS DOUBLE) AS c FROM routing, UNNEST(experts) AS u(e) WHERE run = 'a' AND tag = 'base' "
            "GROUP BY ALL").df()
    assert _per_unit(kept, ["unit"]) == _per_unit(raw, ["rank", "step", "tag", "seq"])
    # the bootstrap sums a split sequence's rows: the same drift as from one summed row per unit × layer × expert
    summed = kept.groupby(["unit", "layer", "expert"], as_index=False)["c"].sum()
    con = data.trace.cursor()
    cur = Selection.of({"run": "b", "tag": "cur"})
    pd.testing.assert_frame_equal(drift_mod.drift(con, sel, con, cur, baseline_units=kept),
                                  drift_mod.drift(con, sel, con, cur, baseline_units=summed))
    pd.testing.assert_frame_equal(data.drift({"run": "a", "tag": "base"}, {"run": "b", "tag": "cur"}),
                                  _drift_fresh(trace_root, {"run": "a", "tag": "base"}, {"run": "b", "tag": "cur"}))


def _per_unit(df: pd.DataFrame, key: list[str]) -> list[tuple[tuple[int, int, float], ...]]:
    """Each unit's summed (layer, expert, c) cells, as a sorted list over units (ids aside)."""
    g = df.groupby([*key, "layer", "expert"], as_index=False)["c"].sum()
    units = [tuple(sorted((int(r.layer), int(r.expert), float(r.c)) for r in u.itertuples()))
             for _, u in g.groupby(key)]
    return sorted(units)

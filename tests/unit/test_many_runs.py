"""Many runs stay fast: check and whatif issue the same number of SQL statements for 4 runs as for 24.

Wall time on a shared CI machine proves little; the count of statements is what a per-run loop of queries
(each scanning every file of the root) would grow, so it is asserted instead (bench/many_runs.py times it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from many_runs import QueryCounter, build_root  # noqa: E402

import moescope  # noqa: E402
from moescope.analysis import whatif  # noqa: E402
from moescope.check.run import run_check  # noqa: E402


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("many")
    return {n: build_root(base / f"r{n}", n, layers=2, experts=4, steps=6) for n in (4, 24)}


def _count(fn: object) -> int:
    with QueryCounter() as qc:
        fn()  # type: ignore[operator]
    return qc.n


def test_whatif_capacity_queries_do_not_grow_with_runs(roots: dict[int, Path]) -> None:
    counts = {}
    for n, root in roots.items():
        with moescope.open(root) as tr:
            counts[n] = _count(lambda tr=tr: whatif.capacity_drops(tr, factors=(1.0, 1.5)))
    assert counts[4] == counts[24], counts


def test_check_queries_do_not_grow_with_runs(roots: dict[int, Path]) -> None:
    counts = {n: _count(lambda root=root: run_check(root)) for n, root in roots.items()}
    assert counts[4] == counts[24], counts


def test_capacity_of_all_runs_at_once_equals_each_run_alone(roots: dict[int, Path]) -> None:
    with moescope.open(roots[4]) as tr:
        together = whatif.capacity_drops(tr, factors=(1.0, 1.5))
        assert sorted(together["run"].unique()) == [f"run-{i:04d}" for i in range(4)]
        assert len(together) == 4 * 2 * 2  # runs × layers × factors (window "all")
        for run in tr.runs:
            alone = whatif.capacity_drops(tr, run=run, factors=(1.0, 1.5))
            mine = together[together["run"] == run].reset_index(drop=True)
            pd.testing.assert_frame_equal(mine, alone)
        # run-0000 routes 90% to two of four experts: at capacity factor 1.0 it drops, the balanced ones barely
        at1 = together[together["capacity_factor"] == 1.0].groupby("run")["drop_rate"].mean()
        assert at1["run-0000"] > 0.3 > at1["run-0001"]


def test_dashboard_defaults_queries_do_not_grow_with_runs(roots: dict[int, Path]) -> None:
    """What every page computes before drawing: the run it opens on, the selection context, the Drift pair."""
    pytest.importorskip("dash")
    from moescope.dashboard.components import preferred_runs
    from moescope.dashboard.data import DashboardData

    counts = {}
    for n, root in roots.items():
        data = DashboardData(root)
        try:
            def views(data: DashboardData = data) -> None:
                for prefer in ("health", "snapshots", "tags", "routing"):
                    preferred_runs(data, prefer)  # type: ignore[arg-type]
                data.context()
                data.default_drift()
            counts[n] = _count(views)
            ranked, _ = preferred_runs(data, "health")
            assert ranked[0] == "run-0000"  # a collapsing run (every third) opens first, as on a small root
        finally:
            data.close()
    assert counts[4] == counts[24], counts


def _token_root(base: Path, n_runs: int) -> Path:
    """Runs of 2 layers × 4 experts with token rows on 2 ranks (run i's requests cycle with period i + 1)."""
    from trace_helpers import layer_spec, load_frame, routing_frame

    from moescope.format.writer import write_run

    for i in range(n_runs):
        for rank in (0, 1):
            rows = [{"step": s, "layer": ly, "pos": p, "experts": [(p // (i + 1) + rank) % 4, (p + 2) % 4]}
                    for s in range(2) for ly in (0, 1) for p in range(12)]
            write_run(base / f"run-{i:04d}", {"expert_load": load_frame([(s, ly, [6, 6, 6, 6]) for s in range(2)
                                                                         for ly in (0, 1)]),
                                              "routing": routing_frame(rows)},
                      run=f"run-{i:04d}", layers=[layer_spec(0, 4, 2), layer_spec(1, 4, 2)], rank=rank)
    return base


def test_cache_whatif_is_one_query_and_equals_each_run_alone(tmp_path: Path) -> None:
    counts = {}
    for n in (2, 6):
        with moescope.open(_token_root(tmp_path / f"t{n}", n)) as tr:
            counts[n] = _count(lambda tr=tr: whatif.cache_hit_rates(tr, sizes=[1, 2]))
    assert counts[2] == counts[6], counts
    with moescope.open(tmp_path / "t6") as tr:
        together = whatif.cache_hit_rates(tr, sizes=[1, 2], policies=["lru"])
        assert len(together) == 6 * 2 * 2  # runs × layers × sizes
        for run in ("run-0000", "run-0003"):
            alone = whatif.cache_hit_rates(tr, run=run, sizes=[1, 2], policies=["lru"], layer=1)
            mine = together[(together["run"] == run) & (together["layer"] == 1)].reset_index(drop=True)
            pd.testing.assert_frame_equal(mine, alone)
        # 48 tokens per run-layer (2 ranks × 2 steps × 12 positions), each rank replaying its own cache
        assert set(together["tokens"]) == {48}

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

"""Trace(materialize=...): in-memory tables give the same answers as views over the files, follow refresh()
exactly (appended parts, a vanished or rewritten part), and stay read-only to the locked console."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

import moescope
from moescope.analysis.console import QueryError
from moescope.analysis.trace import Trace
from moescope.format.writer import write_run

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
LAYERS = [layer_spec(0, 4, 2)]
TABLES = ("expert_load", "router_stats", "routing", "alerts", "expert_spectra", "expert_similarity")


def _load(steps: range, skew: int = 0) -> pd.DataFrame:
    return load_frame([(s, 0, [100 + skew * s, 100, 60, 140 - skew * s]) for s in steps])


def _stats(steps: range) -> pd.DataFrame:
    return stats_frame([{"step": s, "layer": 0, "tokens": 200} for s in steps])


def _kind(tr: Trace, name: str) -> str:
    tables = {r[0] for r in tr.con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    return "table" if name in tables else "view"


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    # row order is not part of these results (parallel scans): compare them in one order
    keys = [c for c in df.columns if df[c].map(lambda v: isinstance(v, (str, int, float))).all()]
    return df.sort_values(keys).reset_index(drop=True)


def _same(a: Trace, b: Trace) -> None:
    for q in ("SELECT * FROM expert_load", "SELECT * FROM router_stats", "SELECT * FROM assignments",
              "SELECT run, layer, count(*) AS n FROM routing GROUP BY ALL"):
        pd.testing.assert_frame_equal(_sorted(a.query(q)), _sorted(b.query(q)))
    for t in TABLES:  # same columns, same types
        assert a.sql(f"SELECT * FROM {t} LIMIT 0").types == b.sql(f"SELECT * FROM {t} LIMIT 0").types, t
    pd.testing.assert_frame_equal(_sorted(a.health()), _sorted(b.health()))
    pd.testing.assert_frame_equal(_sorted(a.load_metrics(window="all")), _sorted(b.load_metrics(window="all")))


def test_sample_traces_answer_the_same_either_way() -> None:
    with moescope.open(SAMPLES, materialize=True) as m, moescope.open(SAMPLES, materialize=False) as v:
        assert all(_kind(m, t) == "table" for t in TABLES)
        assert all(_kind(v, t) == "view" for t in TABLES)
        _same(m, v)


def test_auto_threshold(trace_root: Path, make_run: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    make_run("a", layers=LAYERS, expert_load=_load(range(3)), router_stats=_stats(range(3)))
    with moescope.open(trace_root) as tr:
        assert _kind(tr, "expert_load") == "table"  # a few KB: loaded
    monkeypatch.setattr("moescope.analysis.trace.MATERIALIZE_BYTES", 10)
    with moescope.open(trace_root) as tr:
        assert _kind(tr, "expert_load") == "view"  # past the threshold: views over the files
    with pytest.raises(moescope.TraceError, match="materialize must be"):
        moescope.open(trace_root, materialize="yes")


def test_refresh_after_a_new_part_equals_a_fresh_open(trace_root: Path, make_run: Callable[..., Path]) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 3), 1), router_stats=_stats(range(0, 3)))
    tr = moescope.open(trace_root, materialize=True)
    write_run(run_dir, {"expert_load": _load(range(3, 6), 1), "router_stats": _stats(range(3, 6))}, run="a")
    make_run("b", layers=LAYERS, expert_load=_load(range(0, 2)))
    assert tr.refresh() is True
    assert tr.sql("SELECT count(*) FROM expert_load").fetchall()[0][0] == (6 + 2) * 4
    with moescope.open(trace_root, materialize=True) as fresh, moescope.open(trace_root, materialize=False) as v:
        _same(tr, fresh)
        _same(tr, v)
    assert tr.refresh() is False
    tr.close()


def test_a_vanished_part_rebuilds_its_table(trace_root: Path, make_run: Callable[..., Path]) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 3)))
    write_run(run_dir, {"expert_load": _load(range(3, 5))}, run="a")
    tr = moescope.open(trace_root, materialize=True)
    assert tr.sql("SELECT count(DISTINCT step) FROM expert_load").fetchall()[0][0] == 5
    parts = sorted((run_dir / "expert_load").glob("part-*.parquet"))
    assert len(parts) == 2
    parts[0].unlink()  # set aside (a torn flush) or compacted away
    assert tr.refresh() is True
    steps = [r[0] for r in tr.sql("SELECT DISTINCT step FROM expert_load ORDER BY step").fetchall()]
    assert steps == [3, 4]
    with moescope.open(trace_root, materialize=False) as v:
        _same(tr, v)
    tr.close()


def test_a_rewritten_part_rebuilds_its_table(
    trace_root: Path, make_run: Callable[..., Path], tmp_path: Path
) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 3)))
    tr = moescope.open(trace_root, materialize=True)
    other = tmp_path / "other" / "a"
    write_run(other, {"expert_load": _load(range(0, 7))}, run="a", layers=LAYERS)
    part = next((run_dir / "expert_load").glob("part-*.parquet"))
    shutil.copyfile(next((other / "expert_load").glob("part-*.parquet")), part)  # same name, new content
    tr._create_views()  # what refresh() does once a listing changed
    assert tr.sql("SELECT count(DISTINCT step) FROM expert_load WHERE run = 'a'").fetchall()[0][0] == 7
    tr.close()


def test_locked_console_cannot_modify_materialized_tables(trace_root: Path, make_run: Callable[..., Path]) -> None:
    make_run("a", layers=LAYERS, expert_load=_load(range(0, 3)), router_stats=_stats(range(0, 3)))
    tr = moescope.open(trace_root, locked=True, materialize=True)
    assert _kind(tr, "expert_load") == "table"
    before = tr.query("SELECT * FROM expert_load")
    for q in ("DELETE FROM expert_load", "UPDATE expert_load SET count = 0",
              "INSERT INTO expert_load SELECT * FROM expert_load", "DROP TABLE expert_load",
              "WITH x AS (DELETE FROM expert_load RETURNING *) SELECT * FROM x",
              "SELECT * FROM (DELETE FROM expert_load RETURNING *)", "TRUNCATE expert_load"):
        with pytest.raises(QueryError):
            tr.sql(q)
    pd.testing.assert_frame_equal(tr.query("SELECT * FROM expert_load"), before)
    tr.close()

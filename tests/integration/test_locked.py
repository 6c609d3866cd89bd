"""Locked mode (the dashboard's SQL console): read-only, no file access outside the trace, row and time limits."""

from __future__ import annotations

import time

import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

from moescope.analysis.trace import QueryError, Trace


@pytest.fixture
def locked(make_run, trace_root):
    make_run("a", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(s, 0, [1, 2, 3, 4]) for s in range(30)]),
             router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": 5}]))
    return Trace(trace_root, locked=True, max_rows=50, timeout=1.0)


def _still_answers(tr: Trace) -> None:
    assert tr.query("SELECT count(*) AS n FROM expert_load")["n"].iloc[0] == 120


def test_select_works_and_rows_are_capped(locked):
    _still_answers(locked)
    df = locked.query("SELECT * FROM expert_load")
    assert len(df) == 50 and df.attrs["truncated"] is True
    assert locked.last_truncated
    small = locked.query("SELECT run FROM runs")
    assert small.attrs["truncated"] is False
    assert locked.sql("SELECT 1 AS x").df()["x"].tolist() == [1]


@pytest.mark.parametrize(
    "query, needle",
    [
        ("COPY (SELECT 1) TO '/tmp/moescope-locked-test.csv'", "COPY"),
        ("COPY expert_load TO 'x.parquet'", "COPY"),
        ("ATTACH '/tmp/moescope-locked.db' AS other", "ATTACH"),
        ("INSTALL httpfs", "LOAD"),
        ("LOAD httpfs", "LOAD"),
        ("SET threads = 1", "SET"),
        ("PRAGMA enable_profiling", "PRAGMA"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("DROP VIEW expert_load", "DROP"),
        ("SELECT 1; SELECT 2", "one statement"),
    ],
)
def test_non_select_statements_are_refused(locked, query, needle):
    with pytest.raises(QueryError, match=needle) as e:
        locked.sql(query)
    assert "\n" not in str(e.value)
    _still_answers(locked)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM read_parquet('/usr/**/*.parquet')",
        "SELECT * FROM read_csv('http://example.com/x.csv')",
    ],
)
def test_files_outside_the_trace_are_refused(locked, query):
    with pytest.raises(QueryError, match="refused|Permission|disabled"):
        locked.sql(query)
    _still_answers(locked)


def test_path_traversal_out_of_the_root_is_refused(locked, trace_root):
    with pytest.raises(QueryError, match="refused"):
        locked.sql(f"SELECT * FROM read_text('{trace_root}/a/../../../../etc/hostname')")
    _still_answers(locked)


def test_files_inside_the_trace_are_read_through_the_views_only(locked, trace_root):
    # the views are built from the file list, so user SQL never needs a file function, not even for the trace
    part = next((trace_root / "a" / "expert_load").glob("*.parquet"))
    with pytest.raises(QueryError, match=r"read_parquet\(\) is not available in the console: query the views"):
        locked.sql(f"SELECT * FROM read_parquet('{part}')")
    assert len(locked.query("SELECT * FROM expert_load")) == 50


def test_endless_queries_are_stopped(locked):
    for q in (
        "WITH RECURSIVE t(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM t) SELECT count(*) FROM t",
        "SELECT count(*) FROM range(100000000) a, range(100000000) b",
    ):
        t0 = time.monotonic()
        with pytest.raises(QueryError, match="time limit"):
            locked.sql(q)
        assert time.monotonic() - t0 < 10
        _still_answers(locked)


def test_settings_cannot_be_changed_via_functions(locked):
    with pytest.raises(QueryError):
        locked.sql("SELECT * FROM read_csv_auto('~/.bashrc')")
    # the configuration is locked even if a statement slipped through the allow-list
    with pytest.raises(Exception, match="locked"):
        locked.con.execute("SET enable_external_access = true")
    _still_answers(locked)


def test_metrics_still_work_when_locked(locked):
    lm = locked.load_metrics(run="a", window="all")
    assert len(lm) == 1

"""Trace discovery, views, typed empty views, multi-root, and one-line errors for broken traces."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trace_helpers import layer_spec, load_frame, routing_frame, stats_frame

import moescope
from moescope.analysis.trace import VIEWS, Trace
from moescope.format.schema import duckdb_columns
from moescope.format.writer import TraceError


@pytest.fixture
def two_runs(make_run, trace_root):
    make_run("a", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(0, 0, [1, 2, 3, 4])]),
             router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": 5}]),
             routing=routing_frame([{"experts": [0, 1], "weights": [0.75, 0.25]}, {"pos": 1, "experts": [3, 2]}]))
    # rank 1 of run a writes its own parts and manifest
    make_run("a", rank=1, expert_load=load_frame([(0, 0, [10, 0, 0, 0])]))
    make_run("nested/b", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(5, 0, [4, 4, 4, 4])]))
    return trace_root


def test_views_runs_and_ranks(two_runs):
    tr = moescope.open(two_runs)
    assert sorted(tr.runs) == ["a", "nested/b"]
    assert set(VIEWS) <= set(tr.views())
    el = tr.sql("SELECT run, rank, sum(tokens) FROM expert_load GROUP BY ALL ORDER BY ALL").fetchall()
    assert el == [("a", 0, 10), ("a", 1, 10), ("nested/b", 0, 16)]
    runs = tr.sql("SELECT run, rank, n_layers, model_class FROM runs ORDER BY run, rank").fetchall()
    assert runs == [("a", 0, 1, "hand-built"), ("a", 1, 0, "hand-built"), ("nested/b", 0, 1, "hand-built")]
    # a run directory opens on its own
    assert Trace(two_runs / "a").runs == ["a"]


def test_assignments_view_unnests_slots(two_runs):
    tr = moescope.open(two_runs)
    rows = tr.sql("SELECT pos, slot, expert, weight FROM assignments ORDER BY pos, slot").fetchall()
    assert rows == [(0, 0, 0, 0.75), (0, 1, 1, 0.25), (1, 0, 3, 0.5), (1, 1, 2, 0.5)]


def test_empty_tables_are_typed_views(make_run, trace_root):
    make_run("only_load", expert_load=load_frame([(0, 0, [1, 1])]))
    tr = moescope.open(trace_root)
    for table in ("routing", "expert_similarity", "expert_spectra", "router_stats"):
        cols = [(c, t) for c, t in tr.views()[table]]
        assert cols == duckdb_columns(table)
        assert tr.sql(f"SELECT count(*) FROM {table}").fetchall() == [(0,)]
    assert tr.sql("SELECT count(*) FROM assignments").fetchall() == [(0,)]


def test_missing_column_in_older_file_is_null(trace_root):
    run = trace_root / "old"
    moescope.format.writer.write_run(run, {"router_stats": stats_frame([{"step": 0, "layer": 0, "tokens": 3}])}, run="old")
    # rewrite the part without lse_max, as an older writer might have
    part = next((run / "router_stats").glob("*.parquet"))
    t = pq.read_table(part).drop_columns(["lse_max"])
    pq.write_table(t, part)
    tr = moescope.open(trace_root)
    assert tr.sql("SELECT tokens, lse_max FROM router_stats").fetchall() == [(3, None)]


def test_several_roots_and_name_clash(tmp_path, make_run):
    make_run("x", root=tmp_path / "r1", expert_load=load_frame([(0, 0, [1])]))
    make_run("y", root=tmp_path / "r2", expert_load=load_frame([(0, 0, [2])]))
    tr = Trace([tmp_path / "r1", tmp_path / "r2"])
    assert sorted(tr.runs) == ["x", "y"]
    make_run("x", root=tmp_path / "r3", expert_load=load_frame([(0, 0, [3])]))
    with pytest.raises(TraceError, match="appears twice"):
        Trace([tmp_path / "r1", tmp_path / "r3"])


def test_empty_root_and_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="no moescope runs"):
        Trace(tmp_path / "empty")
    with pytest.raises(TraceError, match="no such trace root"):
        Trace(tmp_path / "nope")


def test_manifest_without_data_is_empty_trace(tmp_path):
    moescope.format.writer.write_manifest(tmp_path / "r" / "run", {"run": "run"})
    with pytest.raises(TraceError, match="empty trace"):
        Trace(tmp_path / "r")


def test_truncated_parquet_names_the_file(two_runs):
    part = next((two_runs / "a" / "expert_load").glob("part-0-*.parquet"))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError) as e:
        Trace(two_runs)
    msg = str(e.value)
    assert str(part) in msg and "\n" not in msg


def test_garbage_parquet_names_the_file(two_runs):
    part = two_runs / "nested" / "b" / "routing" / "part-0-000009.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"not parquet at all")
    with pytest.raises(TraceError, match="part-0-000009.parquet"):
        Trace(two_runs)


def test_bad_manifest_names_the_file(two_runs):
    m = two_runs / "a" / "manifest.rank-1.json"
    m.write_text("{ broken")
    with pytest.raises(TraceError, match="manifest.rank-1.json"):
        Trace(two_runs)
    m.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TraceError, match="not a moescope trace manifest"):
        Trace(two_runs)


def test_newer_format_version_in_file_is_refused(trace_root):
    run = trace_root / "future"
    moescope.format.writer.write_run(run, {"expert_load": load_frame([(0, 0, [1])])}, run="future")
    part = next((run / "expert_load").glob("*.parquet"))
    t = pq.read_table(part)
    pq.write_table(t.replace_schema_metadata({b"moescope.format_version": b"99"}), part)
    with pytest.raises(TraceError, match="newer"):
        Trace(trace_root)


def test_selection_filters(two_runs):
    tr = moescope.open(two_runs)
    u = tr.utilization(run="nested/b")
    assert set(u["run"]) == {"nested/b"} and pd.api.types.is_float_dtype(u["utilization"])
    assert tr.utilization(run="a", steps=(100, 200)).empty
    assert isinstance(pa.Table, type)


def test_top_k_from_routing_when_manifest_and_stats_are_silent(make_run, trace_root):
    make_run("r", expert_load=load_frame([(0, 0, [3, 3, 0])]),
             routing=routing_frame([{"pos": i, "experts": [i % 2, 1 - i % 2]} for i in range(3)]))
    tr = moescope.open(trace_root)
    assert tr.sql("SELECT n_experts, top_k FROM layer_info").fetchall() == [(3, 2)]


def test_metrics_from_several_threads(two_runs):
    from concurrent.futures import ThreadPoolExecutor

    tr = moescope.open(two_runs)
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: len(tr.load_metrics(window="all")), range(8)))
    assert len(set(results)) == 1 and results[0] > 0


def test_corrupt_data_pages_name_the_file(make_run, trace_root):
    rows = [(s, 0, [(s * 7 + e * 13) % 1000 for e in range(8)]) for s in range(2000)]
    make_run("c", layers=[layer_spec(0, 8, 2)], expert_load=load_frame(rows))
    part = next((trace_root / "c" / "expert_load").glob("*.parquet"))
    data = bytearray(part.read_bytes())
    data[200 : len(data) // 2] = b"\x55" * (len(data) // 2 - 200)  # footer intact, pages garbage
    part.write_bytes(bytes(data))
    with pytest.raises(TraceError) as e:
        Trace(trace_root).load_metrics()
    assert str(part) in str(e.value) and "\n" not in str(e.value)


def test_sums_of_counts_are_integers(two_runs, capsys):
    """sum(BIGINT) is HUGEINT in DuckDB (float64 in pandas, 27685.0): tr.sql, locked query and `moescope sql` cast it."""
    from moescope.cli import main

    q = "SELECT layer, sum(tokens) AS n, count(*) AS rows_ FROM expert_load GROUP BY ALL ORDER BY ALL"
    df = moescope.open(two_runs).sql(q).df()
    assert str(df["n"].dtype) == "int64"
    expected = moescope.open(two_runs).sql("SELECT CAST(sum(tokens) AS BIGINT) FROM expert_load").fetchall()[0][0]
    assert int(df["n"].sum()) == expected
    assert str(moescope.open(two_runs, locked=True).query(q)["n"].dtype) == "int64"
    assert main(["sql", str(two_runs), "SELECT sum(tokens) AS n FROM expert_load", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["n", str(expected)]  # no ".0"


def test_damage_after_open_is_found_when_duckdb_trips_on_it(make_run, trace_root):
    """A part damaged after the trace was opened (and verified): DuckDB's error is traced back to the file."""
    rows = [(s, 0, [(s * 7 + e * 13) % 1000 for e in range(8)]) for s in range(2000)]
    make_run("c", layers=[layer_spec(0, 8, 2)], expert_load=load_frame(rows))
    tr = Trace(trace_root, materialize=False)  # a materialized table was read (and verified) at open
    part = next((trace_root / "c" / "expert_load").glob("*.parquet"))
    data = bytearray(part.read_bytes())
    data[200 : len(data) // 2] = b"\x55" * (len(data) // 2 - 200)
    part.write_bytes(bytes(data))
    with pytest.raises(TraceError) as e:
        tr.load_metrics()
    assert str(e.value).startswith(f"{part}: corrupt Parquet data") and "\n" not in str(e.value)

"""`moescope sql` and `moescope report` through the CLI entry point."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

from moescope.cli import main


@pytest.fixture
def trace(make_run, trace_root):
    counts = {0: [250, 250, 250, 250], 1: [500, 300, 100, 100], 2: [900, 100, 0, 0]}
    make_run("a", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(s, 0, c) for s, c in counts.items()]),
             router_stats=stats_frame({"step": s, "layer": 0, "tokens": 500, "lse_sq_sum": 500.0} for s in counts))
    return trace_root


def test_sql_lists_views(trace, capsys):
    assert main(["sql", str(trace)]) == 0
    out = capsys.readouterr().out
    for view in ("expert_load", "router_stats", "routing", "assignments", "expert_similarity", "expert_spectra",
                 "runs", "layer_info"):
        assert f"\n{view} (" in "\n" + out
    assert "prob_sum" in out and "SMALLINT[]" in out


def test_sql_formats(trace, capsys, tmp_path):
    q = "SELECT expert, CAST(sum(tokens) AS BIGINT) AS t FROM expert_load GROUP BY expert ORDER BY expert"
    assert main(["sql", str(trace), q]) == 0
    table = capsys.readouterr().out
    assert "expert" in table and "1650" in table
    assert main(["sql", str(trace), q, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["expert,t", "0,1650"]
    assert main(["sql", str(trace), q, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[3] == {"expert": 3, "t": 350}
    out = tmp_path / "r.parquet"
    assert main(["sql", str(trace), q, "--format", "parquet", "-o", str(out)]) == 0
    assert pq.read_table(out).num_rows == 4


def test_sql_errors_are_one_line(trace, capsys, tmp_path):
    assert main(["sql", str(trace), "SELECT * FROM nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moescope: error: SQL error") and err.count("\n") == 1
    assert main(["sql", str(trace), "SELECT 1", "--format", "parquet"]) == 2
    assert main(["sql", str(tmp_path / "missing")]) == 3
    assert "no such trace root" in capsys.readouterr().err


def test_report(trace, capsys):
    assert main(["report", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "run a" in out and "latest window per layer (steps 2–2)" in out
    assert "FAIL  collapse" in out and "FAIL  dead_expert" in out
    assert main(["report", str(trace), "--window", "all"]) == 0
    assert "FAIL  collapse" not in capsys.readouterr().out  # the whole-run average hides it, by request
    assert main(["report", str(trace), "--run", "zz"]) == 2

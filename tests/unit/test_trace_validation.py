"""Traces are validated, not believed (issue 18 item 2): checks at open, from the footer, naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trace_helpers import layer_spec, load_frame, routing_frame, stats_frame

import moescope
from moescope.cli import main
from moescope.format.manifest import TraceError
from moescope.format.schema import EXPERT_LOAD, META_KEY

N = 4


def _good(root: Path) -> Path:
    return moescope.format.writer.write_run(
        root / "r", {"expert_load": load_frame([(s, 0, [3, 2, 1, 2]) for s in range(4)]),
                     "router_stats": stats_frame([{"step": s, "layer": 0, "tokens": 4} for s in range(4)]),
                     "routing": routing_frame([{"pos": i, "experts": [i % N, (i + 1) % N]} for i in range(4)])},
        run="r", layers=[layer_spec(0, N, 2)])


def _replace_part(run: Path, table: str, df: pd.DataFrame, schema: pa.Schema | None = None) -> Path:
    """Overwrite the run's first `table` part with `df` (bypassing the writer's cast, as a foreign tool would)."""
    part = sorted((run / table).glob("*.parquet"))[0]
    tbl = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    pq.write_table(tbl.replace_schema_metadata({META_KEY: b"1"}), part)
    return part


def _load(**changes: object) -> pd.DataFrame:
    df = load_frame([(0, 0, [3, 2, 1, 2])])
    df.insert(0, "run", "r")
    df.insert(1, "rank", 0)
    for k, v in changes.items():
        df[k] = v
    return df


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "run name differs": (lambda run: _replace_part(run, "expert_load", _load(run="other"), EXPERT_LOAD),
                         "rows of run 'other' in run 'r'"),
    "expert id >= n_experts": (lambda run: _replace_part(run, "expert_load", _load(expert=[0, 1, 2, 66]), EXPERT_LOAD),
                               "expert id 66 in column 'expert' is outside [0, 4)"),
    "negative expert id": (lambda run: _replace_part(run, "expert_load", _load(expert=[-1, 1, 2, 3]), EXPERT_LOAD),
                           "expert id -1"),
    "negative tokens": (lambda run: _replace_part(run, "expert_load", _load(tokens=[3, -2, 1, 2]), EXPERT_LOAD),
                        "negative count -2 in column 'tokens'"),
    "NULL tokens": (lambda run: _replace_part(run, "expert_load", _load(tokens=[3, None, 1, 2]), EXPERT_LOAD),
                    "NULL value(s) in count column 'tokens'"),
    "infinite sum": (lambda run: _replace_part(run, "expert_load", _load(prob_sum=[1.0, float("inf"), 0, 0]),
                                               EXPERT_LOAD), "non-finite value (inf) in column 'prob_sum'"),
    "string step": (lambda run: _replace_part(run, "expert_load", _load(step=["0", "0", "x", "0"])),
                    "trace format v1 says int64"),
    "missing column": (lambda run: _replace_part(run, "expert_load", _load().drop(columns=["tokens"])),
                       "without column(s) tokens"),
    "routing id >= n_experts": (
        lambda run: _replace_part(run, "routing", pd.DataFrame(
            [{"run": "r", "rank": 0, **{k: v for k, v in routing_frame([{"experts": [0, 9]}]).iloc[0].items()}}]),
            moescope.format.schema.ROUTING), "expert id 9 in column 'experts'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_violation_is_one_error_naming_the_file(case: str, tmp_path: Path) -> None:
    make, message = CASES[case]
    part = make(_good(tmp_path / "t"))
    with pytest.raises(TraceError) as e:
        moescope.open(tmp_path / "t")
    text = str(e.value)
    assert str(part) in text and message in text and "\n" not in text, text


def test_valid_trace_and_top_k_from_manifest_open(tmp_path: Path) -> None:
    _good(tmp_path / "t")
    tr = moescope.open(tmp_path / "t")
    assert tr.sql("SELECT n_experts, top_k FROM layer_info").fetchall() == [(N, 2)]


@pytest.mark.parametrize("command", [["check"], ["report"], ["sql"]])
def test_violation_exits_3_from_the_cli(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CASES["expert id >= n_experts"][0](_good(tmp_path / "t"))
    assert main([command[0], str(tmp_path / "t")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside [0, 4)" in err


def test_a_duplicated_part_is_refused(tmp_path: Path) -> None:
    """A copied part would double every count and still PASS: it is an error naming both files."""
    import shutil

    run = _good(tmp_path / "t")
    part = sorted((run / "expert_load").glob("*.parquet"))[0]
    shutil.copy(part, part.with_name("part-0-000099.parquet"))
    with pytest.raises(TraceError, match=r"part-0-000099.parquet: the same rows as part-0-000000.parquet"):
        moescope.open(tmp_path / "t")


def _second_part(run: Path, table: str, df: pd.DataFrame) -> None:
    """Append `df` as one more part of `table` through the writer (a foreign tool or a buggy resume)."""
    from moescope.format.writer import write_part

    df = df.assign(run="r", rank=0)[list(moescope.format.schema.TABLES[table].names)]
    write_part(run, table, 0, 50, pa.Table.from_pandas(df, preserve_index=False))


def _data_findings(root: Path) -> pd.DataFrame:
    h = moescope.open(root).health()
    return h[h["rule"] == "data"]


def test_a_key_written_twice_is_an_error_finding(tmp_path: Path) -> None:
    """Rows of step 2 copied into another part (not a whole duplicated part) would double step 2: ERROR, exit 1."""
    run = _good(tmp_path / "t")
    _second_part(run, "expert_load", load_frame([(2, 0, [3, 2, 1, 2])]))
    f = _data_findings(tmp_path / "t")
    assert list(f["status"]) == ["ERROR"] and list(f["metric"]) == ["duplicated_expert_load_rows"]
    assert f["value"].iloc[0] == N and "steps 2" in f["message"].iloc[0]
    assert main(["check", str(tmp_path / "t")]) == 1


def test_nan_router_stats_in_a_stats_run_are_an_error_finding(tmp_path: Path) -> None:
    """NaN in one step's lse_sq_sum (footers do not count NaN) must not leave the z-loss mean a step short."""
    run = _good(tmp_path / "t")
    _replace_part(run, "router_stats", stats_frame(
        [{"step": s, "layer": 0, "tokens": 4, "lse_sq_sum": float("nan") if s == 3 else 1.0} for s in range(4)]
    ).assign(run="r", rank=0)[list(moescope.format.schema.ROUTER_STATS.names)], moescope.format.schema.ROUTER_STATS)
    f = _data_findings(tmp_path / "t")
    assert list(f["metric"]) == ["nan_router_stats"] and f["value"].iloc[0] == 1
    assert "steps 3" in f["message"].iloc[0]
    assert main(["check", str(tmp_path / "t")]) == 1


def test_a_clean_trace_has_no_data_findings(tmp_path: Path) -> None:
    _good(tmp_path / "t")
    assert _data_findings(tmp_path / "t").empty

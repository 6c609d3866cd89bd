"""The one error classifier: known answers for each kind of exception a command can end with."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from moescope.analysis.console import QueryError
from moescope.analysis.selection import SelectionError
from moescope.check.run import CheckError
from moescope.config import ConfigError
from moescope.errors import CLIError, as_usage, classify, is_damaged_data
from moescope.format.manifest import TraceError


def _duck(sql: str) -> duckdb.Error:
    with pytest.raises(duckdb.Error) as e:
        duckdb.connect().execute(sql)
    return e.value


@pytest.mark.parametrize(
    ("exc", "code", "start"),
    [
        (TraceError("t/run/manifest.json: not a moescope trace manifest"), 3, "t/run/manifest.json"),
        (CLIError("--port must be between 1 and 65535", 2), 2, "--port"),
        (CLIError("custom", 5), 5, "custom"),
        (ConfigError("moescope.toml: unknown key 'shar'"), 2, "moescope.toml"),
        (SelectionError("--run: no run 'x'"), 2, "--run"),
        (CheckError("bad fail_on"), 2, "bad fail_on"),
        (QueryError("refused: INSERT"), 2, "refused"),
        (OSError("could not verify page integrity, CRC checksum verification failed"), 3, "unreadable trace data"),
        (pa.ArrowInvalid("Parquet magic bytes not found in footer"), 3, "unreadable trace data"),
        (IsADirectoryError(21, "Is a directory", "out"), 2, "out: Is a directory"),
        (ImportError("the dashboard needs dash and plotly: pip install 'moescope[dashboard]'"), 2, "the dashboard"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (BrokenPipeError(), 0, ""),
        (RuntimeError("a bug"), 1, "RuntimeError: a bug"),
    ],
)
def test_known_answers(exc: BaseException, code: int, start: str) -> None:
    f = classify(exc)
    assert f.code == code and f.message.startswith(start) and "\n" not in f.message


def test_duckdb_query_errors_are_usage_and_io_errors_are_damage(tmp_path) -> None:
    for sql in ("SELEC 1", "SELECT * FROM nope", "SELECT 'a'::INT"):
        f = classify(_duck(sql))
        assert f.code == 2 and f.message.startswith("SQL error: "), f
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    e = _duck(f"SELECT * FROM read_parquet('{bad}')")
    assert is_damaged_data(e) and classify(e).code == 3


def test_message_is_one_line() -> None:
    assert classify(TraceError("a\n  b")).message == "a b"


def test_as_usage_keeps_damage_and_usage_codes() -> None:
    """What-ifs raise ValueError for bad arguments (exit 2); a damaged file inside one stays exit 3."""
    assert classify(as_usage(ValueError("factors must be > 0"))).code == 2
    damaged = pa.ArrowInvalid("Parquet magic bytes not found")  # a ValueError too
    assert as_usage(damaged) is damaged and classify(damaged).code == 3

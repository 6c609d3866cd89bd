"""Bad input to the commands (issue 18, item 4, CLI part): one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from moescope.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside the parser
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_sql_output_to_a_directory_is_refused(tmp_path, capsys):
    rc, out, err = _run(["sql", str(SAMPLES / "collapse"), "SELECT 1 AS a", "-o", str(tmp_path)], capsys)
    assert rc == 2 and _one_line(err) == f"moescope: error: -o {tmp_path}: is a directory; give a file name"
    assert list(tmp_path.iterdir()) == [] and out == ""


def test_sql_output_into_a_missing_directory_is_refused(tmp_path, capsys):
    target = tmp_path / "nope" / "x.csv"
    rc, _, err = _run(["sql", str(SAMPLES / "collapse"), "SELECT 1 AS a", "-o", str(target)], capsys)
    assert rc == 2 and "no such directory" in _one_line(err) and not target.parent.exists()


@pytest.mark.parametrize("query, n", [("SELECT 1 AS a; SELECT 2 AS b", 2), ("SELECT 1; SELECT 2; SELECT 3;", 3)])
def test_sql_with_several_statements_is_an_error(capsys, query, n):
    # DuckDB would run them all and print only the last result; one statement per call says what runs
    rc, out, err = _run(["sql", str(SAMPLES / "collapse"), query], capsys)
    assert rc == 2 and out == ""
    assert _one_line(err) == (f"moescope: error: one statement per call, please (got {n}): run them as separate "
                              "`moescope sql` calls")


@pytest.mark.parametrize("query", ["", "   ", "-- only a comment"])
def test_sql_empty_query_is_an_error(capsys, query):
    rc, out, err = _run(["sql", str(SAMPLES / "collapse"), query], capsys)
    assert rc == 2 and out == "" and _one_line(err).startswith("moescope: error: empty query")


def test_sql_one_statement_still_prints(capsys):
    rc, out, _ = _run(["sql", str(SAMPLES / "collapse"), "SELECT 41 + 1 AS answer"], capsys)
    assert rc == 0 and out.split() == ["answer", "42"]


def test_inspect_of_a_callable_that_is_no_model(capsys):
    pytest.importorskip("torch")
    rc, _, err = _run(["inspect", "os:getcwd"], capsys)
    assert rc == 2 and _one_line(err) == "moescope: error: os:getcwd: gave a str, not a torch.nn.Module"
    rc, _, err = _run(["inspect", "os:listdir"], capsys)  # called with no argument: fine, still a list
    assert rc == 2 and _one_line(err).endswith("gave a list, not a torch.nn.Module")
    rc, _, err = _run(["inspect", "json:loads"], capsys)  # needs an argument: the call fails
    assert rc == 2 and _one_line(err).startswith("moescope: error: json:loads: calling it failed (TypeError:")


@pytest.mark.parametrize("factors, needle", [
    ("1,,2", "empty item in '1,,2'"), ("1,", "empty item in '1,'"), ("1,-2", "finite number > 0"),
    ("1,nan", "finite number > 0"), ("1,x", "expected comma-separated numbers"),
])
def test_whatif_factors_are_checked(capsys, factors, needle):
    rc, out, err = _run(["whatif", str(SAMPLES / "collapse"), "capacity", "--factors", factors], capsys)
    assert rc == 2 and out == "" and needle in _one_line(err)


def test_whatif_sizes_empty_item(capsys):
    rc, _, err = _run(["whatif", str(SAMPLES / "collapse"), "cache", "--sizes", "2,,4"], capsys)
    assert rc == 2 and "empty item in '2,,4'" in _one_line(err)


def test_report_window_zero(capsys):
    rc, out, err = _run(["report", str(SAMPLES / "collapse"), "--window", "0"], capsys)
    assert rc == 2 and out == "" and "--window" in _one_line(err)


def test_dashboard_on_a_busy_port(capsys):
    pytest.importorskip("dash")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = _run(["dashboard", str(SAMPLES), "--port", str(port)], capsys)
    assert rc == 2
    assert _one_line(err) == (f"moescope: error: port {port} on 127.0.0.1 is in use (another dashboard?): "
                              "pick another with --port")


def test_dashboard_on_an_unresolvable_host(capsys):
    pytest.importorskip("dash")
    rc, _, err = _run(["dashboard", str(SAMPLES), "--host", "no-such-host.invalid"], capsys)
    assert rc == 2 and _one_line(err).startswith("moescope: error: --host no-such-host.invalid: cannot resolve")

"""Escapes from the locked SQL console (issue 18, item 1): known answers, run two ways.

Every query is run against `moescope.open(root, locked=True)` and against the live dashboard over HTTP: the Dash
app's Flask server runs on 127.0.0.1 on a free port in a thread (werkzeug, threaded, like `moescope dashboard`), and
the test POSTs to `/_dash-update-component` what the browser posts when Run is pressed on the SQL page. Afterwards
every file of the trace is unchanged byte for byte and `moescope check` on the collapse run still exits 1.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import moescope
from moescope.analysis.console import Limits, QueryError, check
from moescope.cli import main as cli_main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"

REFUSED_WRITE = r"refused: (DELETE|INSERT|UPDATE|COPY) is not allowed at any depth"
REFUSED_FILE = r"refused: (reading files is not allowed|\w+\(\) is not available)"


def statement(kind: str) -> str:
    return rf"refused: {kind} statements are not allowed"


#: (query, the one-line message it must be refused with). `{root}` is the trace root, `{tmp}` a scratch directory.
ESCAPES: list[tuple[str, str]] = [
    # writes nested in a CTE, a subquery, a set operation, a lateral join, a recursive CTE
    ("WITH x AS (DELETE FROM runs RETURNING *) SELECT count(*) FROM x", REFUSED_WRITE),
    ("WITH x AS MATERIALIZED (DELETE FROM runs RETURNING *) SELECT 1", REFUSED_WRITE),
    ("WITH x AS (INSERT INTO runs SELECT * FROM runs RETURNING *) SELECT count(*) FROM x", REFUSED_WRITE),
    ("WITH x AS (UPDATE trace_files SET path = '/etc/passwd' RETURNING *) SELECT 1", REFUSED_WRITE),
    ("WITH x AS (UPDATE layer_info SET n_experts = 1 RETURNING *) SELECT * FROM x", REFUSED_WRITE),
    ("SELECT * FROM (WITH x AS (DELETE FROM runs RETURNING *) SELECT * FROM x) s", REFUSED_WRITE),
    ("SELECT (SELECT count(*) FROM (WITH d AS (DELETE FROM runs RETURNING 1) SELECT * FROM d))", REFUSED_WRITE),
    ("SELECT 1 UNION ALL (WITH d AS (DELETE FROM runs RETURNING 1) SELECT 1 FROM d)", REFUSED_WRITE),
    ("SELECT * FROM runs, LATERAL (WITH d AS (DELETE FROM runs RETURNING 1) SELECT 1)", REFUSED_WRITE),
    ("WITH RECURSIVE r AS (SELECT 1 UNION ALL (WITH d AS (DELETE FROM runs RETURNING 1) SELECT 1 FROM d)) "
     "SELECT 1", REFUSED_WRITE),
    ("WITH x AS (COPY (SELECT 1 AS a) TO '{root}/collapse/manifest.json' (FORMAT json)) SELECT 1", REFUSED_WRITE),
    ("WITH x AS (COPY expert_load TO '{root}/collapse/expert_load/part-0-000000.parquet') SELECT 1", REFUSED_WRITE),
    # comments, whitespace and case do not hide a write
    ("/* hi */ wItH x AS (dElEtE\n\tFROM runs RETURNING *) select 1 FROM x -- bye", REFUSED_WRITE),
    ("\n\n  DeLeTe   FROM\nruns", statement("DELETE")),
    # top-level writes and DDL
    ("INSERT INTO runs SELECT * FROM runs", statement("INSERT")),
    ("UPDATE trace_files SET path = 'x'", statement("UPDATE")),
    ("DELETE FROM runs", statement("DELETE")),
    ("TRUNCATE runs", statement("DELETE")),
    ("DROP TABLE runs", statement("DROP")),
    ("DROP VIEW expert_load", statement("DROP")),
    ("ALTER TABLE runs RENAME TO r", statement("ALTER")),
    ("MERGE INTO runs USING runs r2 ON false WHEN NOT MATCHED THEN INSERT *", statement("MERGE_INTO")),
    ("COPY runs TO '{root}/runs.csv'", statement("COPY")),
    ("COPY (SELECT 1) TO '{tmp}/out.csv'", statement("COPY")),
    ("COPY runs FROM '/etc/passwd'", statement("COPY")),
    ("EXPORT DATABASE '{root}/exported'", statement("EXPORT")),
    # DuckDB 1.x's parser reads schema.sql/load.sql of the directory: the parser connection can read no file
    ("IMPORT DATABASE '{tmp}'", r"refused: (PRAGMA statements are not allowed|this statement reads files)"),
    ("ATTACH ':memory:' AS m", statement("ATTACH")),
    ("ATTACH '{tmp}/other.db' AS other", statement("ATTACH")),
    ("DETACH memory", statement("DETACH")),
    ("USE memory", statement("SET")),
    ("CREATE MACRO m() AS 1", statement("CREATE")),
    ("CREATE TEMP MACRO m() AS TABLE SELECT * FROM read_text('/etc/passwd')", statement("CREATE")),
    ("CREATE TEMP TABLE t AS SELECT 1", statement("CREATE")),
    ("CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')", statement("CREATE")),
    ("CREATE VIEW runs2 AS SELECT 1", statement("CREATE")),
    ("SET threads = 1", statement("SET")),
    ("SET GLOBAL enable_external_access = true", statement("SET")),
    ("RESET memory_limit", statement("SET")),
    ("PRAGMA enable_profiling", statement("PRAGMA")),
    ("INSTALL httpfs", statement("LOAD")),
    ("FORCE INSTALL httpfs", statement("LOAD")),
    ("LOAD httpfs", statement("LOAD")),
    ("CALL pragma_version()", statement("CALL")),
    ("CHECKPOINT", statement("CALL")),
    ("VACUUM", statement("VACUUM")),
    ("BEGIN TRANSACTION", statement("TRANSACTION")),
    ("EXPLAIN ANALYZE DELETE FROM runs", statement("EXPLAIN")),
    ("UPDATE EXTENSIONS", r"refused: this statement is not allowed"),
    ("PIVOT runs ON run USING count(*)", r"refused: multi-part \(e.g. PIVOT\) statements"),
    # more than one statement
    ("SELECT 1; DELETE FROM runs", r"refused: one statement at a time, please \(got 2\)"),
    ("SELECT 1; -- a comment\n DELETE FROM runs", r"refused: one statement at a time"),
    ("SELECT 1; SELECT 2", r"refused: one statement at a time"),
    # files and the server's state
    ("SELECT * FROM read_text('/etc/passwd')", REFUSED_FILE),
    ("SELECT * FROM read_csv('/etc/passwd')", REFUSED_FILE),
    ("SELECT * FROM read_csv('.tmp/secret.csv')", REFUSED_FILE),
    ("SELECT * FROM '.tmp/secret.csv'", REFUSED_FILE),
    ("SELECT * FROM \"/etc/passwd\"", REFUSED_FILE),
    ("SELECT * FROM glob('/')", REFUSED_FILE),
    ("SELECT * FROM glob('{root}/**')", REFUSED_FILE),
    ("SELECT * FROM read_parquet('/usr/**/*.parquet')", REFUSED_FILE),
    ("SELECT * FROM read_parquet('{root}/collapse/expert_load/*.parquet')", REFUSED_FILE),
    ("SELECT * FROM read_blob('{root}/collapse/manifest.json')", REFUSED_FILE),
    ("SELECT * FROM read_csv('http://example.com/x.csv')", REFUSED_FILE),
    ("DESCRIBE SELECT * FROM read_text('/etc/hostname')", REFUSED_FILE),
    ("SELECT * FROM query('DELETE FROM runs')", REFUSED_FILE),
    ("SELECT * FROM query_table('runs')", REFUSED_FILE),
    ("SELECT * FROM duckdb_settings()", REFUSED_FILE),
    ("SELECT current_setting('allowed_directories')", r"refused: current_setting\(\) is not available"),
    ("SELECT getenv('HOME')", r"refused: getenv\(\) is not available"),
    ("SELECT setseed(0.5)", r"refused: setseed\(\) is not available"),
    ("SELECT * FROM information_schema.tables", r"unknown table 'information_schema.tables'"),
    ("SELECT * FROM system.main.duckdb_settings", r"unknown table 'system.main.duckdb_settings'"),
    # a macro that was never created cannot be used
    ("SELECT m()", r"SQL error: .*m does not exist"),
    # values of any size from one call: DuckDB's memory cap does not count them, its interrupt does not stop them
    ("SELECT range(100000000)", r"refused: range\(\) can build values too large .* FROM range\(n\), it is fine"),
    ("SELECT unnest(generate_series(1, 1000000000))", r"refused: generate_series\(\) can build values too large"),
    ("SELECT lpad('x', 1000000000, 'y')", r"refused: lpad\(\) can build values too large"),
    ("SELECT repeat('x', 1000000000)", r"refused: repeat\(\) can build values too large"),
    ("SELECT list_resize([1], 1000000000)", r"refused: list_resize\(\) can build values too large"),
    ("SELECT printf('%01000000000d', 1)", r"refused: printf\(\) can build values too large"),
    ("SELECT damerau_levenshtein(run, run) FROM runs", r"refused: damerau_levenshtein\(\) takes quadratic time"),
    ("SELECT levenshtein(run, run) FROM runs", r"refused: levenshtein\(\) takes quadratic time"),
    # size and cost
    (" UNION ALL ".join(["SELECT count(*) FROM assignments"] * 5600), r"refused: the query is 240,789 characters long \(limit 20,000\)"),
]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory below `root`: path -> sha256 of its bytes ('dir' for a directory)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A copy of the sample traces, a server working directory with a secret in .tmp/, and the digest."""
    base = tmp_path_factory.mktemp("console")
    root = base / "traces"
    for run in ("collapse", "balanced"):
        shutil.copytree(SAMPLES / run, root / run)
    cwd = base / "server-cwd"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.csv").write_text("secret\nhunter2\n")
    scratch = base / "scratch"
    scratch.mkdir()
    (scratch / "schema.sql").write_text("CREATE TABLE leak AS SELECT 'hunter2' AS secret;\n")
    (scratch / "load.sql").write_text("hunter2 is not SQL\n")
    yield {"root": root, "cwd": cwd, "tmp": scratch, "digest": tree_digest(root)}


@pytest.fixture(scope="module")
def locked(world: dict[str, Any]) -> Iterator[moescope.Trace]:
    mp = pytest.MonkeyPatch()
    mp.chdir(world["cwd"])  # DuckDB puts ./.tmp of the working directory on its allow-list unless told not to
    tr = moescope.open(world["root"], locked=True, timeout=2.0, max_rows=100, memory_limit="128MB",
                       max_bytes=1 << 20)
    yield tr
    tr.close()
    mp.undo()


class Http:
    """The dashboard served over real HTTP on 127.0.0.1; `sql(q)` presses Run on the SQL page with `q`."""

    def __init__(self, root: Path) -> None:
        from werkzeug.serving import make_server

        from moescope import dashboard

        self.app = dashboard.create_app(root, warm=False, refresh=0, sql_timeout=2.0, sql_max_rows=100)
        self.server = make_server("127.0.0.1", 0, self.app.server, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        deps = json.loads(self._req("/_dash-dependencies"))
        self.dep = next(d for d in deps if "sql-msg.children" in d["output"])

    def _req(self, path: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
            return r.read()

    def sql(self, query: str) -> tuple[str, str, Any, int]:
        """(message, message class, result table or None, response bytes) of one Run."""
        outputs = [{"id": o.split(".")[0], "property": o.split(".")[1]}
                   for o in self.dep["output"].strip(".").split("...")]
        body = {"output": self.dep["output"], "outputs": outputs, "changedPropIds": ["sql-run.n_clicks"],
                "inputs": [{"id": "sql-run", "property": "n_clicks", "value": 1}],
                "state": [{"id": "sql-query", "property": "value", "value": query}]}
        raw = self._req("/_dash-update-component", body)
        resp = json.loads(raw)["response"]
        return resp["sql-msg"]["children"], resp["sql-msg"]["className"], resp["sql-result"]["children"], len(raw)

    def close(self) -> None:
        self.server.shutdown()
        self.app.moescope_data.close()


@pytest.fixture(scope="module")
def http(world: dict[str, Any]) -> Iterator[Http]:
    mp = pytest.MonkeyPatch()
    mp.chdir(world["cwd"])
    h = Http(world["root"])
    yield h
    h.close()
    mp.undo()


def _fill(query: str, world: dict[str, Any]) -> str:
    return query.replace("{root}", str(world["root"])).replace("{tmp}", str(world["tmp"]))


def _n_runs(tr: moescope.Trace) -> int:
    return int(tr.query("SELECT count(*) AS n FROM runs")["n"].iloc[0])


@pytest.mark.parametrize("query, message", ESCAPES, ids=[f"{i:02d}" for i in range(len(ESCAPES))])
def test_escape_is_refused_by_open_locked(locked, world, query, message):
    with pytest.raises(QueryError, match=message) as e:
        locked.sql(_fill(query, world))
    assert "\n" not in str(e.value) and "hunter2" not in str(e.value)
    assert _n_runs(locked) == 2


@pytest.mark.parametrize("query, message", ESCAPES, ids=[f"{i:02d}" for i in range(len(ESCAPES))])
def test_escape_is_refused_over_http(http, world, query, message):
    import re

    msg, cls, table, _ = http.sql(_fill(query, world))
    assert re.search(message, msg), msg
    assert "ms-msg-error" in cls and table is None and "\n" not in msg and "hunter2" not in msg


def test_trace_unchanged_and_check_still_fails(locked, http, world):
    # run every escape both ways (again, in one order), then compare every byte of the trace
    for query, _ in ESCAPES:
        with pytest.raises(QueryError):
            locked.sql(_fill(query, world))
        http.sql(_fill(query, world))
    assert tree_digest(world["root"]) == world["digest"]
    assert not (world["tmp"] / "out.csv").exists() and not (world["tmp"] / "other.db").exists()
    assert cli_main(["check", str(world["root"] / "collapse")]) == 1
    assert _n_runs(locked) == 2


def test_connection_itself_reads_nothing_outside_the_trace(locked, world):
    """Second layer, below the guard: the locked connection refuses files outside the trace, .tmp/ included."""
    con = locked.con
    for q in ("SELECT * FROM read_csv('.tmp/secret.csv')", f"SELECT * FROM read_csv('{world['cwd']}/.tmp/secret.csv')",
              "SELECT * FROM read_text('/etc/passwd')", "SELECT * FROM glob('/*')"):
        with pytest.raises(Exception, match="Permission|disabled|not allowed"):
            con.execute(q).fetchall()
    for q in ("SET enable_external_access = true", "SET allowed_directories = ['/']", "SET memory_limit = '64GB'",
              "SET temp_directory = '.tmp'"):
        with pytest.raises(Exception, match="locked"):
            con.execute(q)
    assert con.execute("SELECT current_setting('temp_directory')").fetchall() == [("",)]


def test_reads_of_the_views_work(locked, http):
    df = locked.query("SELECT run, count(*) AS n FROM expert_load GROUP BY run ORDER BY run")
    assert df["run"].tolist() == ["balanced", "collapse"] and (df["n"] > 0).all()
    assert len(locked.query("DESCRIBE runs")) > 0 and len(locked.query("SHOW TABLES")) > 0
    assert locked.query("WITH a AS (SELECT 1 AS x) SELECT x FROM a")["x"].tolist() == [1]
    assert len(locked.query("SELECT * FROM range(3)")) == 3
    msg, cls, table, _ = http.sql("SELECT run FROM runs ORDER BY run")
    assert msg.startswith("2 rows in") and "ms-msg-ok" in cls and table is not None


def test_time_limit_stops_a_cross_join_bomb_and_a_long_plan(locked, http):
    for q in ("SELECT count(*) FROM range(100000000) a, range(100000000) b",
              "WITH RECURSIVE t(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM t) SELECT count(*) FROM t",
              " UNION ALL ".join(["SELECT count(*) FROM assignments a, assignments b"] * 300)):  # under the cap
        t0 = time.monotonic()
        with pytest.raises(QueryError, match=r"query stopped: it (ran past the 2 s time limit|needs more memory)"):
            locked.sql(q)  # the recursive CTE may hit the memory cap first: either cap stops it
        assert time.monotonic() - t0 < 6
    t0 = time.monotonic()
    msg, _, _, _ = http.sql("SELECT count(*) FROM range(100000000) a, range(100000000) b")
    assert msg == "query stopped: it ran past the 2 s time limit" and time.monotonic() - t0 < 6
    assert _n_runs(locked) == 2


def test_memory_cap_stops_a_hash_bomb(locked):
    with pytest.raises(QueryError, match="query stopped: it needs more memory than the console allows"):
        locked.sql("SELECT list(b.range) FROM range(5000000) a, range(50) b GROUP BY a.range")
    assert _n_runs(locked) == 2


def test_response_is_capped_in_rows_and_bytes(locked, http):
    big = "(SELECT string_agg('x', '') AS s FROM range({n}))"  # one string of n bytes, built under the memory cap
    df = locked.query(f"SELECT s FROM {big.format(n=100_000)}, range(1000)")  # 100 MB asked for
    assert df.attrs["truncated"] and df.attrs["truncated_by"] == "bytes"
    assert 0 < len(df) <= 10  # 1 MB cap / 100 kB rows
    with pytest.raises(QueryError, match=r"the first row alone is over the 1 MB response limit"):
        locked.sql(f"SELECT s FROM {big.format(n=3_000_000)}")
    rows = locked.query("SELECT * FROM range(1000)")
    assert len(rows) == 100 and rows.attrs["truncated_by"] == "rows"
    msg, cls, table, size = http.sql(f"SELECT s FROM {big.format(n=1_000_000)}, range(100)")  # 100 MB asked for
    assert "over the 4 MB response limit" in msg and "ms-msg-warn" in cls
    assert size < 6 << 20, size


def test_visitors_are_isolated_and_not_blocked(http):
    """A slow query of one visitor neither blocks nor changes what another sees."""
    slow: dict[str, Any] = {}

    def visitor_a() -> None:
        slow["msg"] = http.sql("SELECT count(*) FROM range(100000000) a, range(100000000) b")[0]

    t = threading.Thread(target=visitor_a)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    msg, _, _, _ = http.sql("SELECT count(*) AS n FROM runs")
    assert msg.startswith("1 row in") and time.monotonic() - t0 < 1.5
    t.join()
    assert slow["msg"].startswith("query stopped")


def test_limits_of_the_check_alone():
    tables = ["runs"]
    assert check("  SELECT 1  ", tables) == "SELECT 1"
    with pytest.raises(QueryError, match="empty query"):
        check("  ", tables)
    with pytest.raises(QueryError, match=r"too complex \(over 500 parse-tree nodes\)"):
        check("SELECT " + ", ".join(["1"] * 400), tables, Limits(max_nodes=500))
    with pytest.raises(QueryError, match="too complex|SQL error: .*depth"):
        check("SELECT " + " + ".join(["1"] * 900), tables)  # nested 900 deep
    with pytest.raises(QueryError, match="SQL error: Parser Error"):
        check("SELEC 1", tables)


def test_queries_beyond_the_concurrency_cap_wait_for_a_slot_or_get_one_line():
    import duckdb

    from moescope.analysis.console import Console, lock_down

    con = duckdb.connect()
    con.execute("CREATE TABLE runs AS SELECT 1 AS x")
    lock_down(con, [], "256MB", 1)
    console = Console(con, ["runs"], Limits(timeout=1.0, max_concurrent=1))
    slow: dict[str, Any] = {}
    t = threading.Thread(target=lambda: slow.setdefault(
        "e", pytest.raises(QueryError, console.run, "SELECT count(*) FROM range(100000000) a, range(1000) b")))
    t.start()
    time.sleep(0.2)
    # the running query is stopped at its time limit, so a waiting one gets the slot within its own wait
    t0 = time.monotonic()
    assert console.run("SELECT x FROM runs").table.to_pylist() == [{"x": 1}]
    assert 0.5 < time.monotonic() - t0 < 1.0
    t.join()
    assert "time limit" in str(slow["e"].value)
    console._slots.acquire()  # a slot that does not come free: the wait ends in one line
    with pytest.raises(QueryError, match=r"^the console is busy \(1 queries running\): try again shortly$"):
        console.run("SELECT x FROM runs")
    console._slots.release()


#: Everyday analysis queries the guard must let through (window functions, QUALIFY, ASOF, UNPIVOT, lambdas, ...).
EVERYDAY = [
    "SELECT layer, expert, SUM(tokens) AS n FROM expert_load WHERE run = 'a' GROUP BY layer, expert ORDER BY 1, 2",
    "SELECT *, row_number() OVER (PARTITION BY layer ORDER BY step) AS r FROM expert_load QUALIFY r = 1",
    "SELECT DISTINCT ON (layer) layer FROM expert_load ORDER BY layer NULLS LAST LIMIT 10% OFFSET 2",
    "SELECT * FROM expert_load USING SAMPLE 10%",
    "SELECT * FROM (UNPIVOT runs ON run INTO NAME k VALUE v)",
    "SELECT [x * 2 FOR x IN [1, 2]], list_transform([1], y -> y + 1), {'a': 1}, unnest([1, 2])",
    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 3) SELECT * FROM r",
    "SELECT * FROM expert_load a ASOF JOIN router_stats b USING (run, step)",
    "VALUES (1), (2)",
    "SELECT 1 INTERSECT SELECT 1 EXCEPT SELECT 2",
    "SELECT * FROM runs LEFT JOIN LATERAL (SELECT 1) ON true",
    "SELECT layer, count(*) FROM expert_load GROUP BY ROLLUP (layer)",
    "SELECT * EXCLUDE (run) FROM runs",
    "FROM runs SELECT run",
    "DESCRIBE runs",
    "SHOW TABLES",
    "SUMMARIZE runs",
    "SELECT * FROM range(3) r, generate_series(1, 2) g, unnest([1]) u",
    "SELECT median(tokens), quantile_cont(tokens, 0.9) FROM expert_load",
    "SELECT CASE WHEN tokens > 0 THEN 'x' ELSE 'y' END, CAST(tokens AS DOUBLE), tokens::INT FROM expert_load",
    "SELECT token_id, expert, COUNT(*) AS n FROM assignments GROUP BY token_id, expert ORDER BY n DESC LIMIT 50",
]


@pytest.mark.parametrize("query", EVERYDAY)
def test_everyday_queries_pass_the_check(query):
    assert check(query, ["runs", "expert_load", "router_stats", "assignments"]) == query

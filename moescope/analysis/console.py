"""The locked SQL console: untrusted SQL over a trace's views that can read the trace and nothing else.

Used by `Trace.sql` in locked mode (`moescope.open(root, locked=True)`) and by the dashboard's SQL page.
Three independent layers, each enough on its own for the common attacks:

1. `check(query)`: DuckDB's own parser (`json_serialize_sql`) gives the statement tree. Exactly one SELECT
   statement; every node of the tree, at any depth (CTEs, subqueries, set operations, lateral joins) must be a
   read-only construct from an allow-list, so `WITH x AS (DELETE ... RETURNING *)`, `COPY ... TO` inside a CTE and
   anything the parser learns later are refused; tables are the trace's views or the query's own CTEs (no file
   paths), table functions are `range`/`generate_series`/`unnest` only (no `read_*`, `glob`, `query`), and the
   scalar functions that read the server's state or build a value of any size from a small argument are refused.
   Size caps (characters, tree nodes) bound the planner's time.
2. `lock_down(con, ...)`: the connection itself can read only the trace roots (`allowed_directories`; the
   temporary directory, which DuckDB otherwise allows, is switched off), loads no extensions, has a memory and
   thread cap, and its configuration is frozen (`lock_configuration`).
3. `Console.run(query)`: every query gets its own cursor (its own transaction, temporary schema and local settings,
   closed afterwards), a timer that interrupts it, a limit on concurrent queries, and a row and byte cap on the
   result, read in small Arrow batches so a huge result is never materialised in full by us.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

#: Query tree node types (the `type` of a node that is not an expression) a console query may contain.
READ_ONLY_NODES = frozenset({
    # query nodes
    "SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE",
    # table references
    "BASE_TABLE", "SUBQUERY", "JOIN", "TABLE_FUNCTION", "EXPRESSION_LIST", "EMPTY", "SHOW_REF", "PIVOT",
    # result modifiers and orderings
    "ORDER_MODIFIER", "LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER", "DISTINCT_MODIFIER",
    "ORDER_DEFAULT", "ASCENDING", "DESCENDING",
})
#: Table functions a console query may call: generators only, none of them touches a file or runs SQL.
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
#: Scalar functions refused: they read the server's state (settings, environment) or change the connection's.
DENIED_FUNCTIONS = frozenset({
    "getenv", "current_setting", "setseed", "nextval", "currval", "json_execute_serialized_sql",
})
#: Scalar functions refused because one call can build a value of any size from a small argument (a list of
#: range(10^8), lpad(x, 10^9)): DuckDB's memory_limit does not count such values and its interrupt does not stop
#: them (measured: `SELECT range(100000000)` grew the server by 7 GB and ran 55 s past a 10 s limit). As table
#: functions, range and generate_series stream rows and stay allowed.
UNBOUNDED_FUNCTIONS = frozenset({
    "range", "generate_series", "repeat", "list_resize", "array_resize", "lpad", "rpad", "bar", "printf", "format",
    "to_base", "bitstring",
})
#: Scalar functions refused because one call on long strings takes quadratic time and memory that the interrupt
#: does not stop (measured: damerau_levenshtein of two 30,000-character strings ran 17 s past a 2 s limit).
QUADRATIC_FUNCTIONS = frozenset({"levenshtein", "editdist3", "damerau_levenshtein"})
#: Schemas a table reference may name (the trace's views live in the default catalog's main schema).
SCHEMAS = frozenset({"", "main", "memory"})

DEFAULT_MEMORY_LIMIT = "2GB"
DEFAULT_THREADS = 2


class QueryError(ValueError):
    """A query was refused or stopped (locked mode) or failed; the message is one line for a person."""


@dataclass(frozen=True)
class Limits:
    """What one console query may use; every limit is checked before or while the query runs."""

    max_rows: int = 10_000
    timeout: float = 30.0  # seconds, from the moment the query is accepted
    max_bytes: int = 8 << 20  # Arrow bytes of the result (what becomes the HTTP response)
    max_chars: int = 20_000  # query text: bounds the planner's time (not interruptible)
    max_nodes: int = 20_000  # dicts and lists in the parse tree: same reason
    max_concurrent: int = 4  # queries running at once on one database; later ones wait up to `timeout`


@dataclass
class Result:
    """A console query's rows and whether (and why) they were cut."""

    table: pa.Table
    truncated: bool = False
    reason: str = ""  # "rows" or "bytes" when truncated


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


def _parser_connection() -> duckdb.DuckDBPyConnection:
    """One private, empty connection that only parses; it can read no file (call under `_parser_lock`)."""
    global _parser
    if _parser is None:
        con = duckdb.connect(":memory:")
        # DuckDB 1.x's parser reads IMPORT DATABASE's schema.sql/load.sql while splitting statements
        for stmt in ("SET enable_external_access = false", "SET autoload_known_extensions = false",
                     "SET autoinstall_known_extensions = false", "SET lock_configuration = true"):
            con.execute(stmt)
        _parser = con
    return _parser


def _statements(query: str) -> list[Any]:
    """The statements of `query`, split by DuckDB's parser on the file-less parser connection."""
    with _parser_lock:
        return list(_parser_connection().extract_statements(query))


def _parse(query: str) -> dict[str, Any]:
    """DuckDB's statement tree of `query` as JSON (parsed only, never bound or run)."""
    with _parser_lock:
        text = _parser_connection().execute("SELECT json_serialize_sql($1::VARCHAR)", [query]).fetchall()[0][0]
    return json.loads(text)  # type: ignore[no-any-return]


def _kind(node_type: str) -> str:
    return node_type.replace("_QUERY_NODE", "").replace("_NODE", "").replace("_", " ")


def check(query: str, tables: Iterable[str], limits: Limits = Limits()) -> str:
    """Refuse anything but one read-only SELECT over `tables`; returns the query. Raises QueryError (one line)."""
    query = (query or "").strip()
    if not query:
        raise QueryError("empty query: type a SELECT over the views")
    if len(query) > limits.max_chars:
        raise QueryError(f"refused: the query is {len(query):,} characters long (limit {limits.max_chars:,})")
    try:
        stmts = _statements(query)
    except duckdb.PermissionException:
        raise QueryError("refused: this statement reads files (read-only console: one SELECT only)") from None
    except duckdb.Error as e:
        raise QueryError(f"SQL error: {_first_line(e)}") from None
    if len(stmts) != 1:
        raise QueryError(f"refused: one statement at a time, please (got {len(stmts)})")
    try:
        kind = stmts[0].type
    except ValueError:  # a statement type newer than this duckdb's Python enum (e.g. UPDATE EXTENSIONS)
        kind = None
    if kind != duckdb.StatementType.SELECT:
        name = str(kind).rsplit(".", 1)[-1] if kind is not None else ""
        if not name.replace("_", "").isalpha():
            raise QueryError("refused: this statement is not allowed (read-only console: one SELECT only)")
        name = "multi-part (e.g. PIVOT)" if name == "MULTI" else name
        raise QueryError(f"refused: {name} statements are not allowed (read-only console: one SELECT only)")
    try:
        tree = _parse(query)
    except duckdb.Error as e:
        raise QueryError(f"SQL error: {_first_line(e)}") from None
    except RecursionError:  # the tree is nested deeper than Python's JSON reader goes
        raise QueryError("refused: the query is too complex (nested too deeply)") from None
    if tree.get("error"):
        msg = str(tree.get("error_message", "")).strip()
        if "Only SELECT" in msg:  # e.g. PIVOT, which the parser rewrites into a statement of its own
            raise QueryError("refused: this statement is not a plain SELECT (read-only console: one SELECT only)")
        raise QueryError(f"SQL error: {msg.splitlines()[0] if msg else 'the query does not parse'}")
    if len(tree.get("statements", [])) != 1:
        raise QueryError("refused: one statement at a time, please")
    _walk(tree["statements"][0], {t.lower() for t in tables}, limits)
    return query


def _walk(root: Any, tables: set[str], limits: Limits) -> None:
    """Every node of the tree, iteratively (a deep tree must not exhaust Python's stack)."""
    ctes: set[str] = set()
    refs: list[dict[str, Any]] = []
    table_functions: set[int] = set()  # ids of the FUNCTION nodes that a TABLE_FUNCTION reference calls
    stack = [root]
    n = 0
    while stack:
        node = stack.pop()
        n += 1
        if n > limits.max_nodes:
            raise QueryError(f"refused: the query is too complex (over {limits.max_nodes:,} parse-tree nodes)")
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        ntype = node.get("type")
        if "class" in node:  # an expression
            if node.get("class") == "FUNCTION":
                name = str(node.get("function_name", "")).lower()
                if name in DENIED_FUNCTIONS:
                    raise QueryError(f"refused: {name}() is not available in the console")
                if name in QUADRATIC_FUNCTIONS:
                    raise QueryError(f"refused: {name}() takes quadratic time in one call, which the console's "
                                     "time limit cannot stop")
                if name in UNBOUNDED_FUNCTIONS and id(node) not in table_functions:
                    raise QueryError(f"refused: {name}() can build values too large for the console's memory cap "
                                     "(as a table function, FROM range(n), it is fine)"
                                     if name in TABLE_FUNCTIONS else
                                     f"refused: {name}() can build values too large for the console's memory cap")
        elif isinstance(ntype, str):
            if ntype not in READ_ONLY_NODES:
                raise QueryError(f"refused: {_kind(ntype)} is not allowed at any depth (read-only console: SELECT only)")
            if ntype in ("BASE_TABLE", "TABLE_FUNCTION"):
                refs.append(node)
                if isinstance(node.get("function"), dict):  # seen before its child: the call is a table function
                    table_functions.add(id(node["function"]))
            elif ntype == "SHOW_REF" and _looks_like_path(str(node.get("table_name", "")).strip('"')):
                raise QueryError("refused: reading files is not allowed in the console: query the views")
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            ctes.update(str(e.get("key", "")).lower() for e in cte_map.get("map", []) if isinstance(e, dict))
        stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
    for ref in refs:
        if ref["type"] == "TABLE_FUNCTION":
            fn = ref.get("function") or {}
            name = str(fn.get("function_name", "")).lower()
            schema = str(fn.get("schema", "") or "").lower()
            if name not in TABLE_FUNCTIONS or schema not in SCHEMAS:
                raise QueryError(f"refused: {name or 'this'}() is not available in the console: query the views "
                                 f"(no file access; table functions: {', '.join(sorted(TABLE_FUNCTIONS))})")
            continue
        name = str(ref.get("table_name", ""))
        schema = str(ref.get("schema_name", "") or "").lower()
        catalog = str(ref.get("catalog_name", "") or "").lower()
        if _looks_like_path(name):
            raise QueryError("refused: reading files is not allowed in the console: query the views")
        if name.lower() not in tables | ctes or schema not in SCHEMAS or catalog not in SCHEMAS:
            shown = ".".join(p for p in (catalog, schema, name) if p)
            raise QueryError(f"unknown table {shown!r}: query one of {', '.join(sorted(tables))}")


def _looks_like_path(name: str) -> bool:
    """A table name DuckDB would resolve by reading a file (a replacement scan: 'x.csv', '/etc/passwd', 's3://')."""
    return any(c in name for c in "/\\:.*?~")


def lock_down(
    con: duckdb.DuckDBPyConnection,
    readable: Sequence[Path],
    memory_limit: str | None = None,
    threads: int | None = None,
) -> None:
    """Freeze `con`: only `readable` directories, no extensions, no spilling, memory/thread caps, locked settings."""

    def lit(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    dirs = ", ".join(lit(str(p).rstrip(os.sep) + os.sep) for p in readable)
    stmts = [
        # DuckDB puts its temporary directory (./.tmp of the server's working directory) on the allow-list:
        # without a temporary directory nothing spills there and nothing outside the trace is readable.
        "SET temp_directory = ''",
        f"SET allowed_directories = [{dirs}]",
        "SET enable_external_access = false",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        f"SET memory_limit = {lit(memory_limit or DEFAULT_MEMORY_LIMIT)}",
        f"SET threads = {int(threads or DEFAULT_THREADS)}",
        "SET lock_configuration = true",
    ]
    for stmt in stmts:
        con.execute(stmt)


def _reader(rel: duckdb.DuckDBPyRelation, batch: int) -> Any:
    """An Arrow record batch reader over `rel` (DuckDB 2.0 `to_arrow_reader`, 1.x `fetch_record_batch`)."""
    if hasattr(rel, "to_arrow_reader"):
        return rel.to_arrow_reader(batch)
    return rel.fetch_record_batch(batch)  # pragma: no cover - DuckDB 1.x


class Console:
    """Untrusted SQL over one locked connection: `run(query)` checks, limits and executes one query."""

    def __init__(self, con: duckdb.DuckDBPyConnection, tables: Iterable[str], limits: Limits = Limits()) -> None:
        self.con = con
        self.tables = {t.lower() for t in tables}
        self.limits = limits
        self._slots = threading.BoundedSemaphore(max(1, limits.max_concurrent))

    def run(self, query: str) -> Result:
        """Check `query`, then run it on a fresh cursor within the limits; raises QueryError (one line)."""
        limits = self.limits
        query = check(query, self.tables, limits)
        if not self._slots.acquire(timeout=limits.timeout):
            raise QueryError(f"the console is busy ({limits.max_concurrent} queries running): try again shortly")
        try:
            return _execute(self.con, query, limits)
        finally:
            self._slots.release()


def _execute(con: duckdb.DuckDBPyConnection, query: str, limits: Limits) -> Result:
    cur = con.cursor()  # its own transaction, temp schema and local settings: closed below, nothing outlives it
    state = {"done": False, "fired": False}

    def stop() -> None:
        if not state["done"]:
            state["fired"] = True
            cur.interrupt()

    timer = threading.Timer(limits.timeout, stop)
    timer.daemon = True
    timer.start()
    batches: list[pa.RecordBatch] = []
    rows = nbytes = 0
    reason = ""
    try:
        reader = _reader(cur.sql(query).limit(limits.max_rows + 1), 256)
        schema = reader.schema
        for batch in reader:
            if rows + batch.num_rows > limits.max_rows:
                batch = batch.slice(0, limits.max_rows - rows)
                reason = "rows"
            if nbytes + batch.nbytes > limits.max_bytes:
                batch = _fit(batch, limits.max_bytes - nbytes)
                reason = "bytes"
            batches.append(batch)
            rows += batch.num_rows
            nbytes += batch.nbytes
            if reason:
                break
    except duckdb.InterruptException:
        raise QueryError(f"query stopped: it ran past the {limits.timeout:g} s time limit") from None
    except duckdb.OutOfMemoryException as e:
        raise QueryError(f"query stopped: it needs more memory than the console allows ({_first_line(e)})") from None
    except duckdb.PermissionException as e:
        raise QueryError(f"refused: {_first_line(e)}") from None
    except duckdb.Error as e:
        if state["fired"]:
            raise QueryError(f"query stopped: it ran past the {limits.timeout:g} s time limit") from None
        raise QueryError(f"SQL error: {_first_line(e)}") from None
    finally:
        state["done"] = True
        timer.cancel()
        try:
            cur.close()
        except duckdb.Error:  # pragma: no cover - closing an interrupted cursor
            pass
    if reason == "bytes" and rows == 0:
        raise QueryError(f"refused: the first row alone is over the {limits.max_bytes / 2**20:g} MB response limit")
    return Result(pa.Table.from_batches(batches, schema=schema), truncated=bool(reason), reason=reason)


def _fit(batch: pa.RecordBatch, budget: int) -> pa.RecordBatch:
    """The longest prefix of `batch` whose Arrow size is within `budget` bytes."""
    lo, hi = 0, batch.num_rows
    while lo < hi:  # the largest n with slice(0, n).nbytes <= budget
        mid = (lo + hi + 1) // 2
        if batch.slice(0, mid).nbytes <= budget:
            lo = mid
        else:
            hi = mid - 1
    return batch.slice(0, lo)

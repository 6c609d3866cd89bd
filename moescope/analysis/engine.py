"""Running rendered analyses on a DuckDB connection: helper tables, error translation, DataFrame out."""

from __future__ import annotations

import re
from typing import Any

import duckdb
import pandas as pd

from ..format.storage import as_path
from ..format.writer import TraceError
from .sqlkit import render

#: Integer types wider than BIGINT that results carry: HUGEINT, and DECIMAL(38,0) (a HUGEINT sum through Arrow).
_WIDE_INT = re.compile(r"^DECIMAL\((?:19|[2-3][0-9]),0\)$")
#: Largest expert id + 1 that `expert_ids` covers (expert ids are SMALLINT in the trace format).
MAX_EXPERTS = 1 << 15
#: k where neither the manifest nor the counts say it: the longest routing list of the run × layer (else 1).
ROUTING_TOP_K_SQL = "SELECT run, layer, MAX(len(experts)) AS k FROM routing GROUP BY run, layer"
#: One row per (run, layer, expert id): dense expert ids, so an expert with no rows counts as zero.
LAYER_EXPERTS_SQL = ("SELECT li.run, li.layer, x.i AS expert "
                     "FROM layer_info li JOIN expert_ids x ON x.i < li.n_experts")


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    try:  # cheaper than asking information_schema on every analysis call
        con.execute(f"SELECT 1 FROM {name} LIMIT 0")
        return True
    except duckdb.CatalogException:
        return False


def ensure_layer_info(con: duckdb.DuckDBPyConnection) -> None:
    """Materialize `layer_info` (N and k per run × layer) and `layer_experts` (one row per expert id) once."""
    if _has_table(con, "layer_info"):
        return
    if not _has_table(con, "manifest_layers"):
        con.execute(
            "CREATE TABLE manifest_layers (run VARCHAR, layer SMALLINT, n_experts INTEGER, top_k INTEGER, "
            "router_kind VARCHAR, module VARCHAR, logits BOOLEAN, lse BOOLEAN)"
        )
    try:
        con.execute(f"CREATE TABLE layer_info AS {render('view_layer_info')}")
        # k still unknown (no manifest entry, no router_stats): the routing lists' length says it, if any.
        if con.execute("SELECT COUNT(*) FROM layer_info WHERE top_k IS NULL").fetchone()[0]:
            con.execute(
                f"UPDATE layer_info SET top_k = COALESCE((SELECT r.k FROM ({ROUTING_TOP_K_SQL}) r "
                "WHERE r.run = layer_info.run AND r.layer = layer_info.layer), 1) WHERE top_k IS NULL"
            )
        row = con.execute("SELECT COALESCE(MAX(n_experts), 0) FROM layer_info").fetchone()
        n = min(int(row[0] if row else 0), MAX_EXPERTS)
        # A numbers table is the portable way to densify expert ids (no generate_series in the analyses).
        con.execute("CREATE TABLE expert_ids AS SELECT CAST(i AS SMALLINT) AS i FROM range(?) t(i)", [max(n, 1)])
        con.execute(f"CREATE TABLE layer_experts AS {LAYER_EXPERTS_SQL}")
    except duckdb.Error as e:
        raise translate(e, con) from None


#: DuckDB errors that are about the query, never about the files it read.
_QUERY_ERRORS = tuple(
    getattr(duckdb, n)
    for n in ("ParserException", "BinderException", "CatalogException", "InterruptException", "PermissionException",
              "SyntaxException", "ConstraintException", "NotImplementedException")
    if hasattr(duckdb, n)
)


def find_corrupt_file(con: duckdb.DuckDBPyConnection) -> tuple[str, str] | None:
    """Verify every trace file (listed in `trace_files`) again, pages and checksums; the first broken one and why."""
    from ..format.reader import verify_part

    try:
        paths = [r[0] for r in con.execute("SELECT path FROM trace_files ORDER BY path").fetchall()]
    except duckdb.Error:
        return None
    for path in paths:
        try:
            verify_part(path)
        except TraceError as e:  # "<path>: why": keep the why
            text = str(e)
            return path, text[len(path) + 2:] if text.startswith(path + ": ") else text
    return None


def translate(e: Exception, con: duckdb.DuckDBPyConnection | None = None) -> Exception:
    """Turn a DuckDB error caused by broken trace data into a one-line TraceError naming the file; pass others on."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    if isinstance(e, _QUERY_ERRORS) or not isinstance(e, duckdb.Error):
        return e
    # Only now, on the error path, is it worth reading every file to find the broken one.
    found = find_corrupt_file(con) if con is not None else None
    if found is not None and not as_path(found[0]).exists():
        return TraceError(f"{found[0]}: vanished since the trace was opened (compacted or removed); refresh() or "
                          "open the trace again")
    if found is not None:
        return TraceError(f"{found[0]}: corrupt Parquet data ({found[1]}; DuckDB: {msg})")
    if "parquet" in msg.lower():
        return TraceError(f"unreadable trace data: {msg}")
    return e


def integer_counts(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """Cast HUGEINT result columns to BIGINT, so `sum(tokens)` is an integer in pandas and CSV, not 27685.0.

    DuckDB's sum over BIGINT is HUGEINT, which `.df()` turns into float64 (and Arrow into DECIMAL(38,0), which
    comes back the same way). Token counts stay far below 2^63, and a count that did not fit would be an error,
    never a rounded number. Relations with duplicate column names are returned unchanged (a projection by name
    would be ambiguous). The one place counts are made integers: `Trace.sql`/`query`, `moescope sql`, analyses.
    """
    cols, types = rel.columns, [_WIDE_INT.sub("HUGEINT", str(t)) for t in rel.types]
    if "HUGEINT" not in types or len(set(cols)) != len(cols):
        return rel

    def quoted(c: str) -> str:
        return '"' + c.replace('"', '""') + '"'

    return rel.project(", ".join(f"CAST({quoted(c)} AS BIGINT) AS {quoted(c)}" if t == "HUGEINT" else quoted(c)
                                 for c, t in zip(cols, types)))


def run_analysis(con: duckdb.DuckDBPyConnection, name: str, params: dict[str, Any], final: str | None = None) -> pd.DataFrame:
    """Render analyses/`name`.sql with `params`, run it on `con` and return a DataFrame (`win` renamed `window`).

    `con` is a DuckDB connection, or another engine's connection (`moescope.analysis.spark.SparkConnection`):
    that one gets the same rendered SQL through `frame(sql)`, which translates it (`moescope.analysis.dialects`).
    """
    sql = render(name, params, final=final)
    if isinstance(con, duckdb.DuckDBPyConnection):
        ensure_layer_info(con)
        try:
            df = integer_counts(con.sql(sql)).df()
        except duckdb.Error as e:
            raise translate(e, con) from None
    else:  # layer_info and its companions were defined when that engine's trace was opened
        df = con.frame(sql)
    if "win" in df.columns:
        df = df.rename(columns={"win": "window"})
    return df

"""`moescope sql TRACE [QUERY]`: run SQL over a trace's views, or list the views and their columns."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb

EPILOG = """\
views: expert_load, router_stats, routing, assignments (routing unnested: one row per token × layer × slot),
       expert_similarity, expert_spectra, runs, layer_info (N experts and top-k per run × layer)

examples:
  moescope sql traces                                           # list the views and their columns
  moescope sql traces "SELECT layer, expert, sum(tokens) FROM expert_load GROUP BY ALL ORDER BY ALL"
  moescope sql traces "SELECT * FROM router_stats" --format csv -o stats.csv
  moescope sql traces "SELECT * FROM assignments WHERE layer = 3" --format parquet -o layer3.parquet
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sql` command to the CLI."""
    p = subparsers.add_parser(
        "sql",
        help="run SQL over a trace (DuckDB), or list its views",
        description="Run one SQL query over the trace's DuckDB views and print or save the result (one statement "
        "per call: two or more are an error, exit 2). "
        "Without QUERY, list the views and their columns.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", metavar="TRACE", help="trace root or run directory")
    p.add_argument("query", metavar="QUERY", nargs="?", help="SQL query ('-' reads it from stdin)")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table",
                   help="output format (parquet needs -o)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the result to FILE instead of stdout")
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="table format: show at most N rows (default: all)")
    p.set_defaults(func=run)


def _list_views(tr: object) -> str:
    lines = []
    for name, cols in tr.views().items():  # type: ignore[attr-defined]
        # counting the unnested view would unnest every list; the list lengths give the same number
        count = "SELECT COALESCE(sum(len(experts)), 0) FROM routing" if name == "assignments" else f"SELECT count(*) FROM {name}"
        n = tr.con.execute(count).fetchone()[0]  # type: ignore[attr-defined]
        lines.append(f"{name} ({n:,} rows)")
        lines += [f"    {c:<18} {t}" for c, t in cols]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Execute `moescope sql`."""
    from ..analysis.engine import integer_counts, translate
    from ..analysis.trace import Trace
    from ..errors import CLIError

    if args.format == "parquet" and not args.output:
        raise CLIError("--format parquet needs -o FILE (Parquet is not written to a terminal)")
    if args.output and Path(args.output).is_dir():
        raise CLIError(f"-o {args.output}: is a directory; give a file name", 2)
    if args.output and not Path(args.output).parent.is_dir():
        raise CLIError(f"-o {args.output}: no such directory {str(Path(args.output).parent)!r}", 2)
    tr = Trace(args.trace)
    if args.query is None:
        text = _list_views(tr)
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    query = sys.stdin.read() if args.query == "-" else args.query
    try:
        n_statements = len(duckdb.extract_statements(query))
    except duckdb.Error:  # a syntax error: running it below gives DuckDB's own message
        n_statements = 1
    if n_statements == 0:
        raise CLIError("empty query: give one SQL statement (or none at all to list the views)", 2)
    if n_statements != 1:  # DuckDB would run them all and return only the last result: say so instead
        raise CLIError(f"one statement per call, please (got {n_statements}): run them as separate "
                       "`moescope sql` calls", 2)
    try:  # errors go to moescope.errors.classify (cli.main); translate names a damaged file first
        rel = tr.con.sql(query)
        if rel is None:  # a statement without a result (SET, CREATE ...): nothing to print
            return 0
        rel = integer_counts(rel)
        if args.format == "parquet":
            import pyarrow.parquet as pq

            table = rel.to_arrow_table()  # run it first, so a bad query leaves no file behind
            pq.write_table(table, args.output, compression="zstd")
            return 0
        df = rel.df()
    except duckdb.Error as e:
        raise translate(e, tr.con) from None
    if args.format == "csv":
        text = df.to_csv(index=False)
    elif args.format == "json":
        text = json.dumps(json.loads(df.to_json(orient="records", date_format="iso")), indent=1) + "\n"
    else:
        shown = df if args.max_rows is None else df.head(args.max_rows)
        text = (shown.to_string(index=False) if len(df.columns) else "(no columns)") + "\n"
        if args.max_rows is not None and len(df) > args.max_rows:
            text += f"… {len(df) - args.max_rows:,} more rows ({len(df):,} in all)\n"
        elif len(df) == 0:
            text = ", ".join(df.columns) + "\n(0 rows)\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0

"""`moescope dashboard TRACE`: browse a trace in the Dash dashboard (binds 127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import argparse

from ..errors import CLIError

EPILOG = """\
The trace is opened read-only; the SQL page runs queries in locked mode (SELECT only, no file access,
row and time limits). The dashboard has no authentication: keep it on 127.0.0.1, or put it behind
something that has.

examples:
  moescope dashboard traces
  moescope dashboard traces/run-a --port 8051
  moescope dashboard traces --check      # open the trace and build the app, then exit (0 = it would serve)
  moescope dashboard traces/run-a --refresh 2     # follow a run while it records
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `dashboard` command to the CLI."""
    p = subparsers.add_parser(
        "dashboard",
        help="browse a trace in a local web dashboard (Dash)",
        description="Serve the moescope dashboard for a trace: overview, utilization, collapse, similarity, drift, "
        "tokens and a read-only SQL console.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", metavar="TRACE", help="trace root or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8050, help="port to listen on (default: 8050; a busy port or an unresolvable --host is one line, exit 2)")
    p.add_argument("--debug", action="store_true", help="Dash debug mode (dev tools, reload on code change)")
    p.add_argument("--sql-timeout", type=float, default=10.0, metavar="S",
                   help="SQL console: seconds a query may run (default: 10)")
    p.add_argument("--refresh", type=float, default=5.0, metavar="SECONDS",
                   help="re-read the trace every SECONDS while a run records: new steps, ranks and runs appear, "
                   "zoom is kept (default: 5; 0 = off)")
    p.add_argument("--check", action="store_true",
                   help="open the trace and build the app, then exit without serving (exit 0, or 2/3 as any command)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, build the app and serve it until interrupted."""
    from .. import dashboard
    from ..format.manifest import TraceError
    from ..format.storage import as_path

    if not as_path(args.trace).exists():  # before dash is imported; the exit code is the classifier's (3)
        raise TraceError(f"{args.trace}: no such trace root")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}", 2)
    if not args.sql_timeout > 0:
        raise CLIError(f"--sql-timeout must be a positive number of seconds, got {args.sql_timeout:g}", 2)
    if not args.refresh >= 0:
        raise CLIError(f"--refresh must be 0 (off) or a positive number of seconds, got {args.refresh:g}", 2)
    problem = dashboard.bind_error(args.host, args.port)  # before Dash: it aborts on these (exit 134)
    if problem:
        raise CLIError(problem, 2)
    # A missing or damaged trace, or dash not installed, raises here; moescope.errors.classify says the exit code.
    if args.check:
        app = dashboard.create_app(args.trace, sql_timeout=args.sql_timeout, refresh=args.refresh, warm=False)
        app.moescope_data.close()  # type: ignore[attr-defined]
        print(f"moescope dashboard: {args.trace} opens and the app builds (--check: not serving)")
        return 0
    # serve() prints the warning when --host is not a loopback address
    dashboard.serve(args.trace, host=args.host, port=args.port, debug=args.debug, sql_timeout=args.sql_timeout,
                    refresh=args.refresh)
    return 0

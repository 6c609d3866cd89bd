"""`moescope check TRACE`: fail CI when routing is unhealthy (exit 0 pass, 1 fail, 2 usage/config, 3 unreadable trace)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import DEFAULT_CONFIG

EPILOG = """\
exit codes:
  0  every check passed (warnings allowed unless --fail-on warn)
  1  a check failed (FAIL or ERROR; also WARN with --fail-on warn)
  2  usage or config error
  3  unreadable or empty trace (or reference)

examples:
  moescope check traces/run-a
  moescope check traces --reference traces-main/run-a --format junit -o moescope.xml
  moescope check traces --format github          # annotations + $GITHUB_STEP_SUMMARY
  moescope check traces/run-a --reference-tag english --tag code   # drift between two data slices
  moescope check traces --engine spark --spark-conf spark.master=spark://head:7077   # the same rules on Spark
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `check` command to the CLI."""
    p = subparsers.add_parser(
        "check",
        help="run the health rules on a trace and exit non-zero on failure (for CI)",
        description="Run the router health rules on a trace (and drift/regressions against a reference trace); "
        "print the findings and exit non-zero when a check fails.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", metavar="TRACE", help="trace root or run directory")
    p.add_argument(
        "--config",
        metavar="PATH",
        help=f"rule thresholds (TOML); default: ./{DEFAULT_CONFIG} when it exists, else the built-in defaults",
    )
    p.add_argument(
        "--reference",
        metavar="REF",
        help="baseline trace (root or run directory): adds drift and regression checks "
        "(default: [check].reference of the config, if set)",
    )
    p.add_argument("--format", choices=("text", "json", "junit", "github"), default="text", help="output format")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the report to FILE; stdout then gets the text table (like pytest --junitxml)",
    )
    p.add_argument(
        "--fail-on",
        choices=("fail", "warn"),
        default=None,
        help="lowest status that fails the check (default: [check].fail_on of the config, else fail)",
    )
    p.add_argument(
        "--min-tokens",
        type=int,
        metavar="N",
        help="minimum expected assignments per expert (kT/N) before a load rule is evaluated, else SKIP",
    )
    p.add_argument("--run", metavar="RUN", help="check only this run of the trace")
    p.add_argument("--tag", metavar="TAG", help="drift: compare only this data slice of the trace (rec.tag)")
    p.add_argument(
        "--reference-tag",
        metavar="TAG",
        help="drift: the reference's data slice; without --reference the trace is its own reference "
        "(e.g. --reference-tag english --tag code)",
    )
    p.add_argument(
        "--engine",
        choices=("duckdb", "spark"),
        default="duckdb",
        help="SQL engine that runs the analyses: duckdb (default, in this process) or spark (PySpark, the same "
        "analyses/*.sql translated; needs moescope[spark] and Java)",
    )
    p.add_argument(
        "--spark-conf",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="--engine spark: a Spark setting, repeatable (spark.master=yarn, spark.executor.memory=8g, ...); "
        "without spark.master the analyses run on this machine's cores (local[*])",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="text format: list passing findings too")
    p.set_defaults(func=cmd_check)


def _config_path(arg: str | None) -> str | None:
    """The config to use: --config, else ./moescope.toml when it exists, else None (built-in defaults)."""
    from ..config import default_config_path

    return arg if arg is not None else default_config_path()


def cmd_check(args: argparse.Namespace) -> int:
    """Run the check and print or write the report; returns the exit code."""
    from ..check import format_text, render, run_check, summary_line, write_step_summary
    from ..errors import CLIError

    if args.min_tokens is not None and args.min_tokens < 0:
        raise CLIError(f"--min-tokens must be >= 0, got {args.min_tokens}", 2)
    config = _config_path(args.config)
    spark_conf = {}
    for item in args.spark_conf:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--spark-conf takes KEY=VALUE, got {item!r}", 2)
        spark_conf[key.strip()] = value.strip()
    if spark_conf and args.engine != "spark":
        raise CLIError("--spark-conf needs --engine spark", 2)
    # ConfigError, CheckError, SelectionError (exit 2) and TraceError (exit 3): moescope.errors.classify decides.
    result = run_check(
        args.trace,
        config=config,
        reference=args.reference,
        fail_on=args.fail_on,
        min_tokens=args.min_tokens,
        run=args.run,
        tag=args.tag,
        reference_tag=args.reference_tag,
        engine=args.engine,
        spark_conf=spark_conf or None,
    )
    text = format_text(result, verbose=args.verbose) if args.format == "text" else render(result, args.format)
    if args.output:
        try:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise CLIError(f"cannot write {args.output}: {e.strerror or e}", 2) from None
        # Like pytest --junitxml: the job log still shows the findings a person reads, the file feeds the CI.
        if args.format == "text":
            sys.stdout.write(summary_line(result) + "\n")
        else:
            sys.stdout.write(format_text(result, verbose=args.verbose))
    else:
        sys.stdout.write(text)
    if args.format == "text" and result.meta.get("online_alerts"):
        sys.stdout.write("\nalerts kept in the trace (informational; the rules above decide the exit code):\n")
        sys.stdout.write("".join(f"  {line}\n" for line in result.meta["online_alerts"]))
    if args.format == "github" and os.environ.get("GITHUB_STEP_SUMMARY"):
        try:
            write_step_summary(result)
        except OSError as e:
            # The verdict matters more than the summary page: say so and keep the check's own exit code.
            sys.stderr.write(f"moescope: warning: cannot append to $GITHUB_STEP_SUMMARY: {e.strerror or e}\n")
    return result.exit_code

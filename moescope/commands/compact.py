"""`moescope compact`: merge a run's small parts into large row groups, safely while readers and a recorder run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """examples:
  moescope compact traces/run-a                     a finished run: every table, every rank
  moescope compact traces/run-a --up-to-step 5000   a run being recorded: the flushes up to step 5000
  moescope compact traces/run-a --grace 60          keep the replaced parts 60 s for readers scanning part files

A reader never sees a row missing or twice, also when compaction is killed: the next `moescope.open`
counts the same rows and the next `moescope compact` finishes or undoes the killed one.
"""


def register(sub: Any) -> None:
    """Add the `compact` command."""
    p = sub.add_parser(
        "compact",
        help="merge the small Parquet parts of a run into large row groups (atomically)",
        description="Merge each rank's small parts of each table into one large part (row groups of up to 1M rows, "
        "page checksums), commit it through the run's compaction record, then remove the parts it replaced. "
        "A rank being recorded is compacted only up to a step it has flushed (--up-to-step).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run directory (the folder holding manifest.json) or its "
                   "object-store URL (s3://bucket/traces/run)")
    p.add_argument("--up-to-step", type=int, default=None, metavar="STEP",
                   help="merge only parts whose steps are all <= STEP (required while a recorder writes the run)")
    p.add_argument("--grace", type=float, default=0.0, metavar="SECONDS",
                   help="keep the replaced parts this long before removing them (the command waits), so readers "
                   "of traces above 64 MB, which scan part files per query, refresh before they vanish (default 0)")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compact one run and print what changed."""
    from ..errors import CLIError
    from ..format.compact import CompactUsageError, compact_run
    from ..format.lock import RunLocked

    if args.grace < 0:
        raise CLIError("--grace must be >= 0 seconds")

    def progress(msg: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"moescope compact: {msg}\n")

    try:
        res = compact_run(args.run, args.up_to_step, grace_s=args.grace, progress=progress)
    except (CompactUsageError, RunLocked) as e:
        raise CLIError(str(e)) from None
    print(res.summary())
    if res.live_ranks:
        print(f"rank(s) {', '.join(map(str, res.live_ranks))} being recorded: merged up to step {args.up_to_step}")
    return 0

"""`moescope whatif TRACE capacity|placement|cache`: systems what-ifs replayed on a trace's routing."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

DESCRIPTION = """\
Replay the routing recorded in a trace against systems choices:

  capacity   token-drop rate at each capacity factor (capacity = ceil(cf*k*T/N) per expert per capacity
             group; second choices are dropped before first choices), beside the rate the model reported
  placement  expert-parallel placement: a suggested placement (greedy LPT, optional hot-expert replicas)
             fitted on one step window and judged against round-robin on a later, held-out window:
             balancedness (mean/max device load), straggler factor (max/mean), all-to-all share
  cache      per-layer expert-cache hit rate vs cache size for offloaded experts: LRU, LFU, Belady bound

capacity works on count-only runs too (a lower bound, group 'batch' only); cache needs token-level routing
(record with tokens > 0); placement needs it only for the all-to-all share.
"""


def _items(text: str) -> list[str]:
    """The comma-separated items of `text`; an empty item ('1,,2', '1,') is an error, not skipped."""
    items = [x.strip() for x in text.split(",")]
    if not text.strip():
        raise argparse.ArgumentTypeError("expected at least one number")
    if any(not x for x in items):
        raise argparse.ArgumentTypeError(f"empty item in {text!r}: give numbers separated by single commas")
    return items


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in _items(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"every factor must be a finite number > 0, got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in _items(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _range(text: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    try:
        lo, hi = int(a), int(b if sep else a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST steps (inclusive), got {text!r}") from None
    if hi < lo:
        raise argparse.ArgumentTypeError(f"step range {text!r} ends before it starts")
    return lo, hi


def register(subparsers: Any) -> None:
    """Add the `whatif` command to the top-level parser."""
    p = subparsers.add_parser(
        "whatif",
        help="systems what-ifs: capacity-factor drops, expert placement, expert-cache hit rates",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", metavar="TRACE", help="trace root (runs below it) or one run directory")
    p.add_argument("analysis", choices=["capacity", "placement", "cache"], help="which what-if to run")
    p.add_argument("--run", metavar="R", help="only this run (default: every run in TRACE)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default: table)")
    g = p.add_argument_group("capacity")
    g.add_argument(
        "--factors",
        type=_floats,
        default=[1.0, 1.25, 1.5, 2.0],
        metavar="F,F,...",
        help="capacity factors to replay (default: 1,1.25,1.5,2)",
    )
    g.add_argument(
        "--group",
        default="batch",
        metavar="G",
        help="capacity group: 'batch' (one forward pass), 'sequence', or a number of consecutive tokens (default: batch)",
    )
    g.add_argument(
        "--window",
        default="all",
        metavar="W",
        help="step windows: 'all' (one per run), 'thirds', or a width in steps (default: all)",
    )
    g.add_argument(
        "--source",
        choices=["auto", "routing", "counts"],
        default="auto",
        help="replay token-level routing, or per-step counts (batch groups only; exact when a step is one "
        "forward pass, else a lower bound); auto: routing, except batch groups on a token sample (default: auto)",
    )
    g = p.add_argument_group("placement")
    g.add_argument("--devices", type=int, default=8, metavar="D", help="expert-parallel devices (default: 8)")
    g.add_argument(
        "--replicas",
        type=int,
        default=0,
        metavar="R",
        help="extra expert replicas per layer for hot experts, as in DeepSeek's EPLB (default: 0)",
    )
    g.add_argument(
        "--fit", type=_range, metavar="A:B", help="steps to fit the placement on (default: first half of the steps)"
    )
    g.add_argument(
        "--eval",
        type=_range,
        metavar="C:D",
        help="held-out steps to judge it on (default: the steps after the fit window)",
    )
    g.add_argument(
        "--show-placement",
        action="store_true",
        help="print the suggested placement (run, layer, expert, device, share) instead of the before/after report",
    )
    g = p.add_argument_group("cache")
    g.add_argument("--sizes", type=_ints, metavar="C,C,...", help="cache sizes in experts (default: 1..N per layer)")
    g.add_argument(
        "--policies",
        default="lru,lfu,belady",
        metavar="P,P,...",
        help="replacement policies among lru, lfu, belady (default: all three)",
    )
    p.set_defaults(func=run)


def open_trace(path: str | Path) -> Any:
    """Open TRACE the way every command does (a `moescope.Trace`; its `.con` carries the views)."""
    import moescope

    return moescope.open(path)


def _emit(df: pd.DataFrame, fmt: str) -> None:
    """Write a DataFrame to stdout as a table, CSV or JSON records."""
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
        return
    if fmt == "json":
        sys.stdout.write(df.to_json(orient="records") + "\n")
        return
    if df.empty:
        sys.stdout.write("(no rows)\n")
        return
    # a terminal table: columns with nothing in them go, and notes print once under the table, not per row
    notes: list[tuple[Any, str]] = []
    if "note" in df:
        runs = df["run"] if "run" in df else [None] * len(df)
        notes = [(r, n) for r, n in dict.fromkeys(zip(runs, df.pop("note"))) if isinstance(n, str) and n]
    df = df.dropna(axis=1, how="all")
    sys.stdout.write(df.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-") + "\n")
    for r, n in notes:  # a note is about one run: say which
        sys.stdout.write(f"note (run {r}): {n}\n" if r is not None else f"note: {n}\n")


def run(args: argparse.Namespace) -> int:
    """Run one what-if on TRACE and print its table."""
    from ..analysis import whatif
    from ..analysis.selection import Selection, check_selection
    from ..errors import as_usage

    tr = open_trace(args.trace)
    try:
        # A typo'd run is a usage error naming the runs that exist (SelectionError is a ValueError: exit 2).
        check_selection(tr.cursor(), Selection(run=args.run), "--run")
        if args.analysis == "capacity":
            window: Any = int(args.window) if str(args.window).isdigit() else args.window
            df = whatif.capacity_drops(
                tr, run=args.run, factors=args.factors, group=args.group, window=window, source=args.source
            )
            if args.format == "table":
                df = df.drop(columns=["window", "group"])
        elif args.analysis == "placement":
            plan = whatif.suggest_placement(
                tr,
                devices=args.devices,
                run=args.run,
                fit_steps=args.fit,
                eval_steps=args.eval,
                replicas=args.replicas,
            )
            df = plan.placement if args.show_placement else plan.report
        else:
            policies = [p.strip().lower() for p in args.policies.split(",") if p.strip()]
            df = whatif.cache_hit_rates(tr, run=args.run, sizes=args.sizes, policies=policies)
            if args.format == "table" and not df.empty:
                # one column per policy reads better on a terminal than one row per policy
                df = df.pivot_table(
                    index=["run", "layer", "cache_size", "n_experts", "tokens"], columns="policy", values="hit_rate"
                ).reset_index()
                df.columns.name = None
    except ValueError as e:  # the what-ifs raise ValueError for bad arguments; damaged data stays exit 3
        raise as_usage(e) from None
    _emit(df, args.format)
    return 0

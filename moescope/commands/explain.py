"""`moescope explain TRACE`: what a flight dump says went wrong, in plain words with the numbers."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

EPILOG = """\
examples:
  moescope explain traces                       # the latest dump of every run
  moescope explain traces --run run-a --step 1200 --layer 3
  moescope explain traces --format json

A dump is written while recording with moescope.record(model, path, flight_steps=8) when an online alert
fires (non-finite logits, collapse, a dead expert) or when you call rec.dump_flight().
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `explain` command to the CLI."""
    p = subparsers.add_parser(
        "explain",
        help="read a flight dump and say why routing went wrong (non-finite logits, dtype, bias, load)",
        description="Read the flight recorder's dump of a run (RUN/flight/) and state what went wrong, with the "
        "numbers: tokens and positions with non-finite router logits, input norm outliers, logit magnitude against "
        "the dtype's range and resolution, tokens whose experts change in float32, and which experts took the load.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", metavar="TRACE", help="trace root or run directory")
    p.add_argument("--run", metavar="RUN", help="only this run")
    p.add_argument("--step", type=int, metavar="S", help="the dump written at step S (or whose sample covers S)")
    p.add_argument("--layer", type=int, metavar="L", help="only this layer")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Explain the selected dumps; exit 1 when any states a problem, 0 when none does."""
    from ..analysis.explain import explain, render, select_dumps
    from ..errors import as_usage

    try:  # a run, step or layer that matches no dump is a usage error (exit 2)
        dumps = select_dumps(args.trace, run=args.run, step=args.step)
        explained = [(d, explain(d, args.layer)) for d in dumps]
    except ValueError as e:
        raise as_usage(e) from None
    problems = 0
    docs = []
    for d, findings in explained:
        problems += sum(f.severity == "problem" for f in findings)
        if args.format == "json":
            docs.append({"dump": str(d.path), "step": d.step, "reason": d.meta.get("reason"),
                         "findings": [asdict(f) for f in findings]})
        else:
            print(render(d, findings))
    if args.format == "json":
        json.dump(docs, sys.stdout, indent=1, default=float)
        print()
    return 1 if problems else 0

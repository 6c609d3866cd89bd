"""`moescope watch TRACE`: a terminal live view of a run while it records (for login nodes with no browser).

One row per run × layer over the latest window of steps: a sparkline of every expert's utilization N·f
(one character per expert, full block = 2× fair share, '·' = below the dead-expert limit), min and max N·f,
load CV, the top-m share, and the latest online alerts kept in the trace. The trace is re-read every
--interval seconds (`Trace.refresh()`: new parts only), and the table recomputed only when data arrived.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import pandas as pd

EPILOG = """\
examples:
  moescope watch traces/run-a                 # refresh every 5 s until Ctrl-C
  moescope watch traces --interval 2 --window 200
  moescope watch traces/run-a --once          # one frame, for scripts and logs
"""

#: Sparkline levels, lowest first; index 0 marks an expert below the dead-expert limit.
BARS = "·▁▂▃▄▅▆▇█"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `watch` command to the CLI."""
    p = subparsers.add_parser(
        "watch",
        help="live terminal view of a recording trace (utilization per run × layer, alerts)",
        description="Follow a trace while it records: per run × layer, a sparkline of expert utilization N·f over "
        "the latest window, min/max N·f, load CV, top-m share and the latest online alerts. Ctrl-C quits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", metavar="TRACE", help="trace root or run directory")
    p.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between re-reads of the trace (default: 5)")
    p.add_argument("--window", type=int, default=100, metavar="STEPS",
                   help="steps per window; the latest window of each run is shown (default: 100)")
    p.add_argument("--run", action="append", metavar="RUN", help="show only this run (repeatable)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (scripts, tests, CI logs)")
    p.set_defaults(func=run)


def sparkline(util: list[float], dead_below: float) -> str:
    """One character per expert: its N·f on a scale where a full block is twice the fair share."""
    out = []
    for u in util:
        if u is None or pd.isna(u) or u < dead_below:
            out.append(BARS[0])
        else:
            out.append(BARS[1 + min(7, int(min(float(u), 2.0) / 2.0 * 7.999))])
    return "".join(out)


def frame_rows(tr: Any, window: int, runs: list[str] | None = None) -> pd.DataFrame:
    """Per run × layer over its latest window: steps, sparkline input, min/max N·f, cv, top_m_share, alerts."""
    from ..analysis.live import alerts_frame

    cols = ["run", "layer", "n_experts", "top_k", "window_start", "window_end", "util", "min_utilization",
            "max_utilization", "cv", "top_m_share", "collapse_m", "alerts"]
    lm = tr.load_metrics(run=runs, window=window)
    if lm.empty:
        return pd.DataFrame(columns=cols)
    last = lm.sort_values("window_start").groupby(["run", "layer"], sort=False).tail(1)
    util = tr.utilization(run=runs, window=window)
    util = util.merge(last[["run", "layer", "window_start"]], on=["run", "layer", "window_start"])
    per_layer = {k: g.sort_values("expert")["utilization"].tolist() for k, g in util.groupby(["run", "layer"])}
    alerts = alerts_frame(tr)
    latest: dict[tuple[str, int], str] = {}
    for (r, layer), g in alerts.groupby(["run", "layer"]):
        latest[(r, int(layer))] = ", ".join(f"{a.status} {a.rule}@{int(a.step)}" for a in g.head(3).itertuples())
    rows = []
    for rec in last.sort_values(["run", "layer"]).to_dict("records"):
        key = (rec["run"], int(rec["layer"]))
        rows.append({**{c: rec.get(c) for c in cols}, "util": per_layer.get(key, []), "alerts": latest.get(key, "")})
    if runs:
        order = {r: i for i, r in enumerate(runs)}
        rows.sort(key=lambda x: (order.get(x["run"], 0), x["layer"]))
    return pd.DataFrame(rows, columns=cols)


def render(tr: Any, rows: pd.DataFrame, source: str) -> Any:
    """The frame as a rich renderable: a title line with the live state, then the table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ..config import HealthConfig

    dead = float(HealthConfig().dead_expert.fail_below)
    state = tr.live_state()
    head = Text.assemble(("moescope watch ", "bold"), (source, "cyan"), "  ", (state.describe(), _state_style(state)))
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for name, kw in (("run", {}), ("layer", {"justify": "right"}), ("steps", {"justify": "right"}),
                     ("N·f per expert", {}), ("min N·f", {"justify": "right"}), ("max N·f", {"justify": "right"}),
                     ("CV", {"justify": "right"}), ("top-m share", {"justify": "right"}), ("latest alerts", {})):
        table.add_column(name, **kw)
    for r in rows.to_dict("records"):
        low = r["min_utilization"]
        style = "red" if pd.notna(low) and low < dead else ""
        m = r["collapse_m"]
        table.add_row(
            str(r["run"]), str(int(r["layer"])), f"{int(r['window_start']):,}–{int(r['window_end']):,}",
            Text(sparkline(r["util"], dead), style=style), _num(low), _num(r["max_utilization"]), _num(r["cv"]),
            (_num(r["top_m_share"], "{:.0%}") + (f" (m={int(m)})" if pd.notna(m) else "")),
            Text(str(r["alerts"]), style="red" if "FAIL" in str(r["alerts"]) else "yellow"),
        )
    if rows.empty:
        return Group(head, Text("no steps recorded yet: waiting for the first flush", style="dim"))
    return Group(head, table)


def _state_style(state: Any) -> str:
    return {"stopped": "bold red", "recording": "green", "finished": "dim"}.get(state.state, "")


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return "—" if v is None or pd.isna(v) else fmt.format(float(v))


def run(args: argparse.Namespace) -> int:
    """Open the trace, then print one frame (--once) or keep a live display until Ctrl-C."""
    from ..analysis.trace import Trace
    from ..cli import CLIError

    if not args.interval > 0:
        raise CLIError(f"--interval must be a positive number of seconds, got {args.interval:g}", 2)
    if args.window < 1:
        raise CLIError(f"--window must be at least 1 step, got {args.window}", 2)
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:  # pragma: no cover - rich is a core dependency
        raise CLIError("moescope watch needs rich: pip install rich", 2) from None
    from ..format.writer import TraceError

    said = False
    while True:
        try:
            tr = Trace(args.trace)  # TraceError (exit 3) for a missing or unreadable trace, as every command
            break
        except TraceError as e:
            # A job that has just started has a manifest and no flush yet: wait for it (not with --once).
            if args.once or "empty trace" not in str(e):
                raise
            if not said:
                sys.stderr.write(f"moescope watch: {args.trace}: no data yet, waiting for the first flush\n")
                said = True
            try:
                time.sleep(args.interval)
            except KeyboardInterrupt:
                return 0
    unknown = [r for r in args.run or [] if r not in tr.runs]
    if unknown:
        raise CLIError(f"no run {unknown[0]!r} in {args.trace} (runs: {', '.join(tr.runs)})", 2)
    console = Console()
    cache: dict[int, pd.DataFrame] = {}

    def frame() -> Any:
        v = tr.data_version
        if v not in cache:  # recompute only when data arrived; the live state line updates every tick
            cache.clear()
            cache[v] = frame_rows(tr, args.window, args.run)
        return render(tr, cache[v], str(args.trace))

    if args.once:
        console.print(frame())
        tr.close()
        return 0
    try:
        with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(args.interval)
                tr.refresh()
                live.update(frame())
    except KeyboardInterrupt:  # the normal way out: leave the last frame on screen, exit 0
        sys.stderr.write("moescope watch: stopped\n")
    finally:
        tr.close()
    return 0

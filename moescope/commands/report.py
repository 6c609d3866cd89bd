"""`moescope report TRACE`: a human summary per run and per layer: key metrics and health findings."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from ._legend import LEGEND

EPILOG = """\
examples:
  moescope report traces
  moescope report traces --run run-a --window 500 --config moescope.toml
  moescope report traces --experts --top 8    # what each expert takes, as text (token-level runs)
"""

_MARK = {"PASS": "ok", "SKIP": "skip", "WARN": "WARN", "FAIL": "FAIL", "ERROR": "ERROR"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `report` command to the CLI."""
    p = subparsers.add_parser(
        "report",
        help="human summary of a trace: per run and layer, key metrics and findings",
        description="Summarise a trace for a person: per run, the latest step window's load and router metrics "
        "per layer, then every health finding that is not a PASS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", metavar="TRACE", help="trace root or run directory")
    p.add_argument("--run", action="append", metavar="RUN", help="only this run (repeatable)")
    p.add_argument("--config", metavar="PATH", help="health-rule thresholds (moescope.toml)")
    p.add_argument("--window", metavar="W", default=None,
                   help='step window: "thirds" (default), "all", or a width in steps')
    p.add_argument("--experts", action="store_true",
                   help="also list, per layer and expert, the tokens it takes most (decoded with the run's "
                   "tokenizer, else shown as #id), its share vs chance k/N and its shares by tag")
    p.add_argument("--top", type=int, default=5, metavar="N", help="tokens listed per expert with --experts (5)")
    p.add_argument("--min-count", type=int, default=5, metavar="C",
                   help="with --experts, only token ids seen at least C times (5)")
    p.set_defaults(func=run)


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(f):
        return "–"
    return fmt.format(f)


def _tokens(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(f):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if f >= div:
            return f"{f / div:.1f}{unit}"
    return f"{f:.0f}"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as right-aligned text columns (plain Python: pandas' to_string cost ~4 ms a run on a 1,000-run root)."""
    heads = list(rows[0])
    cells = [[str(r[h]) for h in heads] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    return [" ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [heads, *cells]]


def render_experts(tr: Any, run: str, top: int = 5, min_count: int = 5) -> list[str]:
    """The --experts lines of one run: per layer and expert, what it takes (vocab.expert_view's sentences)."""
    from ..analysis.vocab import run_decoders

    view = tr.vocab_specialization(run=run, per_expert=True, top=top, min_count=min_count)
    if view.empty:
        return ["  what each expert takes: no token-level routing in this run (record with tokens=F to keep "
                f"whole sequences), or no token id seen {min_count}+ times"]
    out = [f"  what each expert takes (token ids seen {min_count}+ times, ranked by the share of their "
           "occurrences routed to the expert):"]
    note = run_decoders(tr, [run])[run].note
    if note:
        out.append(f"    ({note})")
    out += [f"    {line}" for line in view["text"]]
    return out


def render_report(tr: Any, runs: list[str] | None = None, config: Any = None, window: Any = None,
                  experts: bool = False, top: int = 5, min_count: int = 5) -> str:
    """The text of `moescope report` (separate from printing, so tests and the dashboard can reuse it);
    experts=True adds each run's per-expert token lines."""
    from ..analysis.metrics import describe_steps
    from ..analysis.rules import STATUS_ORDER, severity
    from ..config import as_config

    cfg = as_config(config)
    if window is not None:
        cfg = cfg.copy()  # the caller's config stays as it was
        cfg.window = window
    runs = runs or list(tr.runs)
    lm = tr.load_metrics(run=runs, window=cfg.window)
    health = tr.health(run=runs, config=cfg)
    info = tr.sql("SELECT run, min(created) AS created, any_value(model_class) AS model, max(n_layers) AS n_layers, "
                  "count(*) AS ranks FROM runs GROUP BY run").df().set_index("run")
    out: list[str] = []
    # Split once by run (a boolean filter per run costs runs × rows: minutes on a root of 1,000 runs).
    lm_by = {str(k): g for k, g in lm.groupby("run", sort=False)}
    h_by = {str(k): g for k, g in health.groupby("run", sort=False)}
    # The routing-based analyses cover only the steps with token rows (record(tokens_every=N): every N-th).
    tok_by = {str(k): g["step"].to_numpy() for k, g in tr.token_steps(run=runs).groupby("run", sort=False)}
    for run in runs:
        r = info.loc[run] if run in info.index else None
        rl = lm_by.get(run, lm.iloc[0:0])
        steps = f"steps {int(rl['window_start'].min())}–{int(rl['window_end'].max())}" if len(rl) else "no load data"
        head = f"run {run}"
        if r is not None:
            head += f"  ·  model {r['model']}  ·  {int(r['ranks'])} rank(s)  ·  created {r['created']}"
        out += [head, f"  {steps}"]
        if run in tok_by:
            every = (tr.manifest(run).get("capture") or {}).get("tokens_every")
            out.append(f"  token rows (routing analyses): {describe_steps(tok_by[run])}"
                       + (f"; tokens_every={every}" if every and every > 1 else ""))
        h = h_by.get(run, health.iloc[0:0])
        worst_by_layer = {int(k): max(g, key=severity) for k, g in h.groupby("layer")["status"]} if len(h) else {}
        if len(rl):
            last = rl.sort_values("window_start").groupby("layer", sort=True).tail(1).sort_values("layer")
            ws, we = int(last["window_start"].min()), int(last["window_end"].max())
            out.append(f"  latest window per layer (steps {ws}–{we}):")
            rows = []
            for row in last.to_dict("records"):
                status = worst_by_layer.get(int(row["layer"]), "–")
                rows.append({
                    "layer": int(row["layer"]),
                    "N": int(row["n_experts"]),
                    "k": int(row["top_k"]),
                    "tokens": _tokens(row["tokens"]),
                    "min N·f": _num(row["min_utilization"]),
                    "max N·f": _num(row["max_utilization"]),
                    "cv": _num(row["cv"]),
                    "maxvio": _num(row["maxvio"]),
                    "H/lnN": _num(row["load_entropy"]),
                    "gini": _num(row["gini"]),
                    "aux": _num(row["aux_loss"]),
                    "z-loss": _num(row["z_loss"], "{:.3g}"),
                    "nonfinite": _num(row["nonfinite"], "{:.0f}"),
                    "drop%": _num(None if row["drop_rate"] is None else 100 * float(row["drop_rate"] or 0), "{:.1f}"),
                    "health": _MARK.get(status, status),
                })
            out += ["    " + line for line in _table(rows)]
        bad = h[h["status"].isin(["FAIL", "ERROR", "WARN"])].copy()
        counts = h["status"].value_counts().to_dict()
        summary = ", ".join(f"{counts[s]} {s}" for s in reversed(STATUS_ORDER) if counts.get(s))
        out.append(f"  findings: {summary or 'none'}")
        if len(bad):
            bad["_sev"] = bad["status"].map(severity)
            bad = bad.sort_values(["_sev", "layer", "window_start"], ascending=[False, True, True])
            for f in bad.to_dict("records"):
                where = f" [{f['window']}]" if f["window"] else ""
                out.append(f"    {f['status']:<5} {f['rule']:<12}{where} {f['message']}")
        skips = h[h["status"] == "SKIP"]
        if len(skips):
            reasons = skips["message"].str.replace(r"^layer \d+: ", "", regex=True).value_counts()
            out.append(f"    ({len(skips)} skipped: {reasons.index[0]}{' …' if len(reasons) > 1 else ''})")
        if experts:
            out += render_experts(tr, run, top, min_count)
        out.append("")
    from ..analysis.live import alert_summary

    alerts = alert_summary(tr)
    if alerts:  # what the recorder raised while training (raise_on stops first)
        out += ["Alerts kept in the trace:", *(f"  {line}" for line in alerts), ""]
    out.append(LEGEND)  # the terms above, once (the same text as the demo prints)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """Execute `moescope report`."""
    from ..analysis.trace import Trace
    from ..errors import CLIError

    tr = Trace(args.trace)
    window: Any = args.window
    if isinstance(window, str) and window.isdigit():
        window = int(window)
    if window not in (None, "thirds", "all") and not (isinstance(window, int) and window > 0):
        raise CLIError(f'--window must be "thirds", "all" or a number of steps, got {args.window!r}')
    unknown = [r for r in args.run or [] if r not in tr.runs]
    if unknown:
        raise CLIError(f"no run {unknown[0]!r} in {args.trace} (runs: {', '.join(tr.runs)})")
    if args.top < 1 or args.min_count < 1:
        raise CLIError(f"--top and --min-count must be >= 1, got {args.top} and {args.min_count}")
    text = render_report(tr, args.run, args.config, window, experts=args.experts, top=args.top,
                         min_count=args.min_count)  # errors: moescope.errors.classify (cli.main)
    sys.stdout.write(text)
    return 0

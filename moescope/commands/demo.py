"""`moescope demo`: train the bundled reference MoE through four scenarios, record traces, print their health."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from ._legend import LEGEND

EPILOG = """scenarios (each a real training run on the Python standard library's own source, bytes as tokens):
  balanced   Switch aux loss 0.01 + z-loss + aux-loss-free bias balancing: healthy routing
  collapse   no aux loss, no z-loss, learned router bias, hot router: the router collapses through training
  shift      trained on English (docstrings, comments), evaluated on English and code (tags english, code)
  upcycled   experts copied from one dense FFN plus small noise, balanced: near-clones (expert snapshots at
             checkpoints); its only finding is the clones WARN

then:
  moescope report moescope-demo             per run and layer: metrics and findings
  moescope check moescope-demo/collapse     the health rules, exit 1 on a FAIL
  moescope dashboard moescope-demo          browse the traces

sample_traces/ in the repository is the default demo's output: moescope demo --out sample_traces
"""

#: Wall time of the whole demo as measured (README's Quickstart quotes the same line).
TIMINGS = (
    "Measured with `/usr/bin/time` from a fresh clone on 2 CPU cores (torch 2.13 CPU, one other job running): "
    "`moescope demo` 42 s, `moescope demo --quick` 22 s"
)


def register(sub: Any) -> None:
    """Add the `demo` command."""
    p = sub.add_parser(
        "demo",
        help="train the reference MoE through four routing scenarios, write traces, print a health summary",
        description="Train the bundled reference MoE (a small Mixtral-style decoder) through four scenarios — "
        "balanced, collapse, shift, upcycled — recording every run with moescope.record into DIR/<scenario>, "
        f"printing each scenario's expected and found health as it finishes. Needs torch. {TIMINGS}.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="moescope-demo", metavar="DIR", help="trace root to write (default: moescope-demo)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train: auto picks cuda when available (bf16 autocast), else cpu")
    p.add_argument("--quick", action="store_true", help="shorter runs (3x fewer steps) for a smoke test")
    p.add_argument("--seed", type=int, default=0, help="seed of model init, data order and token sampling (default 0)")
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="run only this scenario (repeatable): balanced, collapse, shift, upcycled")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="CPU threads for torch (default 1: the model is tiny, so one thread is as fast, "
                   "bitwise reproducible, and never thrashes on a busy machine)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress: no bar on a terminal, no per-step lines in a pipe or log")
    p.set_defaults(func=run)


def _device(name: str) -> Any:
    import torch

    from ..cli import CLIError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def _prepare_out(out: Path, names: list[str]) -> None:
    """Create the trace root; replace earlier demo runs of the same names (and nothing else)."""
    from ..cli import CLIError

    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    for name in names:
        run_dir = out / name
        if not run_dir.exists():
            continue
        # the recorder resumes runs it finds; a demo starts over, but never deletes what it did not write
        if not (run_dir / "manifest.json").is_file():
            raise CLIError(f"--out {out}: {run_dir} exists and is not a moescope run; choose another --out")
        shutil.rmtree(run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot create it ({e.strerror})") from None


def run(args: argparse.Namespace) -> int:
    """Run the demo scenarios and print a health summary."""
    from ..cli import CLIError

    try:
        import torch
    except ImportError:
        raise CLIError("the demo trains a model and needs torch: pip install 'moescope[torch]'") from None
    from ..reference.scenarios import SCENARIO_NAMES

    names = list(dict.fromkeys(args.scenario or SCENARIO_NAMES))
    unknown = [n for n in names if n not in SCENARIO_NAMES]
    if unknown:
        raise CLIError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIO_NAMES)}")
    device = _device(args.device)
    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out)
    _prepare_out(out, names)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_all(args, names, device, out)
    finally:
        torch.set_num_threads(threads)


def _run_all(args: argparse.Namespace, names: list[str], device: Any, out: Path) -> int:
    from ..reference.data import load_corpus
    from ..reference.scenarios import build_scenarios, run_scenario, total_steps

    # Each line reaches a pipe (CI logs, `| tee`) as it is printed, not when the process exits.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    scenarios = build_scenarios(quick=args.quick)
    t0 = time.perf_counter()
    print(f"moescope demo: {len(names)} scenario(s) on {device} -> {out}/  (seed {args.seed}"
          f"{', quick' if args.quick else ''})")
    corpus = load_corpus(seed=args.seed)
    results = []
    as_expected = []
    for name in names:
        sc = scenarios[name]
        r = _run_one(sc, out, device, args, corpus, run_scenario, total_steps(sc))
        results.append(r)
        evals = "  ".join(f"eval[{k}] {v:.2f}" for k, v in r["eval_lm_loss"].items())
        print(f"  {r['name']:<9} {r['steps']:>4} steps  {r['seconds']:5.1f}s  train loss {r['final_lm_loss']:.2f}  "
              f"{evals}".rstrip())
        as_expected.append(print_scenario_health(out, sc))
    wall = time.perf_counter() - t0

    print(f"\ndone in {wall:.1f}s: {sum(as_expected)} of {len(as_expected)} scenario(s) found as expected\n")
    print_load_summary(out, names)
    print()
    print(LEGEND, end="")
    print(f"\nnext: moescope report {out}    moescope check {out}/collapse    moescope dashboard {out}")
    return 0


def _run_one(sc: Any, out: Path, device: Any, args: argparse.Namespace, corpus: Any, run_scenario: Any,
             n_steps: int) -> dict[str, Any]:
    from tqdm.auto import tqdm

    # A terminal gets a bar (on stderr); a pipe or log gets a plain line every tenth of the run instead, so
    # a CI log shows the demo moving. --no-progress: neither.
    tty = sys.stderr.isatty()
    bar = tqdm(total=n_steps, desc=f"{sc.name:<9}", unit="step", disable=args.no_progress or not tty,
               leave=True, dynamic_ncols=True, file=sys.stderr)
    every = max(1, n_steps // 10)
    t0 = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.2f}", refresh=False)
        done = step + 1
        if not tty and not args.no_progress and (done % every == 0 or done == n_steps):
            print(f"  {sc.name:<9} step {done:>4}/{n_steps}  loss {loss:.2f}  {time.perf_counter() - t0:5.1f}s",
                  flush=True)

    try:
        return run_scenario(sc, out, device=device, seed=args.seed, corpus=corpus, progress=progress)
    finally:
        bar.close()


def worst_findings(df: Any) -> Any:
    """Per run and rule, the one finding to show: the worst status, then the most experts past the limit (for
    rules that flag experts under it, like dead experts), then the value farthest past its threshold."""
    import numpy as np
    import pandas as pd

    from ..analysis.rules.base import severity

    if df is None or len(df) == 0:
        return df
    value = pd.to_numeric(df["value"], errors="coerce").astype(float)
    thr = pd.to_numeric(df["threshold"], errors="coerce").astype(float)
    below = value < thr
    with np.errstate(divide="ignore", invalid="ignore"):
        # how many times past the limit, in the rule's own direction (0 under a limit of 0.05 is infinitely far)
        ratio = np.where(below, thr / value.clip(lower=0), value / thr.where(thr != 0))
    n_experts = df["expert"].map(lambda e: len(e) if hasattr(e, "__len__") and not isinstance(e, str) else 0)
    ranked = df.assign(
        _sev=df["status"].map(severity),
        _n=np.where(below, n_experts, 0),
        _far=pd.Series(ratio, index=df.index).fillna(-1.0),
    )
    ranked = ranked.sort_values(["_sev", "_n", "_far"], ascending=False, kind="stable")
    return ranked.drop_duplicates(["run", "rule"]).drop(columns=["_sev", "_n", "_far"])


def expected_text(sc: Any) -> str:
    """What scenario `sc` should show, in words."""
    if sc.expect_worst == "PASS":
        text = "every rule PASS"
    else:
        rules = ", ".join(sc.expect_rules)
        text = f"{sc.expect_worst} {rules}" if rules else f"at worst {sc.expect_worst}"
        text += " only" if sc.expect_only and rules else ""
    if sc.expect_drift:
        text += f"; drift {' -> '.join(sc.eval_domains)} flagged"
    return text


def judge(sc: Any, health: Any, drift: Any = None) -> tuple[bool, str]:
    """(as expected?, what was found) for scenario `sc` given its findings and, for shift, its drift rows."""
    from ..analysis.rules.base import severity, worst

    bad = health[health["status"].map(severity) >= severity("WARN")] if len(health) else health
    judged = health[health["status"] != "SKIP"] if len(health) else health  # a SKIP (no snapshot) is no finding
    found_worst = worst(judged["status"]) if len(judged) else "PASS"
    by_status: dict[str, list[str]] = {}
    for status, g in bad.groupby("status"):
        by_status[str(status)] = sorted(set(g["rule"]))
    found = "; ".join(f"{s} {', '.join(by_status[s])}" for s in ("ERROR", "FAIL", "WARN") if s in by_status)
    found = found or "every rule PASS"
    ok = severity(found_worst) <= severity(sc.expect_worst)
    ok &= all(r in by_status.get(sc.expect_worst, []) for r in sc.expect_rules)
    if sc.expect_only and sc.expect_worst != "PASS":
        ok &= set(bad["rule"]) <= set(sc.expect_rules)
    if sc.expect_drift:
        flagged = [] if drift is None or len(drift) == 0 else [int(x) for x in drift[drift["flagged"]]["layer"]]
        found += f"; drift flagged in layer(s) {', '.join(map(str, flagged))}" if flagged else "; no drift flagged"
        ok &= bool(flagged)
    return bool(ok), found


def print_scenario_health(out: Path, sc: Any) -> bool:
    """Print one scenario's expected vs found verdict and its worst findings; True when found as expected."""
    import moescope

    try:
        with moescope.open(out / sc.name) as tr:
            health = tr.health()
            drift = None
            if sc.expect_drift and len(sc.eval_domains) >= 2:
                base, cur = sc.eval_domains[:2]
                drift = tr.drift(baseline={"tag": base}, current={"tag": cur})
    except Exception as e:  # noqa: BLE001 - a demo keeps going; the traces are written either way
        print(f"    (health unavailable: {e.__class__.__name__}: {e})")
        return False
    ok, found = judge(sc, health, drift)
    print(f"    expected: {expected_text(sc)}")
    print(f"    found:    {found}  {'-> as expected' if ok else '-> NOT as expected'}")
    _print_findings(health, indent="    ")
    if drift is not None:
        base, cur = sc.eval_domains[:2]
        print(f"    drift {base} (baseline) -> {cur}  (moescope check --tag {cur} --reference-tag {base}):")
        for _, r in drift.iterrows():
            print(f"      {r['status']:<5} layer {int(r['layer'])}: JS distance {r['js']:.3f} "
                  f"(threshold {r['threshold']:.3f}), TV {r['tv']:.3f}")
    return ok


def _print_findings(df: Any, indent: str = "  ") -> None:
    if df is None or len(df) == 0:
        print(f"{indent}health: no findings")
        return
    from ..analysis.rules.base import STATUS_ORDER

    worst = worst_findings(df)
    for run, g in df.groupby("run", sort=False):
        counts = g["status"].value_counts()
        summary = ", ".join(f"{counts[s]} {s}" for s in reversed(STATUS_ORDER) if s in counts)
        shown = worst[(worst["run"] == run) & ~worst["status"].isin(["PASS", "SKIP"])]
        print(f"{indent}{run}: {summary}" + ("; the worst finding per rule (moescope check for all):" if len(shown)
                                               else ""))
        for _, row in shown.iterrows():
            head = f"{indent}  {row['status']:<5} {row['rule']:<14} "
            # whole messages, wrapped: a number cut mid-formula reads as a different number
            print(textwrap.fill(str(row["message"]), width=max(100, len(head) + 40), initial_indent=head,
                                subsequent_indent=" " * len(head), break_long_words=False))


def load_summary(out: Path, names: list[str]) -> list[dict[str, Any]]:
    """Per run, tag and layer over the run's second half of steps, from the expert_load Parquet files: share of
    the busiest max(k, N/4) experts, lowest and highest utilization N·f, experts under 5% of their fair share."""
    import json

    import pyarrow.dataset as ds

    rows: list[dict[str, Any]] = []
    for name in names:
        d = out / name / "expert_load"
        if not d.is_dir():
            continue
        try:
            layers = json.loads((out / name / "manifest.json").read_text()).get("layers", [])
            top_k = {int(ly["layer"]): int(ly["top_k"]) for ly in layers}
        except (OSError, ValueError, KeyError, TypeError):
            top_k = {}
        cols = ["step", "tag", "layer", "expert", "tokens"]
        t = ds.dataset(str(d), format="parquet").to_table(columns=cols).to_pandas()
        t = t[t["step"] >= (int(t["step"].max()) + 1) // 2]  # the second half of the run: where routing ended up
        for (tag, layer), g in t.groupby(["tag", "layer"]):
            per = g.groupby("expert")["tokens"].sum()
            n = int(per.index.max()) + 1
            counts = per.reindex(range(n), fill_value=0).sort_values(ascending=False).to_numpy()
            total = counts.sum()
            if total == 0:
                continue
            m = max(top_k.get(int(layer), 2), n // 4)
            util = n * counts / total
            rows.append({
                "run": name, "tag": tag, "layer": int(layer), "n_experts": n, "m": m,
                "top_m_share": float(counts[:m].sum() / total),
                "min_utilization": float(util[-1]), "max_utilization": float(util[0]),
                "dead": int((util < 0.05).sum()),
            })
    return rows


def print_load_summary(out: Path, names: list[str]) -> None:
    """Print the per-run, per-layer expert load summary computed straight from the Parquet files."""
    rows = load_summary(out, names)
    if not rows:
        print("no expert_load data found")
        return
    print("expert load in the second half of each run (utilization N*f: 1.0 = fair share; tag '-' = training):")
    print(f"  {'run':<9} {'tag':<8} {'layer':>5}  {'busiest m':>9}  {'their share':>11}  {'min util':>8}  "
          f"{'max util':>8}  {'dead':>4}")
    for r in rows:
        print(f"  {r['run']:<9} {r['tag'] or '-':<8} {r['layer']:>5}  {r['m']:>4} of {r['n_experts']:<2}  "
              f"{r['top_m_share']:>11.2f}  {r['min_utilization']:>8.2f}  {r['max_utilization']:>8.2f}  {r['dead']:>4}")

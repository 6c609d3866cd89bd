"""`moescope demo`: train the bundled reference MoE through four scenarios, record traces, print their health."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

EPILOG = """scenarios (each a real training run on the Python standard library's own source, bytes as tokens):
  balanced   Switch aux loss 0.01 + z-loss + aux-loss-free bias balancing: healthy routing
  collapse   no aux loss, no z-loss, learned router bias, hot router: the router collapses through training
  shift      trained on English (docstrings, comments), evaluated on English and code (tags english, code)
  upcycled   experts copied from one dense FFN plus small noise: near-clones (expert snapshots at checkpoints)

then:
  moescope check moescope-demo              the health rules, exit 1 on a FAIL
  moescope dashboard moescope-demo          browse the traces
"""


def register(sub: Any) -> None:
    """Add the `demo` command."""
    p = sub.add_parser(
        "demo",
        help="train the reference MoE through four routing scenarios, write traces, print a health summary",
        description="Train the bundled reference MoE (a small Mixtral-style decoder) through four scenarios — "
        "balanced, collapse, shift, upcycled — recording every run with moescope.record into DIR/<scenario>, "
        "then print the health findings. Needs torch. A few minutes on a laptop CPU; --quick in under a minute.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="moescope-demo", metavar="DIR", help="trace root to write (default: moescope-demo)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train: auto picks cuda when available (bf16 autocast), else cpu")
    p.add_argument("--quick", action="store_true", help="shorter runs (about 4x fewer steps) for a smoke test")
    p.add_argument("--seed", type=int, default=0, help="seed of model init, data order and token sampling (default 0)")
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help="run only this scenario (repeatable): balanced, collapse, shift, upcycled")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="CPU threads for torch (default 1: the model is tiny, so one thread is as fast, "
                   "bitwise reproducible, and never thrashes on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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

    scenarios = build_scenarios(quick=args.quick)
    t0 = time.perf_counter()
    print(f"moescope demo: {len(names)} scenario(s) on {device} -> {out}/  (seed {args.seed}"
          f"{', quick' if args.quick else ''})")
    corpus = load_corpus(seed=args.seed)
    results = []
    for name in names:
        sc = scenarios[name]
        results.append(_run_one(sc, out, device, args, corpus, run_scenario, total_steps(sc)))
    wall = time.perf_counter() - t0

    print()
    for r in results:
        evals = "  ".join(f"eval[{k}] {v:.2f}" for k, v in r["eval_lm_loss"].items())
        print(f"  {r['name']:<9} {r['steps']:>4} steps  {r['seconds']:5.1f}s  train loss {r['final_lm_loss']:.2f}  {evals}")
    print(f"done in {wall:.1f}s\n")
    print_health(out, names)
    print(f"\nnext: moescope check {out}    moescope dashboard {out}    moescope sql {out} \"SELECT ...\"")
    return 0


def _run_one(sc: Any, out: Path, device: Any, args: argparse.Namespace, corpus: Any, run_scenario: Any,
             n_steps: int) -> dict[str, Any]:
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal, none in logs and pipes
    bar = tqdm(total=n_steps, desc=f"{sc.name:<9}", unit="step", disable=True if args.no_progress else None,
               leave=True, dynamic_ncols=True)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.2f}", refresh=False)

    try:
        return run_scenario(sc, out, device=device, seed=args.seed, corpus=corpus, progress=progress)
    finally:
        bar.close()


def print_health(out: Path, names: list[str]) -> None:
    """Print the health findings of the demo runs (moescope.open(...).health()), else a load summary."""
    try:
        import moescope

        tr = moescope.open(out)
        try:
            df = tr.health()
        finally:
            close = getattr(tr, "close", None)
            if close is not None:
                close()
    except Exception as e:  # the analysis layer is optional here: fall back to the raw Parquet files
        print(f"(health rules unavailable: {e.__class__.__name__}: {e}; showing raw expert load)")
        print_load_summary(out, names)
        return
    _print_findings(df)
    if "shift" in names:
        _print_drift(out)
    print()
    print_load_summary(out, names)


def _print_drift(out: Path) -> None:
    """Print the shift run's routing drift from English to code, layer by layer."""
    import moescope

    try:
        tr = moescope.open(out)
        try:
            d = tr.drift(baseline={"run": "shift", "tag": "english"}, current={"run": "shift", "tag": "code"})
        finally:
            tr.close()
    except Exception as e:  # drift is an extra here; the findings above already printed
        print(f"(drift unavailable: {e.__class__.__name__}: {e})")
        return
    print("shift: routing drift, held-out English (baseline) -> code (moescope check --tag code --reference-tag english):")
    for _, r in d.iterrows():
        print(f"    {r['status']:<5} layer {int(r['layer'])}: JS distance {r['js']:.3f} (threshold {r['threshold']:.3f}), "
              f"TV {r['tv']:.3f}")


def _print_findings(df: Any) -> None:
    if df is None or len(df) == 0:
        print("health: no findings")
        return
    order = {"FAIL": 0, "ERROR": 1, "WARN": 2, "PASS": 3, "SKIP": 4}
    print("health findings (worst per run and rule; `moescope check DIR` for all):")
    df = df.assign(_o=df["status"].map(order).fillna(9))
    for run, g in df.groupby("run", sort=False):
        counts = g["status"].value_counts()
        summary = ", ".join(f"{counts[s]} {s}" for s in order if s in counts)
        print(f"  {run}: {summary}")
        worst = g.sort_values(["_o", "rule"]).drop_duplicates("rule")
        for _, row in worst.iterrows():
            if row["status"] in ("PASS", "SKIP"):
                continue
            print(f"    {row['status']:<5} {row['rule']:<14} {str(row['message'])[:110]}")


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

"""What `moescope compact` changes for readers: parts, bytes, cold open and health time, before vs after.

Side by side in one run, on a copy of sample_traces (4 runs, flush_every=10) and on a synthetic run written as a
recorder at flush_every=1 writes it (--flushes small flushes of --layers × --experts counts, token rows of a few
sequences each): the trace's part files and bytes, a cold `moescope.open` (every page verified, the checksum
cache emptied) and `tr.health()`, before compaction, then the same after `compact_run`, and the compaction's
own time. Three rounds each; the best is printed (a shared machine's load only ever adds time).

    python bench/compact_effect.py                 # sample_traces + 2,000 flushes
    python bench/compact_effect.py --flushes 300   # quick
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import moescope
from moescope.format import reader
from moescope.format.compact import compact_run, visible_parts
from moescope.format.writer import write_run

ROOT = Path(__file__).resolve().parents[1]


def synthetic(run: Path, flushes: int, layers: int, experts: int, seqs: int, tokens: int) -> None:
    """One part per table per flush, like a recorder at flush_every=1."""
    rng = np.random.default_rng(0)
    spec = [{"layer": ly, "module": f"layers.{ly}.mlp.gate", "n_experts": experts, "top_k": 2,
             "router_kind": "softmax_topk"} for ly in range(layers)]
    for step in range(flushes):
        counts = rng.multinomial(seqs * tokens * 2, np.ones(experts) / experts, size=layers)  # [L, E]
        load = pd.DataFrame({"step": step, "tag": "", "layer": np.repeat(np.arange(layers), experts),
                             "expert": np.tile(np.arange(experts), layers), "tokens": counts.reshape(-1),
                             "prob_sum": counts.reshape(-1) / 2.0, "weight_sum": counts.reshape(-1) / 2.0})
        stats = pd.DataFrame({"step": step, "tag": "", "layer": np.arange(layers), "tokens": seqs * tokens,
                              "entropy_sum": 1.0, "lse_sq_sum": 1.0, "lse_sum": 1.0, "lse_max": 1.0,
                              "margin_sum": 1.0, "nonfinite": 0, "dropped": 0})
        n = layers * seqs * tokens
        ids = rng.integers(0, experts, size=(n, 2))
        routing = pd.DataFrame({"step": step, "tag": "", "layer": np.repeat(np.arange(layers), seqs * tokens),
                                "seq": np.tile(np.repeat(np.arange(seqs), tokens), layers),
                                "pos": np.tile(np.arange(tokens), layers * seqs), "token_id": rng.integers(0, 1000, n),
                                "experts": list(ids), "weights": [[0.5, 0.5]] * n, "entropy": 1.0, "lse": 1.0,
                                "margin": 0.1})
        write_run(run, {"expert_load": load, "router_stats": stats, "routing": routing}, layers=spec)


def measure(root: Path, rounds: int) -> dict[str, float]:
    """Parts, bytes, best cold open and best health time of the trace at `root`."""
    parts = [p for run in root.iterdir() if (run / "manifest.json").exists()
             for ps in visible_parts(run).values() for p in ps]
    opened, health = [], []
    for _ in range(rounds):
        reader.forget_verified()
        t0 = time.perf_counter()
        tr = moescope.open(root)
        opened.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tr.health()
        health.append(time.perf_counter() - t0)
        tr.close()
    return {"parts": len(parts), "bytes": sum(p.stat().st_size for p in parts), "open": min(opened),
            "health": min(health)}


def compare(root: Path, label: str, rounds: int) -> None:
    """Measure, compact every run, measure again; print both and the ratios."""
    before = measure(root, rounds)
    t0 = time.perf_counter()
    for run in sorted(root.iterdir()):
        if (run / "manifest.json").exists():
            compact_run(run)
    took = time.perf_counter() - t0
    after = measure(root, rounds)
    print(f"\n{label}: compaction took {took:.2f} s")
    print(f"  {'':<14}{'before':>12}{'after':>12}{'before/after':>14}")
    for key, fmt in (("parts", "{:,.0f}"), ("bytes", "{:,.0f}"), ("open", "{:.3f} s"), ("health", "{:.3f} s")):
        b, a = before[key], after[key]
        print(f"  {key:<14}{fmt.format(b):>12}{fmt.format(a):>12}{b / a:>13.2f}x")


def main() -> None:
    """Run the comparison on sample_traces and on the synthetic run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flushes", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if (ROOT / "sample_traces").is_dir():
            shutil.copytree(ROOT / "sample_traces", work / "samples")
            compare(work / "samples", "sample_traces (258 parts)", a.rounds)
        t0 = time.perf_counter()
        synthetic(work / "synthetic" / "run", a.flushes, a.layers, a.experts, seqs=2, tokens=16)
        print(f"\n(synthetic run written in {time.perf_counter() - t0:.1f} s)")
        compare(work / "synthetic", f"synthetic run, {a.flushes:,} flushes of {a.layers} layers × {a.experts} "
                f"experts + 32 token rows per layer", a.rounds)


if __name__ == "__main__":
    main()

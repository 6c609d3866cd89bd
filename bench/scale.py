"""Benchmark: what a 1,024-rank run of a 58-layer, 256-expert model writes, per rank and reduced, and the health
report over the largest trace this machine holds.

    python bench/scale.py                                   # volumes + a small trace (a few minutes)
    python bench/scale.py --assignments 1000000000 --steps 2000 --spark   # the README figures

1. Volumes. Parts are written as the recorder writes them (`moescope.capture.recorder._to_tables` and
   `moescope.format.writer.write_part`), for a sample: `--sample-ranks` ranks × `--sample-flushes` flushes of
   `--flush-every` steps, per rank (reduce="none": each rank its 1/R share of the step's tokens) and reduced
   (reduce="global": the group's sums, one writer). Rows, files and bytes of the whole run (`--run-steps` steps
   at `--ranks` ranks) are extrapolated from the measured bytes per part; files and bytes after compaction
   (`moescope.format.compact.compact_run`, one merged part per rank and table) from the sample compacted.
   Token rows (`--token-fraction` of `--tokens-per-step`, each rank its own sample) with and without
   `--tokens-every`.
2. Health report. A reduced trace of `--steps` steps (expert_load and router_stats every step) with
   `--assignments` token-level assignments (routing rows × top-k on every `--tokens-every`-th step), timed:
   `moescope.open(root)` + `Trace.health()` on DuckDB, and on Spark local (`moescope.open(root, engine="spark")`)
   with `--spark` where it is available.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moescope  # noqa: E402
from moescope.capture.recorder import _to_tables  # noqa: E402  (the recorder's own flush → Arrow tables)
from moescope.format.manifest import CaptureSettings, LayerEntry, Manifest, ModelInfo, now_utc  # noqa: E402
from moescope.format.writer import write_part  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

COUNT_TABLES = ("expert_load", "router_stats")


class Model:
    """The simulated model and run: per-layer expert preferences (Dirichlet), tokens per step, ranks."""

    def __init__(self, a: argparse.Namespace, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.layers, self.experts, self.k = a.layers, a.experts, a.top_k
        self.ranks, self.tokens = a.ranks, a.tokens_per_step
        self.pref = self.rng.dirichlet(np.full(self.experts, 20.0), size=self.layers)  # [L, E]

    def counts(self, step: int, share: float) -> tuple[list[Any], list[Any]]:
        """One step's load_host / stats_host entries (the recorder's decoded flush) for `share` of the tokens."""
        tok = max(1, int(round(self.tokens * share)))
        load, stats = [], []
        for layer in range(self.layers):
            c = self.rng.multinomial(tok * self.k, self.pref[layer]).astype(np.float64)  # [E]
            arr = np.stack([c, c / self.k * 0.93, c / self.k], 1)  # [E, 3]: tokens, prob_sum, weight_sum
            lse = self.rng.normal(3.0, 0.2)
            st = np.array([tok, tok * 4.1, tok * (lse * lse + 0.04), tok * lse, lse + 0.9, tok * 0.05, 0, 0],
                          np.float64)
            load.append((step, "", layer, arr))
            stats.append((step, "", layer, st))
        return load, stats

    def rows(self, step: int, n_tokens: int, seq_len: int = 4096) -> list[Any]:
        """One step's rows_host entries: `n_tokens` kept tokens (whole sequences) × every layer."""
        out = []
        seq = (np.arange(n_tokens) // seq_len).astype(np.int64)
        pos = (np.arange(n_tokens) % seq_len).astype(np.int64)
        tok_id = self.rng.integers(0, 128_000, n_tokens)
        block = self.experts // self.k
        for layer in range(self.layers):
            first = self.rng.choice(self.experts, n_tokens, p=self.pref[layer])
            # k distinct experts: one per block of E/k, the first at its sampled place
            ex = (first[:, None] // block * block + np.arange(self.k) * block
                  + self.rng.integers(0, block, (n_tokens, self.k))) % self.experts  # [n, k]
            ex[:, 0] = first
            w = self.rng.dirichlet(np.full(self.k, 2.0), n_tokens).astype(np.float32)  # [n, k]
            st4 = np.column_stack([self.rng.uniform(2, 5, n_tokens), self.rng.uniform(0.2, 0.6, n_tokens),
                                   self.rng.uniform(0.05, 0.2, n_tokens), self.rng.normal(3, 0.2, n_tokens)])
            # the recorder's row buffers hold slot columns (1 + expert; 0 and E + 1: no expert) and E
            out.append((step, "", layer, {"seq": seq, "pos": pos, "token_id": tok_id,
                                           "valid": np.ones(n_tokens, np.float32), "experts": ex + 1, "weights": w,
                                           "stats4": st4.astype(np.float32), "n_experts": self.experts}))
        return out


def write_manifest(run_dir: Path, m: Model, rank: int, reduce: str, group: int, tokens_every: int,
                   token_fraction: float, flush_every: int) -> None:
    """The manifest a recorder with these options writes."""
    Manifest(run=run_dir.name, created=now_utc(), updated=now_utc(), closed=True,
             model=ModelInfo("Simulated58x256", None),
             layers=[LayerEntry(i, f"model.layers.{i}.mlp.gate", m.experts, m.k, "softmax_topk") for i in range(m.layers)],
             capture=CaptureSettings(tokens=token_fraction, flush_every=flush_every, tokens_every=tokens_every,
                                     reduce=reduce, reduce_group_size=group if reduce == "global" else None),
             rank=rank, world_size=m.ranks).write(run_dir, rank)


def flush(run_dir: Path, rank: int, seq: int, load: list[Any], stats: list[Any], rows: list[Any]) -> dict[str, int]:
    """Write one flush's parts as the recorder's writer thread does; bytes per table."""
    out = {}
    for table, data in _to_tables(run_dir.name, rank, load, stats, rows).items():
        out[table] = write_part(run_dir, table, rank, seq, data).stat().st_size
    return out


def dir_stats(run_dir: Path) -> tuple[int, int]:
    """(Parquet files, bytes) under a run directory."""
    files = [p for p in run_dir.rglob("*.parquet")]
    return len(files), sum(p.stat().st_size for p in files)


def human(n: float) -> str:
    """A count with a unit: 1.5e12 → '1.50 T'."""
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def nbytes(n: float) -> str:
    """Bytes in binary units."""
    for unit, div in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def volumes(a: argparse.Namespace, work: Path) -> None:
    """Part 1: rows, files and bytes of the whole run, per rank vs reduced (vs compacted), from a written sample."""
    m = Model(a)
    L, E, R, F = m.layers, m.experts, m.ranks, a.flush_every
    flushes = math.ceil(a.run_steps / F)
    print(f"simulated run: {R:,} ranks, {L} layers × {E} experts (top-{m.k}), {human(m.tokens)} tokens/step, "
          f"{a.run_steps:,} steps, flush_every={F} ({flushes:,} flushes)")
    t0 = time.perf_counter()
    sample: dict[str, dict[str, float]] = {}
    for mode in ("none", "global"):
        run_dir = work / "volume" / mode
        ranks = range(a.sample_ranks) if mode == "none" else range(1)
        size = {t: 0.0 for t in COUNT_TABLES}
        for rank in ranks:
            for f in range(a.sample_flushes):
                load, stats = [], []
                for step in range(f * F, (f + 1) * F):
                    lo, st = m.counts(step, 1.0 / R if mode == "none" else 1.0)
                    load += lo
                    stats += st
                for t, b in flush(run_dir, rank, f, load, stats, []).items():
                    size[t] += b
            write_manifest(run_dir, m, rank, mode, R, 1, 0.0, F)
        parts = len(ranks) * a.sample_flushes
        sample[mode] = {t: size[t] / parts for t in COUNT_TABLES}  # bytes per part (one flush of one writer)
    print(f"  (sample written in {time.perf_counter() - t0:.1f} s: {a.sample_ranks} ranks × {a.sample_flushes} "
          f"flushes per rank, 1 × {a.sample_flushes} reduced)")
    rows_step = L * E + L  # expert_load + router_stats rows per writer and step
    table = []
    for mode, writers in (("none", R), ("global", 1)):
        per_flush = sum(sample[mode].values())
        table.append((f'reduce="{mode}"', writers * a.run_steps * rows_step, writers * flushes * len(COUNT_TABLES),
                      writers * flushes * per_flush))

    compact = _compact_module()
    if compact is None:
        print("  compaction: not available (moescope.format.compact.compact_run not found)")
    else:
        for mode, writers in (("none", R), ("global", 1)):
            run_dir = work / "volume" / mode
            before = dir_stats(run_dir)
            res = compact.compact_run(run_dir)
            after = dir_stats(run_dir)
            ratio = after[1] / before[1]
            base = next(r for r in table if r[0] == f'reduce="{mode}"')
            # a finished run compacts into one part per writer and table
            table.append((f'reduce="{mode}" + compaction', base[1], writers * len(COUNT_TABLES), base[3] * ratio))
            print(f"  compaction of the {mode} sample: {before[0]} parts ({nbytes(before[1])}) -> {after[0]} "
                  f"({nbytes(after[1])}), {res.rows:,} rows merged")
    print("\n  counts (expert_load + router_stats) of the whole run:")
    print(f"    {'':<32}{'rows':>12}{'files':>12}{'bytes':>14}")
    for name, rows, files, b in table:
        print(f"    {name:<32}{human(rows):>12}{human(files):>12}{nbytes(b):>14}")
    none, glob = table[0], table[1]
    print(f"    reduce='global' vs 'none': {none[1] / glob[1]:,.0f}× fewer rows, {none[2] / glob[2]:,.0f}× fewer files, "
          f"{none[3] / glob[3]:,.0f}× fewer bytes")

    # Token rows: each rank keeps its own sample (the same rows with either reduce); tokens_every thins them.
    kept = m.tokens * a.token_fraction
    per_rank = max(1, int(round(kept / R)))
    run_dir = work / "volume" / "tokens"
    b = flush(run_dir, 0, 0, [], [], [r for s in range(2) for r in m.rows(s, per_rank, seq_len=per_rank)])
    per_row = b["routing"] / (2 * per_rank * L)
    print(f"\n  token rows (tokens={a.token_fraction}: {human(kept)} tokens/step, {per_rank} per rank; "
          f"{per_row:.1f} bytes per row measured):")
    print(f"    {'':<32}{'rows':>12}{'files':>12}{'bytes':>14}")
    for every in (1, a.tokens_every):
        steps = len(range(0, a.run_steps, every))
        rows = steps * per_rank * R * L
        flushes_with = len({s // F for s in range(0, a.run_steps, every)})
        print(f"    {f'tokens_every={every}':<32}{human(rows):>12}{human(R * flushes_with):>12}"
              f"{nbytes(rows * per_row):>14}")


def _compact_module() -> Any:
    """moescope.format.compact when this checkout has it, else None."""
    try:
        from moescope.format import compact
    except ImportError:
        return None
    return compact if hasattr(compact, "compact_run") else None


def build_trace(a: argparse.Namespace, root: Path) -> dict[str, int]:
    """Part 2's reduced trace: counts every step, `--assignments` token assignments on every tokens_every-th step."""
    m = Model(a, seed=1)
    run_dir = root / "scale"
    L, F = m.layers, a.flush_every
    token_steps = list(range(0, a.steps, a.tokens_every))
    per_step = max(1, a.assignments // (m.k * L * max(1, len(token_steps))))  # kept tokens per token step
    writers = a.trace_ranks  # token rows are per rank: each writes its share of a step's kept tokens
    n = {"expert_load": 0, "router_stats": 0, "routing": 0, "steps": a.steps, "token_steps": len(token_steps)}
    t0 = time.perf_counter()
    for f in range(math.ceil(a.steps / F)):
        load, stats = [], []
        steps = range(f * F, min(a.steps, (f + 1) * F))
        for step in steps:
            lo, st = m.counts(step, 1.0)
            load += lo
            stats += st
        b = flush(run_dir, 0, f, load, stats, [])
        n["expert_load"] += len(load) * m.experts
        n["router_stats"] += len(stats)
        for rank in range(writers):
            share = per_step // writers + (1 if rank < per_step % writers else 0)
            rows = [r for s in steps if s % a.tokens_every == 0 for r in m.rows(s, share)]
            if rows:
                flush(run_dir, rank, f + (1 << 20), [], [], rows)  # part numbers apart from the counts' parts
                n["routing"] += share * L * sum(1 for s in steps if s % a.tokens_every == 0)
        if f % 10 == 0:
            el = time.perf_counter() - t0
            print(f"  ... steps {steps[-1] + 1:,}/{a.steps:,}, {human(n['routing'] * m.k)} assignments, "
                  f"{el:.0f} s", flush=True)
        del b
    for rank in range(writers):
        write_manifest(run_dir, m, rank, "global", a.ranks, a.tokens_every, a.token_fraction, F)
    return n


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        proc = psutil.Process() if psutil else None
        while not self._stop.is_set():
            if proc is not None:
                self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def health(a: argparse.Namespace, root: Path) -> None:
    """Part 2: time open + health on DuckDB (and on Spark local)."""
    t0 = time.perf_counter()
    if a.reuse and (root / "scale" / "manifest.json").exists():  # the trace a previous --keep run left
        import duckdb

        def rows(t: str) -> int:
            return int(duckdb.sql(f"SELECT sum(num_rows) FROM parquet_file_metadata('{root}/scale/{t}/*.parquet')")
                       .fetchall()[0][0] or 0)

        steps = duckdb.sql(f"SELECT count(DISTINCT step) FROM '{root}/scale/routing/*.parquet'").fetchall()[0][0]
        n = {"expert_load": rows("expert_load"), "router_stats": rows("router_stats"), "routing": rows("routing"),
             "steps": rows("router_stats") // a.layers, "token_steps": int(steps)}
        how = "reused"
    else:
        n = build_trace(a, root)
        how = f"built in {time.perf_counter() - t0:.0f} s"
    files, size = dir_stats(root / "scale")
    print(f"\n  trace: {n['steps']:,} steps, {human(n['expert_load'])} expert_load rows, {human(n['routing'])} token "
          f"rows on {n['token_steps']} steps (tokens_every={a.tokens_every}) = {human(n['routing'] * a.top_k)} "
          f"assignments; {files} files, {nbytes(size)} ({how})")
    engines = [("duckdb", {})] + ([("spark", {"engine": "spark"})] if a.spark else [])
    for name, kw in engines:
        try:
            with PeakRSS() as mem:
                t1 = time.perf_counter()
                tr = moescope.open(root, **kw)
                t2 = time.perf_counter()
                h = tr.health()
                t3 = time.perf_counter()
                cov = tr.token_steps() if hasattr(tr, "token_steps") else None
                t4 = time.perf_counter()
        except Exception as e:  # Spark missing (no pyspark / java) or its engine not in this checkout
            if name == "duckdb":
                raise
            print(f"  {name}: not available ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            continue
        counts = h["status"].value_counts().to_dict()
        rss = f", peak RSS {nbytes(mem.peak)}" if psutil else ""
        print(f"  {name}: open {t2 - t1:.2f} s, health {t3 - t2:.2f} s ({len(h)} findings: "
              f"{', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}), token steps "
              f"{t4 - t3:.2f} s ({0 if cov is None else len(cov)}){rss}")
    if not a.spark:
        print("  spark: not run (--spark)")


def main(argv: list[str] | None = None) -> int:
    """Run both parts; print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=1024, help="simulated ranks (default 1024)")
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens-per-step", type=int, default=4 * 1024 * 1024, help="global tokens per step")
    p.add_argument("--run-steps", type=int, default=100_000, help="steps of the simulated run (extrapolated)")
    p.add_argument("--flush-every", type=int, default=50)
    p.add_argument("--token-fraction", type=float, default=0.01, help="record(tokens=...)")
    p.add_argument("--tokens-every", type=int, default=100, help="record(tokens_every=...)")
    p.add_argument("--sample-ranks", type=int, default=4, help="ranks written for the volume sample")
    p.add_argument("--sample-flushes", type=int, default=3, help="flushes per rank written for the volume sample")
    p.add_argument("--steps", type=int, default=200, help="steps of the health-report trace")
    p.add_argument("--assignments", type=int, default=20_000_000,
                   help="token-level assignments (routing rows × top-k) in the health-report trace")
    p.add_argument("--trace-ranks", type=int, default=8, help="ranks writing token rows in the health-report trace")
    p.add_argument("--spark", action="store_true", help="also time the health report on Spark local")
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--reuse", action="store_true", help="time the health-report trace a --keep run left in --out")
    p.add_argument("--skip-volumes", action="store_true")
    p.add_argument("--skip-health", action="store_true")
    a = p.parse_args(argv)
    work = a.out or Path(tempfile.mkdtemp(prefix="moescope-scale-"))
    try:
        if not a.skip_volumes:
            print("== volumes ==")
            volumes(a, work)
        if not a.skip_health:
            print("\n== health report ==")
            health(a, work / "trace")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"\nkept {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

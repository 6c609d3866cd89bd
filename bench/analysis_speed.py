"""Benchmark: the health report + co-activation in moescope (DuckDB SQL) vs the same in pandas vs one plain scan.

    python bench/analysis_speed.py                          # 100M assignments (≈ 6.3M tokens × 8 layers × top-2)
    python bench/analysis_speed.py --assignments 10000000   # a quick run
    python bench/analysis_speed.py --trace /tmp/big --keep  # reuse / keep the generated trace

The trace is written with vectorised numpy and pyarrow: token-level routing for every token (the 100M
assignments live in `routing`, i.e. the `assignments` view), with expert_load and router_stats per
step × rank × tag × layer (× expert) consistent with it, so the health rules read a realistic amount of
load data and co-activation reads all the routing. Routing drifts towards a collapse over the steps.

Three timings, side by side in one process, each with its own peak RSS (sampled by a thread):
  moescope: Trace(root) + tr.health() + tr.coactivation(window="thirds")
  pandas:   the same metrics (windows, utilization, CV, MaxVio, entropy, Gini, aux loss, z-loss, non-finite,
            collapse share, dead experts, co-activation pairs and lift) with pandas/numpy on the same files
  scan:     one plain DuckDB scan of the same columns of the same files (the floor: I/O + decode)
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moescope  # noqa: E402
from moescope.format.writer import write_manifest, write_part  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover
    psutil = None


# -- trace generation ---------------------------------------------------------------------------------

def generate(root: Path, assignments: int, layers: int, n_experts: int, top_k: int, ranks: int,
             seq_len: int, seqs: int, seed: int = 0) -> dict[str, int]:
    """Write run 'bench' under `root`; returns row counts per table."""
    rng = np.random.default_rng(seed)
    run_dir = root / "bench"
    tokens_total = assignments // (layers * top_k)
    per_rank_step = seq_len * seqs
    steps = max(1, tokens_total // (ranks * per_rank_step))
    tags = np.array(["english", "code"])
    rows = {"routing": 0, "expert_load": 0, "router_stats": 0}
    chunk = max(1, 2_000_000 // (per_rank_step * layers))  # steps per part: ~2M routing rows
    part = 0
    for rank in range(ranks):
        for s0 in range(0, steps, chunk):
            st = np.arange(s0, min(steps, s0 + chunk))
            ns = len(st)
            n = ns * layers * per_rank_step
            # row order: step, layer, seq, pos
            step = np.repeat(st, layers * per_rank_step)
            layer = np.tile(np.repeat(np.arange(layers, dtype=np.int16), per_rank_step), ns)
            seq = np.tile(np.repeat(np.arange(seqs, dtype=np.int32), seq_len), ns * layers)
            pos = np.tile(np.arange(seq_len, dtype=np.int32), ns * layers * seqs)
            tag_idx = (seq % 2).astype(np.int8)
            # expert preference: from uniform towards 2 experts as steps go on (a slow collapse in late layers)
            frac = (step / max(1, steps - 1)) * (layer.astype(float) / max(1, layers - 1))
            hot = rng.random(n) < 0.8 * frac
            first = np.where(hot, rng.integers(0, 2, n), rng.integers(0, n_experts, n)).astype(np.int16)
            others = [first]
            for _ in range(top_k - 1):
                nxt = (others[-1] + 1 + rng.integers(0, n_experts - len(others), n)) % n_experts
                others.append(nxt.astype(np.int16))
            experts = np.stack(others, axis=1)
            if top_k == 2:  # keep the two distinct
                experts[:, 1] = np.where(experts[:, 1] == experts[:, 0], (experts[:, 0] + 1) % n_experts, experts[:, 1])
            w1 = rng.uniform(0.5, 0.9, n).astype(np.float32)
            weights = np.stack([w1] + [(1 - w1) / (top_k - 1)] * (top_k - 1), axis=1).astype(np.float32)
            offsets = pa.array(np.arange(0, n * top_k + 1, top_k, dtype=np.int32))
            token_id = rng.integers(0, 256, n, dtype=np.int32)
            routing = pa.table({
                "run": pa.array(np.full(n, "bench", dtype=object), pa.string()).dictionary_encode().cast(pa.string()),
                "rank": pa.array(np.full(n, rank, np.int16)),
                "step": pa.array(step.astype(np.int64)),
                "tag": pa.array(tags[tag_idx]),
                "layer": pa.array(layer),
                "seq": pa.array(seq),
                "pos": pa.array(pos),
                "token_id": pa.array(token_id),
                "experts": pa.ListArray.from_arrays(offsets, pa.array(experts.ravel())),
                "weights": pa.ListArray.from_arrays(offsets, pa.array(weights.ravel())),
                "entropy": pa.array(rng.uniform(0.5, 2.0, n).astype(np.float32)),
                "lse": pa.array(rng.normal(3.0, 0.5, n).astype(np.float32)),
                "margin": pa.array(rng.uniform(0, 0.5, n).astype(np.float32)),
            })
            write_part(run_dir, "routing", rank, part, routing)
            rows["routing"] += n
            # expert_load and router_stats aggregated from the same tokens: key (step, tag, layer)
            key = ((step - s0) * 2 + tag_idx) * layers + layer
            nkeys = ns * 2 * layers
            counts = np.zeros((nkeys, n_experts), np.int64)
            for j in range(top_k):
                counts += np.bincount(key * n_experts + experts[:, j], minlength=nkeys * n_experts).reshape(nkeys, n_experts)
            toks = np.bincount(key, minlength=nkeys)
            k_step = np.arange(nkeys) // (2 * layers) + s0
            k_tag = (np.arange(nkeys) // layers) % 2
            k_layer = np.arange(nkeys) % layers
            el = pa.table({
                "run": pa.array(["bench"] * (nkeys * n_experts)),
                "rank": pa.array(np.full(nkeys * n_experts, rank, np.int16)),
                "step": pa.array(np.repeat(k_step, n_experts).astype(np.int64)),
                "tag": pa.array(tags[np.repeat(k_tag, n_experts)]),
                "layer": pa.array(np.repeat(k_layer, n_experts).astype(np.int16)),
                "expert": pa.array(np.tile(np.arange(n_experts, dtype=np.int16), nkeys)),
                "tokens": pa.array(counts.ravel()),
                "prob_sum": pa.array(counts.ravel() / top_k * 0.9),
                "weight_sum": pa.array(counts.ravel() * 0.5),
            })
            write_part(run_dir, "expert_load", rank, part, el)
            lse = np.bincount(key, weights=routing.column("lse").to_numpy().astype(float) ** 2, minlength=nkeys)
            rs = pa.table({
                "run": pa.array(["bench"] * nkeys),
                "rank": pa.array(np.full(nkeys, rank, np.int16)),
                "step": pa.array(k_step.astype(np.int64)),
                "tag": pa.array(tags[k_tag]),
                "layer": pa.array(k_layer.astype(np.int16)),
                "tokens": pa.array(toks.astype(np.int64)),
                "entropy_sum": pa.array(toks * 1.5),
                "lse_sq_sum": pa.array(lse),
                "lse_sum": pa.array(toks * 3.0),
                "lse_max": pa.array(np.full(nkeys, 5.0)),
                "margin_sum": pa.array(toks * 0.25),
                "nonfinite": pa.array(np.zeros(nkeys, np.int64)),
                "dropped": pa.array(np.zeros(nkeys, np.int64)),
            })
            write_part(run_dir, "router_stats", rank, part, rs)
            rows["expert_load"] += el.num_rows
            rows["router_stats"] += rs.num_rows
            part += 1
    for rank in range(ranks):
        write_manifest(run_dir, {
            "run": "bench", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "moescope_version": moescope.__version__, "model": {"class": "synthetic", "n_params": 0},
            "layers": [{"layer": i, "module": f"layers.{i}.router", "n_experts": n_experts, "top_k": top_k,
                        "router_kind": "softmax_topk"} for i in range(layers)],
            "capture": {"tokens": 1.0}, "counters": {},
        }, rank)
    return rows


# -- the pandas equivalent --------------------------------------------------------------------------

def pandas_report(root: Path) -> dict[str, pd.DataFrame]:
    """Health metrics + co-activation with pandas on the same Parquet files (thirds of the run's steps)."""
    files = {t: sorted((root / "bench" / t).glob("part-*.parquet")) for t in ("expert_load", "router_stats", "routing")}
    el = pd.concat([pd.read_parquet(f, columns=["run", "step", "layer", "expert", "tokens", "prob_sum"])
                    for f in files["expert_load"]], ignore_index=True)
    rs = pd.concat([pd.read_parquet(f, columns=["run", "step", "layer", "tokens", "lse_sq_sum", "nonfinite"])
                    for f in files["router_stats"]], ignore_index=True)
    steps = pd.concat([el[["run", "step"]], rs[["run", "step"]]]).drop_duplicates()
    span = steps.groupby("run")["step"].agg(["min", "max"])

    def win(df: pd.DataFrame) -> pd.Series:
        lo = df["run"].map(span["min"])
        hi = df["run"].map(span["max"])
        return np.floor(3 * (df["step"] - lo) / (hi - lo + 1.0)).astype(int)

    el["win"] = win(el)
    rs["win"] = win(rs)
    c = el.groupby(["run", "layer", "win", "expert"], as_index=False)[["tokens", "prob_sum"]].sum()
    r = rs.groupby(["run", "layer", "win"], as_index=False)[["tokens", "lse_sq_sum", "nonfinite"]].sum()
    c = c.merge(r[["run", "layer", "win", "tokens"]].rename(columns={"tokens": "T"}), on=["run", "layer", "win"])
    n, k = c.groupby(["run", "layer"])["expert"].transform("max") + 1, 2
    c["f"] = c["tokens"] / (k * c["T"])
    c["util"] = n * c["f"]
    c["P"] = c["prob_sum"] / c["T"]
    g = c.groupby(["run", "layer", "win"])

    def per_cell(x: pd.DataFrame) -> pd.Series:
        v = np.sort(x["tokens"].to_numpy(float))
        N = len(v)
        f = v / v.sum()
        i = np.arange(1, N + 1)
        top = np.sort(v)[::-1]
        m = max(k, N // 4)
        return pd.Series({
            "cv": v.std() / v.mean(), "maxvio": v.max() / v.mean() - 1,
            "entropy": -(f[f > 0] * np.log(f[f > 0])).sum() / np.log(N),
            "gini": ((2 * i - N - 1) * v).sum() / (N * v.sum()),
            "aux": N * (x["f"] * x["P"]).sum(), "top_m_share": top[:m].sum() / v.sum(),
            "min_util": x["util"].min(), "dead": list(x.loc[x["util"] < 0.05, "expert"]),
        })

    lm = g.apply(per_cell).reset_index()
    r["z_loss"] = r["lse_sq_sum"] / r["tokens"]
    lm = lm.merge(r[["run", "layer", "win", "z_loss", "nonfinite"]], on=["run", "layer", "win"])
    # co-activation: every routed token's expert pairs
    parts = []
    for f in files["routing"]:
        t = pq.read_table(f, columns=["run", "step", "layer", "experts"])
        df = t.select(["run", "step", "layer"]).to_pandas()
        ex = t.column("experts").combine_chunks()
        flat = ex.flatten().to_numpy().reshape(len(df), -1)
        df["a"], df["b"] = flat[:, 0], flat[:, 1]
        df["win"] = win(df)
        parts.append(df.groupby(["run", "layer", "win", "a", "b"], as_index=False).size())
    pairs = pd.concat(parts).groupby(["run", "layer", "win", "a", "b"], as_index=False)["size"].sum()
    both = pd.concat([pairs, pairs.rename(columns={"a": "b", "b": "a"})])
    n_ab = both.groupby(["run", "layer", "win", "a", "b"], as_index=False)["size"].sum()
    singles = both.groupby(["run", "layer", "win", "a"], as_index=False)["size"].sum().rename(columns={"size": "n_a"})
    T = pairs.groupby(["run", "layer", "win"], as_index=False)["size"].sum().rename(columns={"size": "T"})
    co = n_ab.merge(singles, on=["run", "layer", "win", "a"]).merge(
        singles.rename(columns={"a": "b", "n_a": "n_b"}), on=["run", "layer", "win", "b"]).merge(T, on=["run", "layer", "win"])
    co["p_b_given_a"] = co["size"] / co["n_a"]
    co["lift"] = co["size"] * co["T"] / (co["n_a"] * co["n_b"])
    return {"load_metrics": lm, "coactivation": co}


# -- timing -----------------------------------------------------------------------------------------

class Peak:
    """Peak RSS of this process during a block, sampled every 20 ms."""

    def __enter__(self) -> Peak:
        gc.collect()
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _rss(self) -> int:
        if psutil is None:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return psutil.Process().memory_info().rss

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def main() -> int:
    """Generate (or reuse) a trace and print the three timings, their ratios and peak RSS."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assignments", type=int, default=100_000_000, help="token × layer × slot assignments")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=8, help="sequences per step per rank")
    ap.add_argument("--trace", type=Path, default=None, help="trace root (reused when it exists)")
    ap.add_argument("--keep", action="store_true", help="keep the generated trace")
    ap.add_argument("--skip-pandas", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    args = ap.parse_args()
    if args.top_k != 2:
        ap.error("the pandas comparison is written for top-2")
    root = args.trace or Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    try:
        if not (root / "bench" / "manifest.json").exists():
            t0 = time.perf_counter()
            rows = generate(root, args.assignments, args.layers, args.experts, args.top_k, args.ranks,
                            args.seq_len, args.seqs)
            size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
            print(f"generated {rows['routing']:,} routing rows ({rows['routing'] * args.top_k:,} assignments), "
                  f"{rows['expert_load']:,} expert_load rows, {rows['router_stats']:,} router_stats rows, "
                  f"{size / 2**20:,.0f} MiB, in {time.perf_counter() - t0:.1f} s")
        files = {t: [str(p) for p in sorted((root / "bench" / t).glob("part-*.parquet"))]
                 for t in ("expert_load", "router_stats", "routing")}

        import duckdb

        with Peak() as scan:
            con = duckdb.connect(config={"threads": args.threads} if args.threads else {})
            for table, cols in (("expert_load", "count(*), max(run), max(step), max(layer), max(expert), sum(tokens), sum(prob_sum)"),
                                ("router_stats", "count(*), max(run), max(step), max(layer), sum(tokens), sum(lse_sq_sum), sum(nonfinite)"),
                                ("routing", "count(*), max(run), max(step), max(layer), max(experts)")):
                con.execute(f"SELECT {cols} FROM read_parquet({files[table]})").fetchall()
            con.close()
        print(f"scan      {scan.seconds:8.2f} s   peak RSS {scan.peak / 2**20:7.0f} MiB   (one DuckDB pass over the same columns)")

        with Peak() as ms:
            tr = moescope.open(root, threads=args.threads) if args.threads else moescope.open(root)
            health = tr.health()
            co = tr.coactivation(window="thirds")
            tr.close()
        print(f"moescope  {ms.seconds:8.2f} s   peak RSS {ms.peak / 2**20:7.0f} MiB   "
              f"(health: {len(health)} findings, {int((health['status'] == 'FAIL').sum())} FAIL; coactivation: {len(co):,} rows)")
        if not args.skip_pandas:
            with Peak() as pdm:
                res = pandas_report(root)
            print(f"pandas    {pdm.seconds:8.2f} s   peak RSS {pdm.peak / 2**20:7.0f} MiB   "
                  f"(load metrics: {len(res['load_metrics'])} cells; coactivation: {len(res['coactivation']):,} rows)")
            print(f"ratio pandas / moescope = {pdm.seconds / ms.seconds:.1f}×   (target ≥ 5×)")
            # the two computed the same numbers (checked outside the timings)
            with moescope.open(root) as tr:
                lm = tr.load_metrics().rename(columns={"window": "win"})
                mco = tr.coactivation(window="thirds").rename(columns={"window": "win", "expert_a": "a", "expert_b": "b"})
            both = lm.merge(res["load_metrics"], on=["run", "layer", "win"], suffixes=("", "_pd"))
            cob = mco.merge(res["coactivation"], on=["run", "layer", "win", "a", "b"], suffixes=("", "_pd"))
            print(f"check: {len(both)} cells, max |Δcv| {np.abs(both['cv'] - both['cv_pd']).max():.2e}, "
                  f"max |Δgini| {np.abs(both['gini'] - both['gini_pd']).max():.2e}, "
                  f"max |Δz-loss| {np.abs(both['z_loss'] - both['z_loss_pd']).max():.2e}; {len(cob):,} pairs, "
                  f"max |Δlift| {np.abs(cob['lift'] - cob['lift_pd']).max():.2e}")
        print(f"ratio moescope / scan   = {ms.seconds / scan.seconds:.1f}×   (target ≤ 4×)")
    finally:
        if not args.keep and args.trace is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

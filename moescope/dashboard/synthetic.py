"""Synthetic traces with known shapes, for the dashboard's tests and the latency benchmark.

Runs: "balanced" (near-uniform load), "collapse" (load drains onto two experts as steps go on) and, when
asked, more balanced-like runs. Each step routes an "english" and a "code" slice, the latter skewed, so drift
between tags shows. Token-level routing (whole sequences, every layer) is kept every `routing_every` steps;
expert_load and router_stats count every routed token, as the recorder does. Similarity and spectra
snapshots are written at two steps. Generated with numpy in chunks, so 100M assignments fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from moescope.format.writer import write_manifest, write_part

#: Printable text the synthetic sequences are made of (byte-level token ids).
_TEXT = (
    b"def route(tokens, k=2):\n    # pick the top-k experts per token\n    return topk(router(tokens), k)\n"
    b"The router sends every token to two of eight experts; a healthy router spreads the load evenly. "
)


@dataclass(frozen=True)
class Shape:
    """Sizes of a synthetic run."""

    layers: int = 2
    experts: int = 8
    top_k: int = 2
    steps: int = 60
    tokens_per_step: int = 512  # per tag and layer, counted in expert_load / router_stats
    routing_every: int = 10  # keep token-level routing at every n-th step (0: never)
    seqs: int = 4  # sequences kept per routed step and tag
    seq_len: int = 32


def _probs(kind: str, shape: Shape, step: int, layer: int, tag: str) -> np.ndarray:
    """Expected first-choice distribution over experts at one step (deterministic shapes)."""
    e = np.arange(shape.experts, dtype=float)
    frac = step / max(1, shape.steps - 1)
    if kind == "collapse":
        # Starts near uniform; from two thirds of the run on, ~99.5% of first choices go to experts 0 and 1.
        hot = np.where(e < 2, 1.0, 0.0)
        a = 0.995 * min(1.0, 1.5 * frac)
        p = (1 - a) * np.ones_like(e) / shape.experts + a * hot / 2
    else:
        p = 1.0 + 0.15 * np.sin(e + layer)
    if tag == "code":
        p = p * (1.0 + 1.5 * (e % 3 == 0))  # code leans on experts 0, 3, 6: drift vs english
    return p / p.sum()


def _route(rng: np.random.Generator, p: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw k distinct experts for n tokens (cheap approximation of top-k sampling) and their weights."""
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    ids = np.empty((n, k), dtype=np.int16)
    ids[:, 0] = np.searchsorted(cdf, rng.random(n), side="right")
    for s in range(1, k):
        nxt = np.searchsorted(cdf, rng.random(n), side="right").astype(np.int16)
        for prev in range(s):  # a repeated expert moves to the next id, keeping the k ids distinct
            clash = nxt == ids[:, prev]
            nxt[clash] = (nxt[clash] + 1 + prev) % len(p)
        ids[:, s] = nxt
    w = rng.random((n, k)).astype(np.float32) + 1.0
    w[:, 0] += 1.0
    w /= w.sum(axis=1, keepdims=True)
    return ids, w


def _routing_table(
    run: str, step: int, tag: str, layer: int, seq0: int, ids: np.ndarray, w: np.ndarray, tokens: np.ndarray,
    seq_len: int,
) -> pa.Table:
    n, k = ids.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.table(
        {
            "run": pa.repeat(pa.scalar(run, pa.string()), n),
            "rank": np.zeros(n, np.int16),
            "step": np.full(n, step, np.int64),
            "tag": pa.repeat(pa.scalar(tag, pa.string()), n),
            "layer": np.full(n, layer, np.int16),
            "seq": (seq0 + np.arange(n) // seq_len).astype(np.int32),
            "pos": (np.arange(n) % seq_len).astype(np.int32),
            "token_id": tokens.astype(np.int32),
            "experts": pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int16())),
            "weights": pa.ListArray.from_arrays(offsets, pa.array(w.reshape(-1), pa.float32())),
            "entropy": np.full(n, 1.5, np.float32),
            "lse": np.full(n, 2.0, np.float32),
            "margin": (w[:, 0] - w[:, 1] if k > 1 else w[:, 0]).astype(np.float32),
        }
    )


def _runs(kinds: Sequence[str]) -> Iterator[tuple[str, str]]:
    for i, kind in enumerate(kinds):
        yield (kind if kinds.count(kind) == 1 else f"{kind}-{i}"), kind


def make_trace(
    root: str | Path,
    kinds: Sequence[str] = ("balanced", "collapse"),
    shape: Shape | None = None,
    seed: int = 0,
    snapshots: bool = True,
    tags: Sequence[str] = ("english", "code"),
) -> Path:
    """Write one run per entry of `kinds` below `root`; returns `root`."""
    shape = shape or Shape()
    root = Path(root)
    rng = np.random.default_rng(seed)
    text = np.frombuffer(_TEXT, dtype=np.uint8)
    for run, kind in _runs(list(kinds)):
        run_dir = root / run
        part = 0
        load_rows: list[pd.DataFrame] = []
        stat_rows: list[pd.DataFrame] = []
        routing: list[pa.Table] = []
        routed_rows = 0
        for step in range(shape.steps):
            keep = shape.routing_every > 0 and step % shape.routing_every == 0
            for tag in tags:
                for layer in range(shape.layers):
                    p = _probs(kind, shape, step, layer, tag)
                    n_tok = shape.tokens_per_step
                    n_keep = shape.seqs * shape.seq_len if keep else 0
                    if n_keep:
                        ids, w = _route(rng, p, n_tok, shape.top_k)
                        counts = np.bincount(ids.reshape(-1), minlength=shape.experts)
                        wsum = np.bincount(ids.reshape(-1), weights=w.reshape(-1), minlength=shape.experts)
                    else:
                        # Counts-only steps need no per-token draws: a multinomial of the assignments is enough.
                        counts = rng.multinomial(n_tok * shape.top_k, p)
                        wsum = counts / shape.top_k
                    load_rows.append(
                        pd.DataFrame(
                            {
                                "step": step, "tag": tag, "layer": layer, "expert": np.arange(shape.experts),
                                "tokens": counts, "prob_sum": p * n_tok, "weight_sum": wsum,
                            }
                        )
                    )
                    ent = float(-(p * np.log(p)).sum())
                    lse = 2.0 + (3.0 * step / shape.steps if kind == "collapse" else 0.0)
                    stat_rows.append(
                        pd.DataFrame(
                            {
                                "step": [step], "tag": [tag], "layer": [layer], "tokens": [n_tok],
                                "entropy_sum": [ent * n_tok], "lse_sq_sum": [lse * lse * n_tok],
                                "lse_sum": [lse * n_tok], "lse_max": [lse + 1.0],
                                "margin_sum": [0.2 * n_tok], "nonfinite": [0], "dropped": [0],
                            }
                        )
                    )
                    if n_keep:
                        m = min(n_keep, n_tok)
                        start = (step * 7) % len(text)
                        tokens = np.resize(np.roll(text, -start), m)
                        seq0 = list(tags).index(tag) * shape.seqs
                        routing.append(
                            _routing_table(run, step, tag, layer, seq0, ids[:m], w[:m], tokens, shape.seq_len)
                        )
                        routed_rows += m
            # Flush in parts like the recorder does, so big traces never sit in memory whole.
            if routed_rows >= 4_000_000 or step == shape.steps - 1:
                if routing:
                    write_part(run_dir, "routing", 0, part, pa.concat_tables(routing))
                if load_rows:
                    el = pd.concat(load_rows, ignore_index=True)
                    el.insert(0, "run", run)
                    el.insert(1, "rank", 0)
                    write_part(run_dir, "expert_load", 0, part, pa.Table.from_pandas(el, preserve_index=False))
                if stat_rows:
                    rs = pd.concat(stat_rows, ignore_index=True)
                    rs.insert(0, "run", run)
                    rs.insert(1, "rank", 0)
                    write_part(run_dir, "router_stats", 0, part, pa.Table.from_pandas(rs, preserve_index=False))
                routing, load_rows, stat_rows, routed_rows = [], [], [], 0
                part += 1
        if snapshots:
            _write_snapshots(run_dir, run, kind, shape, rng, part)
        write_manifest(
            run_dir,
            {
                "run": run,
                "created": "2026-01-01T00:00:00Z",
                "moescope_version": "synthetic",
                "model": {"class": "Synthetic", "n_params": 0, "tokenizer": "bytes"},  # its token ids are bytes
                "layers": [
                    {"layer": i, "module": f"layers.{i}.moe.router", "n_experts": shape.experts,
                     "top_k": shape.top_k, "router_kind": "softmax_topk"}
                    for i in range(shape.layers)
                ],
                "capture": {"tokens": 1.0 / shape.routing_every if shape.routing_every else 0.0},
                "counters": {"dropped_records": 0},
            },
        )
    return root


def _write_snapshots(run_dir: Path, run: str, kind: str, shape: Shape, rng: np.random.Generator, part: int) -> None:
    """Similarity (subspace_overlap, cka) and singular spectra at the first and last step."""
    sim_rows = []
    spec_rows = []
    e = shape.experts
    for step in (0, shape.steps - 1):
        for layer in range(shape.layers):
            base = 0.15 + 0.05 * rng.random((e, e))
            if kind == "collapse" and step > 0:
                base[:4, :4] = 0.85  # four experts grown into near-clones
            sim = (base + base.T) / 2
            np.fill_diagonal(sim, 1.0)
            for metric, scale in (("subspace_overlap", 1.0), ("cka", 0.9)):
                a, b = np.meshgrid(np.arange(e), np.arange(e), indexing="ij")
                sim_rows.append(
                    pd.DataFrame(
                        {
                            "run": run, "rank": 0, "step": step, "layer": layer,
                            "expert_a": a.reshape(-1), "expert_b": b.reshape(-1), "metric": metric,
                            "value": np.clip(sim.reshape(-1) * scale, 0, 1),
                        }
                    )
                )
            for x in range(e):
                idx = np.arange(16)
                decay = 0.25 if (kind == "collapse" and x < 2) else 0.12
                for matrix in ("w_in", "w_out"):
                    spec_rows.append(
                        pd.DataFrame(
                            {
                                "run": run, "rank": 0, "step": step, "layer": layer, "expert": x,
                                "matrix": matrix, "idx": idx, "sigma": 5.0 * np.exp(-decay * idx) + 0.1 * rng.random(16),
                            }
                        )
                    )
    write_part(run_dir, "expert_similarity", 0, part, pa.Table.from_pandas(pd.concat(sim_rows), preserve_index=False))
    write_part(run_dir, "expert_spectra", 0, part, pa.Table.from_pandas(pd.concat(spec_rows), preserve_index=False))

"""The metric catalogue as pure functions of (connection, selection, parameters) -> DataFrame.

The connection is DuckDB's, or another engine's (`moescope.analysis.spark.SparkConnection`): `run_analysis`
hands it the same rendered SQL.

Each function renders one analyses/*.sql file; Python only adds what SQL has no portable form for
(binomial chance levels). Every result is per run × layer × step window unless its docstring says
otherwise; `window`, `window_start`, `window_end` name the window (see `selection.window_params`).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import duckdb
import numpy as np
import pandas as pd

from .engine import run_analysis
from .selection import Selection, Window, window_params
from .sqlkit import Raw, literal

#: Columns a saturation match may use besides layer and token_id.
_SATURATION_KEYS = ("run", "step", "tag", "seq", "pos")


def utilization(con: duckdb.DuckDBPyConnection, sel: Selection, window: Window = None) -> pd.DataFrame:
    """Per expert: assignments, tokens, load_share f_e = c_e/(kT), utilization N·f_e, mean_prob P_e."""
    return run_analysis(con, "utilization", {"filter": sel.filter(), **window_params(window)})


def load_metrics(con: duckdb.DuckDBPyConnection, sel: Selection, window: Window = None) -> pd.DataFrame:
    """Per layer: cv, maxvio, load_entropy, gini, aux_loss, z_loss, router_entropy/margin, nonfinite, collapse shares."""
    return run_analysis(con, "load_metrics", {"filter": sel.filter(), **window_params(window)})


def token_steps(con: duckdb.DuckDBPyConnection, sel: Selection) -> pd.DataFrame:
    """(run, step) pairs of the selection that hold token-level routing rows (record(tokens_every=N): every N-th)."""
    return run_analysis(con, "token_steps", {"filter": sel.filter()}).sort_values(["run", "step"], ignore_index=True)


def describe_steps(steps: Sequence[int] | np.ndarray) -> str:
    """Which steps a set covers, for a person: 'steps 0–90, every 10th (10 steps)', 'steps 3–7 (5 steps)'."""
    s = np.unique(np.asarray(steps, dtype=np.int64))
    if not len(s):
        return "no token rows"
    if len(s) == 1:
        return f"step {s[0]}"
    gaps = np.unique(np.diff(s))
    span = f"{s[0]}–{s[-1]}"
    if len(gaps) == 1:
        if gaps[0] == 1:
            return f"steps {span} ({len(s)} steps)"
        n = int(gaps[0])
        nth = f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
        return f"steps {span}, every {nth} ({len(s)} steps)"
    return f"{len(s)} steps in {span}"


def with_token_coverage(df: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """`df` (run, window_start, window_end rows) with the steps its token rows come from: `token_steps`, `covers`."""
    by_run = {str(r): g["step"].to_numpy() for r, g in steps.groupby("run", sort=False)}
    counts, texts = [], []
    for run, lo, hi in zip(df["run"], df["window_start"], df["window_end"]):
        s = by_run.get(str(run), np.zeros(0, np.int64))
        s = s[(s >= lo) & (s <= hi)] if len(s) and lo is not None and hi is not None else s
        counts.append(len(s))
        texts.append(describe_steps(s))
    return df.assign(token_steps=pd.Series(counts, index=df.index, dtype="int64"),
                     covers=pd.Series(texts, index=df.index, dtype=object))


def coactivation(con: duckdb.DuckDBPyConnection, sel: Selection, window: Window = "all") -> pd.DataFrame:
    """Per ordered expert pair (needs routing): n_a, n_b, n_ab, p_b_given_a = N(a,b)/N(a), lift; token_steps, covers."""
    df = run_analysis(con, "coactivation", {"filter": sel.filter(), **window_params(window)})
    return with_token_coverage(df, token_steps(con, sel))


def locality_chance(n_experts: int, top_k: int) -> tuple[float, float]:
    """Chance levels of temporal locality for independent uniform routing: same first choice, any shared expert."""
    n, k = int(n_experts), int(top_k)
    first = 1.0 / n if n > 0 else float("nan")
    if n <= 0 or k <= 0 or k > n:
        return first, float("nan")
    return first, 1.0 - comb(n - k, k) / comb(n, k)


def temporal_locality(con: duckdb.DuckDBPyConnection, sel: Selection, window: Window = "all") -> pd.DataFrame:
    """Per layer (needs routing): first_choice and any_expert shares of consecutive tokens, their chance levels;
    token_steps and covers: the steps whose token rows it used."""
    df = run_analysis(con, "temporal_locality", {"filter": sel.filter(), **window_params(window)})
    df = with_token_coverage(df, token_steps(con, sel))
    chances = [locality_chance(n, k) for n, k in zip(df["n_experts"], df["top_k"])]
    df["first_choice_chance"] = [c[0] for c in chances]
    df["any_expert_chance"] = [c[1] for c in chances]
    return df


def domain_specialization(con: duckdb.DuckDBPyConnection, sel: Selection, window: Window = "all") -> pd.DataFrame:
    """Per tag × expert: share of the tag's tokens routed to the expert, chance k/N, specialization = share/chance."""
    return run_analysis(con, "domain_specialization", {"filter": sel.filter(), **window_params(window)})


def vocab_specialization(
    con: duckdb.DuckDBPyConnection,
    sel: Selection,
    window: Window = "all",
    min_count: int = 5,
    by_token: bool = False,
) -> pd.DataFrame:
    """Per layer (needs routing): mean over token ids of the top expert's share of its occurrences; by_token: per id.

    Per layer, token_steps and covers say which steps' token rows it used."""
    params = {"filter": sel.filter(), "min_count": int(min_count), **window_params(window)}
    df = run_analysis(con, "vocab_specialization", params, final="per_token" if by_token else None)
    return df if by_token else with_token_coverage(df, token_steps(con, sel))


def expert_tokens(
    con: duckdb.DuckDBPyConnection, sel: Selection, window: Window = "all", min_count: int = 5, top: int = 10
) -> pd.DataFrame:
    """Per expert (needs routing): its `top` token ids by the share of their occurrences routed to it (place 1..top),
    assignments, occurrences, share, chance (k/N), token_ids_seen (ids seen >= min_count times that it took)."""
    if int(top) < 1 or int(min_count) < 1:
        raise ValueError(f"top and min_count must be >= 1, got {top} and {min_count}")
    params = {"filter": sel.filter(), "min_count": int(min_count), "top": int(top), **window_params(window)}
    return run_analysis(con, "expert_tokens", params)


def saturation(
    con: duckdb.DuckDBPyConnection,
    checkpoint: Selection,
    final: Selection,
    on: Sequence[str] = ("tag", "seq", "pos"),
) -> pd.DataFrame:
    """Per checkpoint run × step × layer: mean |TopK_checkpoint ∩ TopK_final| / k over the tokens both routed."""
    bad = [c for c in on if c not in _SATURATION_KEYS]
    if bad:
        raise ValueError(f"saturation: cannot match tokens on {bad}; use some of {list(_SATURATION_KEYS)}")
    join_on = " AND ".join(f"a.{c} = b.{c}" for c in on) or "1 = 1"
    params = {"filter_a": checkpoint.filter(), "filter_b": final.filter(), "join_on": Raw(join_on)}
    return run_analysis(con, "saturation", params)


def similarity(con: duckdb.DuckDBPyConnection, sel: Selection, metric: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Expert × expert similarity rows (run, step, layer, expert_a, expert_b, metric, value) of the snapshots."""
    f = sel.filter(tag=False).sql
    if metric is not None:
        metrics = [metric] if isinstance(metric, str) else list(metric)
        f += f" AND metric IN ({', '.join(literal(m) for m in metrics) or 'NULL'})"
    return run_analysis(con, "similarity", {"filter": Raw(f)})


def clones(con: duckdb.DuckDBPyConnection, sel: Selection, metrics: Sequence[str]) -> pd.DataFrame:
    """Unordered expert pairs at each run × layer's latest snapshot with their similarity per metric."""
    m = ", ".join(literal(x) for x in metrics) or "NULL"
    return run_analysis(con, "clones", {"filter": sel.filter(tag=False), "metrics": Raw(m)})


def precision(con: duckdb.DuckDBPyConnection, sel: Selection) -> pd.DataFrame:
    """Per run × layer: tokens sampled for the float32 re-route, how many changed experts, flip_rate."""
    return run_analysis(con, "precision", {"filter": sel.filter()})


def gini(counts: Sequence[float] | np.ndarray) -> float:
    """Gini of a count vector by the catalogue's definition Σ_i Σ_j |c_i − c_j| / (2 N² mean(c)) (reference)."""
    c = np.asarray(counts, dtype=float)
    if c.size == 0 or c.sum() == 0:
        return float("nan")
    return float(np.abs(c[:, None] - c[None, :]).sum() / (2 * c.size**2 * c.mean()))

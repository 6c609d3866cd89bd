"""Systems what-ifs from traces: capacity-factor token drops, expert-parallel placement, expert-cache hit rates.

The routing recorded in a trace decides the systems cost too (DESIGN.md "Systems what-ifs"). Every public
function here takes a DuckDB connection holding the trace views -- or a `moescope.Trace`, whose `.con` is used --
plus parameters, and returns a DataFrame. What is a query lives in analyses/whatif_*.sql; what is a sequential
simulation (cache replacement, greedy packing) is numpy/python here. Nothing imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import numpy as np
import pandas as pd

from .engine import ensure_layer_info, run_analysis, translate
from .selection import Selection, Window, check_selection, window_params
from .sqlkit import Raw, literal, render

#: A capacity group: one forward pass ("batch"), one sequence ("sequence"), or runs of n consecutive tokens.
Group = Literal["batch", "sequence"] | int
#: A placement: None (round-robin e -> e % D); a device per expert; a device list per expert (replicas);
#: either of those per layer in a mapping; or a DataFrame with columns [run,] layer, expert, device[, share].
PlacementSpec = None | Sequence[int] | Sequence[Sequence[int]] | Mapping[int, Sequence[Any]] | pd.DataFrame
Policy = Literal["lru", "lfu", "belady"]

POLICIES: tuple[str, ...] = ("lru", "lfu", "belady")

CAPACITY_COLUMNS = [
    "run", "layer", "window", "window_start", "window_end", "capacity_factor", "group", "source",
    "tokens", "assignments", "dropped_assignments", "drop_rate", "token_drop_rate", "full_drop_rate",
    "first_choice_drop_rate", "routed_tokens", "coverage", "reported_drop_rate", "note",
]  # fmt: skip
_CAPACITY_COUNTS = (
    "window",
    "window_start",
    "window_end",
    "tokens",
    "assignments",
    "dropped_assignments",
    "routed_tokens",
)
PLACEMENT_COLUMNS = [
    "run", "step", "layer", "devices", "assignments", "mean_load", "max_load", "balancedness", "straggler",
    "routed_assignments", "a2a_assignments", "a2a_fraction",
]  # fmt: skip
CACHE_COLUMNS = [
    "run", "layer", "policy", "cache_size", "n_experts", "tokens", "requests", "hits", "hit_rate",
]  # fmt: skip


def _con(con: Any) -> duckdb.DuckDBPyConnection:
    """The DuckDB connection of a Trace, or the connection itself."""
    return getattr(con, "con", con)


def _rows(rows: Iterable[Sequence[Any]]) -> Raw:
    """A VALUES list of portable literals, e.g. ('a', 0, 8, 2), ('a', 1, 8, 2)."""
    text = ", ".join("(" + ", ".join(literal(v) for v in row) + ")" for row in rows)
    if not text:
        raise ValueError("empty VALUES list")
    return Raw(text)


def _layers(con: duckdb.DuckDBPyConnection, run: str | None = None) -> pd.DataFrame:
    """N experts and top-k per run and layer (manifest first, else read off the data)."""
    ensure_layer_info(con)
    df = con.execute("SELECT run, layer, n_experts, top_k FROM layer_info ORDER BY run, layer").df()
    if run is not None:
        if run not in set(df["run"]):
            known = ", ".join(sorted(set(df["run"]))) or "none"
            raise ValueError(f"run {run!r} is not in the trace (runs: {known})")
        df = df[df["run"] == run]
    df = df.dropna(subset=["n_experts"])
    return df.astype({"layer": int, "n_experts": int, "top_k": int}).reset_index(drop=True)


def _token_runs(con: duckdb.DuckDBPyConnection, sel: Selection) -> set[str]:
    """Runs that hold token-level routing rows in the selection."""
    try:
        rows = con.execute(f"SELECT DISTINCT run FROM routing WHERE {sel.filter().sql}").fetchall()
    except duckdb.Error as e:
        raise translate(e) from None
    return {r[0] for r in rows}


def _coverage(con: duckdb.DuckDBPyConnection, sel: Selection) -> dict[str, float]:
    """Per run with token-level routing: recorded tokens / routed tokens, the lowest over its layers."""
    f = sel.filter().sql
    sql = f"""
        WITH rec AS (SELECT run, layer, COUNT(*) AS n FROM routing WHERE {f} GROUP BY run, layer),
             routed AS (SELECT run, layer, SUM(tokens) AS n FROM router_stats WHERE {f} GROUP BY run, layer)
        SELECT rec.run, MIN(CASE WHEN routed.n > 0 THEN rec.n * 1.0 / routed.n ELSE 1.0 END)
        FROM rec LEFT JOIN routed ON routed.run = rec.run AND routed.layer = rec.layer
        GROUP BY rec.run
    """
    try:
        return {r: float(v) for r, v in con.execute(sql).fetchall()}
    except duckdb.Error as e:
        raise translate(e) from None


def _group(group: Group) -> tuple[str, int]:
    """Validate a capacity group and return (mode, group size)."""
    if group in ("batch", "sequence"):
        return str(group), 1
    if isinstance(group, str) and group.isdigit():
        group = int(group)
    if isinstance(group, int) and not isinstance(group, bool) and group > 0:
        return "tokens", group
    raise ValueError(f"group must be 'batch', 'sequence' or a positive number of tokens, got {group!r}")


# ---------------------------------------------------------------------------------------------------------------
# Capacity factor
# ---------------------------------------------------------------------------------------------------------------


def capacity_drops(
    con: Any,
    run: str | None = None,
    factors: Sequence[float] = (1.0, 1.25, 1.5, 2.0),
    group: Group = "batch",
    window: Window = "all",
    *,
    tag: str | None = None,
    steps: tuple[int, int] | None = None,
    source: Literal["auto", "routing", "counts"] = "auto",
) -> pd.DataFrame:
    """Token-drop rates the recorded routing would suffer at each capacity factor, per run × layer × step window.

    capacity = ceil(cf · k · T_group / N) per expert per capacity group; first choices fill it before second
    choices (DeepSpeed). source "routing" replays token-level routing (all columns); "counts" uses expert_load
    per step, exact for group "batch" when a step is one forward pass and a lower bound otherwise (only
    drop_rate); "auto" replays routing where a run has it, except for group "batch" on a token sample (a
    batch of only the recorded sequences is too small), where counts answer. A run that cannot answer gets
    one row per layer with source "none" and the reason in `note`. `coverage` = recorded / routed tokens;
    `reported_drop_rate` = router_stats.dropped / (tokens·k) where the model reported drops (routes). `tag` and `steps`
    (inclusive) narrow the selection.
    """
    c = _con(con)
    mode, gsize = _group(group)
    facs = [float(f) for f in factors]
    if not facs or any(not math.isfinite(f) or f <= 0 for f in facs):
        raise ValueError(f"capacity factors must be positive numbers, got {list(factors)!r}")
    if source not in ("auto", "routing", "counts"):
        raise ValueError(f"source must be 'auto', 'routing' or 'counts', got {source!r}")
    check_selection(c, Selection(run=run, tag=tag, steps=steps), "capacity")  # a typo is an error, not "no rows"
    layers = _layers(c, run)
    if layers.empty:
        return pd.DataFrame(columns=CAPACITY_COLUMNS)
    cov = _coverage(c, Selection(run=run, tag=tag, steps=steps)) if source != "counts" else {}
    group_label = str(group)
    # Each run's source is decided here; the runs sharing a source are answered by one query (not one per run:
    # on a root of 1,000 runs each query scans every file's footer, so a per-run loop grows with runs²).
    frames: list[pd.DataFrame] = []
    by_source: dict[str, list[str]] = {"routing": [], "counts": []}
    notes: dict[str, str] = {}
    for r, lay in layers.groupby("run", sort=True):
        note = ""
        # A token sample keeps whole sequences, so per-sequence groups replay exactly on it, but a 'batch'
        # group of only the recorded sequences is smaller (noisier) than the real one: there the per-step
        # counts, which cover every token, are the better answer unless routing is asked for.
        sampled = cov.get(r, 0.0) < 0.999
        if r in cov and (source == "routing" or (source == "auto" and (mode != "batch" or not sampled))):
            by_source["routing"].append(r)
            if sampled and mode == "sequence":
                note = f"replayed on the recorded sequences ({cov[r]:.0%} of tokens)"
            elif sampled:
                note = f"replayed on a token sample ({cov[r]:.0%}): capacity groups hold only recorded sequences"
        elif mode == "batch" and source in ("auto", "counts"):
            by_source["counts"].append(r)
            note = "from per-step counts: exact when a step is one forward pass, else a lower bound"
            if r in cov:
                note += f"; token-level routing covers {cov[r]:.0%} of tokens (source='routing' replays it)"
        else:
            note = (
                f"group {group_label!r} needs token-level routing; this run has counts only (record with tokens > 0)"
                if r not in cov
                else "no token-level routing in this selection"
            )
            frames.append(pd.DataFrame({"run": r, "layer": lay["layer"].to_numpy(), "source": "none"}))
        notes[r] = note
    for src, names in by_source.items():
        if not names:
            continue
        lay = layers[layers["run"].isin(names)]
        params: dict[str, Any] = {
            "filter": Selection(run=names, tag=tag, steps=steps).filter(),
            "layer_rows": _rows(lay[["run", "layer", "n_experts", "top_k"]].itertuples(index=False)),
            "factor_rows": _rows((f,) for f in facs),
            **window_params(window),
        }
        if src == "routing":
            df = run_analysis(c, "whatif_capacity", {**params, "mode": mode, "group_size": gsize})
        else:
            df = run_analysis(c, "whatif_capacity_counts", params)
        df["source"] = src
        frames.append(df)
    for df in frames:
        df["group"] = group_label
        df["note"] = df["run"].map(notes)
    out = pd.concat(frames, ignore_index=True)
    for col in CAPACITY_COLUMNS:
        if col not in out:
            out[col] = np.nan
    for col in _CAPACITY_COUNTS:
        out[col] = pd.to_numeric(out[col]).round().astype("Int64")  # counts stay integers beside skip rows
    return out[CAPACITY_COLUMNS].sort_values(["run", "layer", "window", "capacity_factor"], ignore_index=True)


# ---------------------------------------------------------------------------------------------------------------
# Expert-parallel placement
# ---------------------------------------------------------------------------------------------------------------


def round_robin(n_experts: int, devices: int) -> list[int]:
    """The default expert-parallel placement: expert e on device e % devices."""
    return [e % devices for e in range(n_experts)]


def _as_devices(entry: Any) -> list[int]:
    """One expert's devices: an int or a sequence of ints (replicas)."""
    if isinstance(entry, (int, np.integer)):
        return [int(entry)]
    return [int(d) for d in entry]


def _placement_matrix(spec: Any, n_experts: int, devices: int, where: str) -> np.ndarray:
    """(N, D) matrix of the share of each expert's load served by each device (rows sum to 1)."""
    if spec is None:
        spec = round_robin(n_experts, devices)
    entries = list(spec)
    if len(entries) < n_experts:
        raise ValueError(f"placement for {where} places {len(entries)} experts, the layer has {n_experts}")
    m = np.zeros((n_experts, devices))
    for e in range(n_experts):
        devs = _as_devices(entries[e])
        if not devs or any(d < 0 or d >= devices for d in devs):
            raise ValueError(f"placement for {where}: expert {e} on devices {devs}, valid devices are 0..{devices - 1}")
        for d in devs:  # replicas split the expert's load evenly (as EPLB assumes)
            m[e, d] += 1.0 / len(devs)
    return m


def _frame_matrix(df: pd.DataFrame, n_experts: int, devices: int, where: str) -> np.ndarray:
    """Placement matrix from rows (expert, device[, share]); missing shares split evenly over replicas."""
    m = np.zeros((n_experts, devices))
    share = df["share"] if "share" in df else 1.0 / df.groupby("expert")["device"].transform("count")
    for e, d, s in zip(df["expert"].astype(int), df["device"].astype(int), np.broadcast_to(share, len(df))):
        if not (0 <= d < devices) or not (0 <= e < n_experts):
            raise ValueError(
                f"placement for {where}: expert {e} on device {d} is out of range (N={n_experts}, D={devices})"
            )
        m[e, d] += float(s)
    missing = np.flatnonzero(m.sum(axis=1) <= 0)
    if missing.size:
        raise ValueError(f"placement for {where} leaves experts {missing.tolist()} unplaced")
    return m / m.sum(axis=1, keepdims=True)


def _matrices(placement: PlacementSpec, layers: pd.DataFrame, devices: int) -> dict[tuple[str, int], np.ndarray]:
    """Placement matrix per (run, layer) from any accepted placement spec."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for r, layer, n in layers[["run", "layer", "n_experts"]].itertuples(index=False):
        where = f"run {r!r} layer {layer}"
        if isinstance(placement, pd.DataFrame):
            rows = placement[placement["layer"] == layer]
            if "run" in rows:
                rows = rows[rows["run"] == r]
            if rows.empty:
                raise ValueError(f"placement has no rows for {where}")
            out[(r, layer)] = _frame_matrix(rows, n, devices, where)
        elif isinstance(placement, Mapping):
            if layer not in placement:
                raise ValueError(f"placement has no entry for layer {layer}")
            out[(r, layer)] = _placement_matrix(placement[layer], n, devices, where)
        else:
            out[(r, layer)] = _placement_matrix(placement, n, devices, where)
    return out


def _step_filter(run: str | None, steps: tuple[int, int] | None) -> Raw:
    return Selection(run=run, steps=steps).filter(tag=False)


def _load_inputs(
    con: duckdb.DuckDBPyConnection, run: str | None, devices: int, steps: tuple[int, int] | None, a2a: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-step expert loads (expert_load) and, where token-level routing exists, per-origin loads."""
    loads = run_analysis(con, "whatif_step_load", {"filter": _step_filter(run, steps)})
    origin = pd.DataFrame(columns=["run", "step", "layer", "origin", "expert", "n"])
    if a2a:
        origin = run_analysis(con, "whatif_origin_load", {"filter": _step_filter(run, steps), "devices": devices})
    return loads, origin


def _evaluate(
    loads: pd.DataFrame,
    origin: pd.DataFrame,
    layers: pd.DataFrame,
    mats: dict[tuple[str, int], np.ndarray],
    devices: int,
) -> pd.DataFrame:
    """Per-step device-load and all-to-all figures of one placement (the core of placement_stats)."""
    frames: list[pd.DataFrame] = []
    origin_groups = dict(tuple(origin.groupby(["run", "layer"]))) if not origin.empty else {}
    for (r, layer), g in loads.groupby(["run", "layer"], sort=True):
        key = (r, int(layer))
        if key not in mats:
            continue
        m = mats[key]
        n = m.shape[0]
        # steps × experts count matrix, then device loads = counts @ shares
        steps, step_idx = np.unique(g["step"].to_numpy(), return_inverse=True)
        counts = np.zeros((len(steps), n))
        e = g["expert"].to_numpy().astype(int)
        ok = e < n
        np.add.at(counts, (step_idx[ok], e[ok]), g["tokens"].to_numpy()[ok])
        dev = counts @ m
        total = dev.sum(axis=1)
        mx = dev.max(axis=1)
        mean = total / devices
        with np.errstate(invalid="ignore", divide="ignore"):
            bal = np.where(mx > 0, mean / mx, np.nan)
            strag = np.where(mean > 0, mx / mean, np.nan)
        f = pd.DataFrame(
            {
                "run": r,
                "step": steps,
                "layer": int(layer),
                "devices": devices,
                "assignments": total,
                "mean_load": mean,
                "max_load": mx,
                "balancedness": bal,
                "straggler": strag,
            }
        )
        og = origin_groups.get((r, layer))
        if og is not None and not og.empty:
            oe = og["expert"].to_numpy().astype(int)
            oo = og["origin"].to_numpy().astype(int)
            nn = og["n"].to_numpy().astype(float)
            keep = oe < n
            # a token stays local for the share of its expert served on its own device (replicas split evenly)
            remote = nn[keep] * (1.0 - m[oe[keep], oo[keep]])
            a2a = (
                pd.DataFrame({"step": og["step"].to_numpy()[keep], "routed": nn[keep], "remote": remote})
                .groupby("step", as_index=False)
                .sum()
            )
            f = f.merge(a2a, on="step", how="left")
            f = f.rename(columns={"routed": "routed_assignments", "remote": "a2a_assignments"})
            f["a2a_fraction"] = f["a2a_assignments"] / f["routed_assignments"]
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=PLACEMENT_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    for col in PLACEMENT_COLUMNS:
        if col not in out:
            out[col] = np.nan
    return out[PLACEMENT_COLUMNS].sort_values(["run", "layer", "step"], ignore_index=True)


def _check_devices(devices: int) -> int:
    if isinstance(devices, bool) or int(devices) != devices or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    return int(devices)


def placement_stats(
    con: Any,
    placement: PlacementSpec = None,
    devices: int = 8,
    run: str | None = None,
    steps: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Per step and layer device loads of an expert-parallel placement: balancedness, straggler, all-to-all.

    balancedness = mean/max device load, straggler = max/mean (loads from expert_load, summed over ranks and
    tags). a2a_assignments: token-level assignments whose expert is served off the token's origin device
    (data-parallel origin seq % D; with replicas, the expected share); NaN where a run has no routing.
    `steps` is an inclusive (first, last) range.
    """
    c = _con(con)
    d = _check_devices(devices)
    layers = _layers(c, run)
    if layers.empty:
        return pd.DataFrame(columns=PLACEMENT_COLUMNS)
    mats = _matrices(placement, layers, d)
    loads, origin = _load_inputs(c, run, d, steps, a2a=bool(_token_runs(c, Selection(run=run, steps=steps))))
    return _evaluate(loads, origin, layers, mats, d)


def summarize_placement(stats: pd.DataFrame) -> pd.DataFrame:
    """Per run × layer summary of placement_stats over its steps (means of per-step figures, a2a as a share)."""
    if stats.empty:
        return pd.DataFrame(columns=["run", "layer", "devices", "steps", "balancedness", "straggler", "a2a_fraction"])
    g = stats.groupby(["run", "layer", "devices"], as_index=False)
    out = g.agg(
        steps=("step", "nunique"),
        first_step=("step", "min"),
        last_step=("step", "max"),
        balancedness=("balancedness", "mean"),
        worst_balancedness=("balancedness", "min"),
        straggler=("straggler", "mean"),
        routed=("routed_assignments", "sum"),
        a2a=("a2a_assignments", "sum"),
    )
    out["a2a_fraction"] = np.where(out["routed"] > 0, out["a2a"] / out["routed"].where(out["routed"] > 0), np.nan)
    return out.drop(columns=["routed", "a2a"])


def _replicate(weights: np.ndarray, replicas: int, devices: int) -> np.ndarray:
    """Replica count per expert: each extra replica goes to the expert with the largest load per replica (EPLB)."""
    count = np.ones(len(weights), dtype=int)
    for _ in range(replicas):
        per = np.where(count < devices, weights / count, -np.inf)  # more replicas than devices would not help
        e = int(np.argmax(per))
        if not np.isfinite(per[e]):
            break
        count[e] += 1
    return count


def _lpt(weights: np.ndarray, devices: int, replicas: int = 0) -> list[list[int]]:
    """Greedy longest-processing-time packing of experts (and replicas) onto devices with equal slot counts."""
    n = len(weights)
    count = _replicate(weights, replicas, devices)
    items = sorted(((weights[e] / count[e], e) for e in range(n) for _ in range(count[e])), key=lambda x: (-x[0], x[1]))
    # expert-parallel devices hold the same number of experts (memory), so cap the slots per device
    slots = math.ceil(len(items) / devices)
    load = np.zeros(devices)
    used = np.zeros(devices, dtype=int)
    where: list[list[int]] = [[] for _ in range(n)]
    for w, e in items:
        free = [d for d in range(devices) if used[d] < slots]
        distinct = [d for d in free if d not in where[e]] or free  # two replicas on one device would not help
        d = min(distinct, key=lambda d: (load[d], used[d], d))
        where[e].append(d)
        load[d] += w
        used[d] += 1
    return where


@dataclass
class PlacementPlan:
    """A suggested placement and how it fares against the baseline on a held-out window."""

    #: run, layer, expert, device, share (share = this replica's part of the expert's load)
    placement: pd.DataFrame
    #: one row per run × layer: fit/eval windows, then balancedness, straggler and a2a_fraction before/after
    report: pd.DataFrame


def _windows(
    steps: np.ndarray, fit_steps: tuple[int, int] | None, eval_steps: tuple[int, int] | None, run: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive fit and evaluation step ranges; by default the first and second half of the run's steps."""
    steps = np.sort(np.unique(steps))
    if fit_steps is None and eval_steps is None:
        if len(steps) < 2:
            raise ValueError(f"run {run!r} has {len(steps)} step(s); a held-out evaluation needs at least 2")
        half = len(steps) // 2
        return (int(steps[0]), int(steps[half - 1])), (int(steps[half]), int(steps[-1]))
    if fit_steps is not None and not ((steps >= fit_steps[0]) & (steps <= fit_steps[1])).any():
        raise ValueError(f"run {run!r}: the fit window {fit_steps[0]}..{fit_steps[1]} holds no recorded steps")
    if fit_steps is None:
        assert eval_steps is not None
        before = steps[steps < eval_steps[0]]
        if before.size == 0:
            raise ValueError(f"run {run!r}: no steps before the evaluation window {eval_steps} to fit on")
        fit_steps = (int(before[0]), int(before[-1]))
    if eval_steps is None:
        after = steps[steps > fit_steps[1]]
        if after.size == 0:
            raise ValueError(f"run {run!r}: no steps after the fit window {fit_steps} to evaluate on")
        eval_steps = (int(after[0]), int(after[-1]))
    for name, (a, b) in (("fit", fit_steps), ("eval", eval_steps)):
        if not ((steps >= a) & (steps <= b)).any():
            raise ValueError(f"run {run!r}: the {name} window {a}..{b} holds no recorded steps")
    return (int(fit_steps[0]), int(fit_steps[1])), (int(eval_steps[0]), int(eval_steps[1]))


def suggest_placement(
    con: Any,
    devices: int = 8,
    run: str | None = None,
    fit_steps: tuple[int, int] | None = None,
    eval_steps: tuple[int, int] | None = None,
    replicas: int = 0,
    baseline: PlacementSpec = None,
) -> PlacementPlan:
    """Propose a placement from the fit window's expert loads and judge it against `baseline` on a later window.

    Greedy LPT per layer (heaviest expert first onto the least-loaded device, equal expert slots per device);
    `replicas` extra copies per layer go to the hottest experts first and split their load evenly (DeepSeek
    EPLB). Windows are inclusive (first, last) step ranges; by default fit on the first half of each run's
    steps and evaluate on the second half. The suggestion balances load only; all-to-all is reported, not
    optimized.
    """
    c = _con(con)
    d = _check_devices(devices)
    if isinstance(replicas, bool) or int(replicas) != replicas or replicas < 0:
        raise ValueError(f"replicas must be a non-negative integer, got {replicas!r}")
    layers = _layers(c, run)
    empty_report = pd.DataFrame(columns=["run", "layer", "devices", "replicas"])
    if layers.empty:
        return PlacementPlan(pd.DataFrame(columns=["run", "layer", "expert", "device", "share"]), empty_report)
    loads, origin = _load_inputs(c, run, d, None, a2a=bool(_token_runs(c, Selection(run=run))))
    base_mats = _matrices(baseline, layers, d)
    rows: list[dict[str, Any]] = []
    placed: list[dict[str, Any]] = []
    for r, lay in layers.groupby("run", sort=True):
        rl = loads[loads["run"] == r]
        if rl.empty:
            continue
        (fa, fb), (ea, eb) = _windows(rl["step"].to_numpy(), fit_steps, eval_steps, r)
        fit = rl[(rl["step"] >= fa) & (rl["step"] <= fb)]
        mats: dict[tuple[str, int], np.ndarray] = {}
        for layer, n in lay[["layer", "n_experts"]].itertuples(index=False):
            fl = fit[fit["layer"] == layer]
            w = np.zeros(n)
            e = fl["expert"].to_numpy().astype(int)
            np.add.at(w, e[e < n], fl["tokens"].to_numpy()[e < n])
            where = _lpt(w, d, int(replicas))
            mats[(r, int(layer))] = _placement_matrix(where, n, d, f"run {r!r} layer {layer}")
            for ex, devs in enumerate(where):
                for dv in devs:
                    placed.append({"run": r, "layer": int(layer), "expert": ex, "device": dv, "share": 1.0 / len(devs)})
        ev = rl[(rl["step"] >= ea) & (rl["step"] <= eb)]
        eo = (
            origin[(origin["run"] == r) & (origin["step"] >= ea) & (origin["step"] <= eb)]
            if not origin.empty
            else origin
        )
        before = summarize_placement(_evaluate(ev, eo, lay, base_mats, d))
        after = summarize_placement(_evaluate(ev, eo, lay, mats, d))
        both = before.merge(after, on=["run", "layer", "devices"], suffixes=("_before", "_after"))
        for rec in both.to_dict("records"):
            rows.append(
                {
                    "run": r,
                    "layer": int(rec["layer"]),
                    "devices": d,
                    "replicas": int(replicas),
                    "fit_start": fa,
                    "fit_end": fb,
                    "eval_start": ea,
                    "eval_end": eb,
                    "eval_steps": int(rec["steps_before"]),
                    "balancedness_before": rec["balancedness_before"],
                    "balancedness_after": rec["balancedness_after"],
                    "straggler_before": rec["straggler_before"],
                    "straggler_after": rec["straggler_after"],
                    "a2a_fraction_before": rec["a2a_fraction_before"],
                    "a2a_fraction_after": rec["a2a_fraction_after"],
                }
            )
    report = pd.DataFrame(rows) if rows else empty_report
    placement = pd.DataFrame(placed, columns=["run", "layer", "expert", "device", "share"])
    return PlacementPlan(placement, report)


# ---------------------------------------------------------------------------------------------------------------
# Expert offloading: cache hit rates
# ---------------------------------------------------------------------------------------------------------------


def _requests(lists: Sequence[Sequence[int]] | Any) -> list[list[int]]:
    """Per token the distinct valid experts in slot order (padding < 0, NULL slots and repeats dropped)."""
    out: list[list[int]] = []
    for experts in lists:
        seen: list[int] = []
        for e in experts:
            if e is None or e != e:  # a slot that reached no expert: stored NULL (NaN once in a float array)
                continue
            e = int(e)
            if e >= 0 and e not in seen:
                seen.append(e)
        out.append(seen)
    return out


def stack_depths(requests: Sequence[Sequence[int]], n_experts: int, policy: Policy) -> np.ndarray:
    """Hit histogram of one request stream: element d counts requests that hit every cache larger than d.

    Each token's experts are requested together: a request hits when its expert is cached at the token's
    start; then the token's experts are loaded, evicting the cached experts of lowest priority that the token
    does not use (LRU: least recent, slot 0 counting as the most recent of a token; LFU: fewest requests so
    far, ties to least recent; Belady: next use farthest away). With C smaller than the token's k the cache
    keeps its first C choices. Every policy's priority is independent of C, so the caches of all sizes nest
    (Mattson's stack property) and one pass serves every C.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
    return _depths(_requests(requests), n_experts, policy)


def _depths(reqs: list[list[int]], n_experts: int, policy: str) -> np.ndarray:
    """stack_depths on requests already cleaned by _requests."""
    n = max([n_experts, *(max(r) + 1 for r in reqs if r)])
    if policy == "lru":
        return _lru_depths(reqs, n)
    return _priority_depths(reqs, n, policy)


def _stamps(reqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Flattened requests: token index, expert, recency stamp (later tokens higher; within a token slot 0 highest)."""
    lens = np.fromiter((len(r) for r in reqs), dtype=np.int64, count=len(reqs))
    kmax = int(lens.max(initial=1)) or 1
    tok = np.repeat(np.arange(len(reqs), dtype=np.int64), lens)
    exp = np.fromiter((e for r in reqs for e in r), dtype=np.int64, count=int(lens.sum()))
    slot = np.arange(len(tok), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    return tok, exp, tok * kmax + (kmax - 1 - slot), kmax


def _lru_depths(reqs: list[list[int]], n: int, chunk: int = 4096) -> np.ndarray:
    """LRU stack depths in numpy: a request's depth is how many experts were used more recently than it."""
    tok, exp, stamp, _ = _stamps(reqs)
    hist = np.zeros(n, dtype=np.int64)
    carry = np.full(n, -1, dtype=np.int64)  # last stamp of each expert before the current chunk
    for lo in range(0, len(reqs), chunk):
        hi = min(lo + chunk, len(reqs))
        a, b = np.searchsorted(tok, [lo, hi])
        # last[t, x]: the latest stamp of expert x over tokens before t (running max down the chunk)
        used = np.full((hi - lo + 1, n), -1, dtype=np.int64)
        used[0] = carry
        np.maximum.at(used, (tok[a:b] - lo + 1, exp[a:b]), stamp[a:b])
        last = np.maximum.accumulate(used, axis=0)
        carry = last[-1]
        rows = last[tok[a:b] - lo]
        mine = rows[np.arange(b - a), exp[a:b]]
        seen = mine >= 0  # first-ever requests miss in every cache
        depth = (rows[seen] > mine[seen, None]).sum(axis=1)
        hist += np.bincount(depth, minlength=n)[:n]
    return hist


def _priority_depths(reqs: list[list[int]], n: int, policy: str) -> np.ndarray:
    """Stack depths for any priority that does not depend on the cache size (Mattson's one-pass update).

    The token's experts go on top of the stack; walking down to the deepest of them, a pool carries the
    displaced experts, and each level keeps the higher-priority one of (the expert there, the pool's best):
    the cache of size i + 1 is the token's experts plus the best of what the size-i + 1 cache held.
    """
    hist = [0] * n
    pos = [-1] * n
    key = [0] * n
    mark = [-1] * n  # mark[e] == t: e is requested by token t
    kg = key.__getitem__
    _, _, stamp_arr, kmax = _stamps(reqs)
    stamps = stamp_arr.tolist()
    big = len(stamps) * kmax + 1  # LFU key = count * big + stamp: counts dominate, recency breaks ties
    counts = [0] * n
    nxt: list[int] = []
    if policy == "belady":
        nxt = [0] * len(stamps)  # per request, the token that next asks for the same expert
        last = [len(reqs) + 1] * n
        i = len(stamps)
        for t in range(len(reqs) - 1, -1, -1):
            i -= len(reqs[t])
            for j, e in enumerate(reqs[t]):
                nxt[i + j] = last[e]
            for e in reqs[t]:
                last[e] = t
    stack: list[int] = []
    base = 0
    for t, req in enumerate(reqs):
        k = len(req)
        if not k:
            continue
        deepest = -1
        unseen = 0
        for e in req:
            mark[e] = t
            d = pos[e]
            if d < 0:
                unseen += 1
            else:
                hist[d] += 1
                if d > deepest:
                    deepest = d
        size = len(stack)
        # below the deepest requested expert nothing moves, unless a new expert pushes the whole stack down
        end = size if unseen else deepest + 1
        pool = [x for x in stack[: min(k, end)] if mark[x] != t]
        b, bk = -1, 0
        if pool:
            b = max(pool, key=kg)
            bk = key[b]
        for i in range(k, end):
            x = stack[i]
            if mark[x] == t:  # a requested expert leaves this level: the pool's best takes it
                pool.remove(b)
            elif key[x] >= bk:
                continue  # x outranks everything displaced so far and keeps its level
            else:
                pool.remove(b)
                pool.append(x)
            stack[i] = b
            pos[b] = i
            if pool:
                b = max(pool, key=kg)
                bk = key[b]
        stack[: min(k, size)] = req
        for i, e in enumerate(req):
            pos[e] = i
        if pool:  # only when new experts grew the stack: the leftovers go to the bottom, best first
            pool.sort(key=kg, reverse=True)
            for x in pool:
                pos[x] = len(stack)
                stack.append(x)
        for j, e in enumerate(req):
            if policy == "lfu":
                counts[e] += 1
                key[e] = counts[e] * big + stamps[base + j]
            elif policy == "belady":
                key[e] = -nxt[base + j]
            else:
                key[e] = stamps[base + j]
        base += k
    return np.asarray(hist, dtype=np.int64)


def simulate_cache(
    requests: Sequence[Sequence[int]], n_experts: int, sizes: Sequence[int] | None = None, policy: Policy = "lru"
) -> pd.DataFrame:
    """Hits of one request stream (per token, its experts) for each cache size: cache_size, requests, hits, hit_rate."""
    if policy not in POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; use one of {', '.join(POLICIES)}")
    return _hits_frame([_requests(requests)], n_experts, sizes, policy)


def _hits_frame(
    streams: Sequence[list[list[int]]], n_experts: int, sizes: Sequence[int] | None, policy: str
) -> pd.DataFrame:
    """Hits per cache size of independent request streams (one cache each), summed."""
    hists = [_depths(reqs, n_experts, policy) for reqs in streams]
    hist = np.zeros(max([n_experts, *(len(h) for h in hists)]), dtype=np.int64)
    for h in hists:
        hist[: len(h)] += h
    total = sum(len(r) for reqs in streams for r in reqs)
    cum = np.concatenate([[0], np.cumsum(hist)])
    sizes = list(range(1, n_experts + 1)) if sizes is None else [int(s) for s in sizes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"cache sizes must be positive, got {sizes}")
    hits = [int(cum[min(s, len(hist))]) for s in sizes]
    return pd.DataFrame(
        {
            "cache_size": sizes,
            "requests": total,
            "hits": hits,
            "hit_rate": [h / total if total else np.nan for h in hits],
        }
    )


def _token_streams(
    con: duckdb.DuckDBPyConnection, sel: Selection
) -> dict[tuple[str, int], list[list[list[int]]]]:
    """Per (run, layer): its per-token expert lists in token order, one stream per rank (one query, through Arrow)."""
    sql = render("whatif_token_experts", {"filter": sel.filter()})
    try:
        rel = con.sql(sql)
        # duckdb 2 names it to_arrow_table; pyproject still allows duckdb 1.x, where it is arrow()
        fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
        tbl = fetch()
    except duckdb.Error as e:
        raise translate(e) from None
    col = tbl.column("experts").combine_chunks()
    runs = tbl.column("run").to_pylist()
    layers = tbl.column("layer").to_numpy()
    ranks = tbl.column("rank").to_numpy()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False).tolist()
    tokens = [values[offsets[i] : offsets[i + 1]] for i in range(len(col))]
    # rows come ordered by (run, layer, rank): a stream ends where any of the three changes
    change = np.zeros(len(tokens), dtype=bool)
    if len(tokens) > 1:
        change[1:] = (np.diff(layers) != 0) | (np.diff(ranks) != 0)
        change[1:] |= np.array([a != b for a, b in zip(runs[:-1], runs[1:])], dtype=bool)
    cuts = [0, *np.flatnonzero(change).tolist(), len(tokens)]
    out: dict[tuple[str, int], list[list[list[int]]]] = {}
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            out.setdefault((runs[a], int(layers[a])), []).append(tokens[a:b])
    return out


def cache_hit_rates(
    con: Any,
    run: str | None = None,
    sizes: Sequence[int] | None = None,
    policies: Sequence[Policy] = ("lru", "lfu", "belady"),
    *,
    layer: int | Sequence[int] | None = None,
    steps: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Per-layer expert-cache hit rates vs cache size under LRU, LFU and the Belady optimum (offloaded experts).

    Replays token-level routing in token order (step, tag, seq, pos) with one cache per layer and rank (each
    data-parallel replica holds its own; hits and requests summed over ranks); `sizes`
    defaults to 1..N; `layer` and `steps` (inclusive) narrow the work. Raises ValueError when no selected
    run has token-level routing.
    """
    c = _con(con)
    pols = [str(p).lower() for p in policies]
    for p in pols:
        if p not in POLICIES:
            raise ValueError(f"unknown cache policy {p!r}; use one of {', '.join(POLICIES)}")
    if sizes is not None and any(int(s) < 1 for s in sizes):
        raise ValueError(f"cache sizes must be positive, got {list(sizes)}")
    layers = _layers(c, run)
    if layer is not None:
        wanted = {int(layer)} if isinstance(layer, (int, np.integer)) else {int(x) for x in layer}
        layers = layers[layers["layer"].isin(wanted)]
    token_runs = _token_runs(c, Selection(run=run, steps=steps))
    if not token_runs:
        which = f"run {run!r} has" if run else "the trace has"
        raise ValueError(f"the cache what-if needs token-level routing and {which} none (record with tokens > 0)")
    frames: list[pd.DataFrame] = []
    layer_sel = sorted({int(x) for x in layers["layer"]}) if layer is not None else None
    per_layer = _token_streams(c, Selection(run=run, layer=layer_sel, steps=steps))
    for r, lay, n in layers[["run", "layer", "n_experts"]].itertuples(index=False):
        if r not in token_runs:
            continue
        streams = [_requests(t) for t in per_layer.get((r, int(lay)), [])]
        if not streams:
            continue
        for p in pols:
            f = _hits_frame(streams, int(n), sizes, p)
            f.insert(0, "policy", p)
            f.insert(0, "layer", int(lay))
            f.insert(0, "run", r)
            f["n_experts"] = int(n)
            f["tokens"] = sum(len(t) for t in streams)
            frames.append(f)
    if not frames:
        return pd.DataFrame(columns=CACHE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[CACHE_COLUMNS]

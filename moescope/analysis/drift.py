"""Drift: per layer, how far the current expert-load distribution moved from a baseline's.

Statistics per layer on the assignment counts (expert_load): Jensen–Shannon distance (base 2, in [0, 1]),
total variation, PSI with +1 smoothing, and the chi-square statistic of the 2 × N table. A layer is
flagged (WARN) only when JS > max(js_min, bootstrap threshold) and TV > tv_min. The bootstrap threshold is
the `quantile` of the JS distance between two samples drawn, with replacement, from the baseline's units
at the baseline's and the current's sizes (the `bootstrap` column; `threshold` is the limit actually applied): whole sequences from token-level routing (tokens that share a
sequence are correlated, so resampling tokens would understate the noise), or whole steps from
expert_load where the baseline has no token-level routing. Seeded, so a CI run is reproducible.
"""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pandas as pd

from ..config import ConfigError, DriftConfig, HealthConfig, as_config
from .engine import run_analysis
from .rules import RangeError, check_ranges
from .selection import Selection

COLUMNS = [
    "layer", "js", "tv", "psi", "chi2", "threshold", "flagged", "status", "message", "bootstrap",
    "n_baseline", "n_current", "n_units", "unit",
]


def _js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon distance base 2 between rows of p and q (each normalised to sum 1)."""
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    q = q / np.maximum(q.sum(axis=-1, keepdims=True), 1e-300)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=-1)
        kq = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=-1)
    return np.sqrt(np.clip(0.5 * (kp + kq), 0.0, 1.0))


def drift_stats(baseline: np.ndarray, current: np.ndarray) -> dict[str, float]:
    """JS distance (base 2), TV, PSI (+1 smoothing) and chi-square between two count vectors."""
    b = np.asarray(baseline, dtype=float)
    c = np.asarray(current, dtype=float)
    p, q = b / b.sum(), c / c.sum()
    ps, qs = (b + 1) / (b + 1).sum(), (c + 1) / (c + 1).sum()
    keep = (b + c) > 0
    table = np.vstack([b[keep], c[keep]])
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = float(np.nansum((table - expected) ** 2 / expected))
    return {
        "js": float(_js(p, q)),
        "tv": float(0.5 * np.abs(p - q).sum()),
        "psi": float(((qs - ps) * np.log(qs / ps)).sum()),
        "chi2": chi2,
    }


def _draw_counts(rng: np.random.Generator, n: int, units: int, size: int) -> np.ndarray:
    """[size, units]: how often each unit is drawn in `n` draws with replacement, `size` times. The same law as
    multinomial(n, uniform), from integer draws and a bincount instead of a binomial per unit (faster at 10k units)."""
    return np.stack([np.bincount(rng.integers(0, units, size=n), minlength=units) for _ in range(size)]).astype(
        np.float64)


def _counts(con: duckdb.DuckDBPyConnection, sel: Selection) -> pd.DataFrame:
    return run_analysis(con, "drift_load", {"filter": sel.filter()})


def _top_k(con: duckdb.DuckDBPyConnection, sel: Selection) -> dict[int, int]:
    f = Selection(run=sel.run, layer=sel.layer).filter(tag=False).sql  # layer_info has no step or tag
    df = con.execute(f"SELECT layer, MAX(top_k) AS k FROM layer_info WHERE {f} GROUP BY layer").df()
    return {int(r.layer): int(r.k) for r in df.itertuples()}


def _units(con: duckdb.DuckDBPyConnection, sel: Selection, pre: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str]:
    """Bootstrap units of the baseline: (unit id, layer, expert, c) rows and the unit kind.

    `pre`: the drift_units rows of `sel` computed already (Trace keeps them per routing part), else run here;
    with a `unit` column (0..n-1, one per sequence) they are used as they are.
    """
    if pre is not None and "unit" in pre.columns and len(pre):
        return pre[["unit", "layer", "expert", "c"]], "sequence"
    df = run_analysis(con, "drift_units", {"filter": sel.filter()}) if pre is None or "unit" in pre.columns else pre.copy()
    if len(df):
        key = ["run", "rank", "step", "tag", "seq"]
        df["unit"] = df.groupby(key, sort=False, dropna=False).ngroup()
        return df[["unit", "layer", "expert", "c"]], "sequence"
    df = run_analysis(con, "drift_step_units", {"filter": sel.filter()})
    df["unit"] = df.groupby(["run", "step"], sort=False).ngroup()
    return df[["unit", "layer", "expert", "c"]], "step"


def drift_config(config: HealthConfig | DriftConfig | str | os.PathLike[str] | None) -> DriftConfig:
    """The drift settings of a HealthConfig, a DriftConfig, a moescope.toml path or None (defaults), range-checked."""
    if isinstance(config, DriftConfig):
        try:
            check_ranges(config, "drift")
        except RangeError as e:
            raise ConfigError(str(e)) from None
        return config
    return as_config(config).drift


def drift(
    baseline_con: duckdb.DuckDBPyConnection,
    baseline: Selection,
    current_con: duckdb.DuckDBPyConnection,
    current: Selection,
    config: HealthConfig | DriftConfig | str | os.PathLike[str] | None = None,
    *,
    n_boot: int | None = None,
    seed: int | None = None,
    baseline_units: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per layer drift of `current` (rows of current_con) against `baseline` (rows of baseline_con); see COLUMNS.

    The two connections may be the same (slices of one trace) or two traces' connections. `baseline_units`: the
    baseline's per-sequence counts (analyses/drift_units.sql rows) when the caller keeps them already.
    """
    dc = drift_config(config)
    n_boot = dc.n_boot if n_boot is None else int(n_boot)
    seed = dc.seed if seed is None else int(seed)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0: no bootstrap), got {n_boot}")
    bcounts, ccounts = _counts(baseline_con, baseline), _counts(current_con, current)
    ks = _top_k(baseline_con, baseline)
    units, unit_kind = _units(baseline_con, baseline, baseline_units)
    layers = sorted(set(bcounts["layer"].astype(int)) | set(ccounts["layer"].astype(int)))
    n_exp = 1 + int(max(bcounts["expert"].max() if len(bcounts) else 0, ccounts["expert"].max() if len(ccounts) else 0))
    rng = np.random.default_rng(seed)

    # One unit × layer × expert cube, so a resampled sequence brings all its layers along.
    n_units = int(units["unit"].max()) + 1 if len(units) else 0
    cube = np.zeros((n_units, len(layers), n_exp))
    if n_units:
        # One bincount over flat cube indices: numpy throughout (a pandas map per row cost ~0.3 s at 3M rows),
        # and a sequence a flush split across two parts sums its rows instead of keeping the last.
        lay = units["layer"].to_numpy().astype(np.int64)
        exp = units["expert"].to_numpy().astype(np.int64)
        la = np.asarray(layers, dtype=np.int64)
        li = np.minimum(np.searchsorted(la, lay), max(len(la) - 1, 0))
        ok = (la[li] == lay) & (exp >= 0) & (exp < n_exp) if len(la) else np.zeros(len(lay), dtype=bool)
        flat = (units["unit"].to_numpy().astype(np.int64)[ok] * len(layers) + li[ok]) * n_exp + exp[ok]
        cube = np.bincount(flat, weights=units["c"].to_numpy().astype(np.float64)[ok],
                           minlength=cube.size).reshape(cube.shape)
    if n_units > dc.max_units:  # cap the bootstrap's cost; a random subset keeps the per-unit variability
        cube = cube[rng.choice(n_units, dc.max_units, replace=False)]
        n_units = dc.max_units

    # One resample per side and size serves every layer (a resampled sequence brings all its layers along), so
    # each layer's null keeps its law and the draws are not repeated per layer.
    drawn: dict[tuple[str, int, int], np.ndarray] = {}

    def resample(side: str, n: int, units: int) -> np.ndarray:
        if (side, n, units) not in drawn:
            drawn[(side, n, units)] = _draw_counts(rng, n, units, n_boot)
        return drawn[(side, n, units)]

    rows = []
    for i, layer in enumerate(layers):
        b = np.zeros(n_exp)
        c = np.zeros(n_exp)
        bl = bcounts[bcounts["layer"] == layer]
        cl = ccounts[ccounts["layer"] == layer]
        b[bl["expert"].astype(int).to_numpy()] = bl["c"].to_numpy()
        c[cl["expert"].astype(int).to_numpy()] = cl["c"].to_numpy()
        k = max(1, ks.get(layer, 1))
        base = {"layer": layer, "n_baseline": b.sum() / k, "n_current": c.sum() / k, "n_units": n_units, "unit": unit_kind}
        if b.sum() == 0 or c.sum() == 0:
            side = "baseline" if b.sum() == 0 else "current"
            rows.append({**base, "js": None, "tv": None, "psi": None, "chi2": None, "threshold": None, "bootstrap": None, "flagged": False,
                         "status": "SKIP", "message": f"layer {layer}: no {side} tokens in the selection"})
            continue
        st = drift_stats(b, c)
        thr = float("nan")
        per_unit = cube[:, i, :] if n_units else np.zeros((0, n_exp))
        unit_tokens = per_unit.sum(axis=1) / k
        live = unit_tokens > 0
        if live.sum() >= 2 and n_boot > 0:
            pu = per_unit[live]
            mean_tok = unit_tokens[live].mean()
            nb = max(1, int(round(b.sum() / k / mean_tok)))
            nc = max(1, int(round(c.sum() / k / mean_tok)))
            U = len(pu)
            wb = resample("baseline", nb, U)
            wc = resample("current", nc, U)
            # A bootstrap from U units sees (U-1)/U of the between-unit variance; undo that bias, which
            # matters at the small sample sizes where drift alarms are least trustworthy.
            null = _js(wb @ pu, wc @ pu) * np.sqrt(U / (U - 1))
            thr = float(np.quantile(null, dc.quantile))
        limit = dc.js_min if np.isnan(thr) else max(dc.js_min, thr)
        flagged = bool(st["js"] > limit and st["tv"] > dc.tv_min)
        thr_txt = f"max({dc.js_min:g}, bootstrap {thr:.3f})" if not np.isnan(thr) else f"{dc.js_min:g} (no bootstrap units)"
        if flagged:
            msg = (f"layer {layer}: expert load drifted: JS {st['js']:.3f} > {thr_txt} and TV {st['tv']:.3f} > "
                   f"{dc.tv_min:g}")
        else:
            msg = f"layer {layer}: no significant drift (JS {st['js']:.3f}, limit {limit:.3f}; TV {st['tv']:.3f})"
        rows.append({**base, **st, "threshold": limit, "bootstrap": None if np.isnan(thr) else thr, "flagged": flagged, "status": "WARN" if flagged else "PASS",
                     "message": msg})
    return pd.DataFrame(rows, columns=COLUMNS)

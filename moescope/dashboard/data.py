"""Data functions of the dashboard: read-only, cached queries over one trace (no plotting here).

Every page reads through one `DashboardData`. It opens the trace twice, both times in locked mode (read-only
SQL, no file access outside the trace root): one connection for the dashboard's own queries, one for the
SQL console, so a user's slow query never blocks the charts. Results are cached by selection (an LRU of
DataFrames): the first open of a view pays for the query, every later open is a dictionary look-up.
Aggregates over the big token-level table are computed once per run and kept.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

import moescope
from moescope.analysis import rules as _rules
from moescope.analysis import whatif
from moescope.analysis.live import version_of
from moescope.analysis.selection import Selection
from moescope.analysis.vocab import Decoder, decoder_for
from moescope.config import HealthConfig, as_config, default_config_path
from moescope.format.storage import as_path

T = TypeVar("T")

#: Capacity factors the Systems page's drop-rate curve is drawn at.
WHATIF_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)

#: The SQL console's caps besides rows and seconds: DuckDB memory, and Arrow bytes of one response.
SQL_MEMORY_LIMIT = "1GB"
SQL_MAX_BYTES = 4 << 20

#: Status order, best to worst (the one `Status` order of the rule registry); a cell shows its worst status.
STATUS_ORDER = _rules.STATUS_ORDER

#: The most points a step axis gets; longer runs are bucketed into windows of a round width.
MAX_STEP_POINTS = 120


def bucket_width(lo: int, hi: int, max_points: int = MAX_STEP_POINTS) -> int:
    """A round window width (1, 2, 5, 10, 20, 50, ...) giving at most `max_points` windows over steps lo..hi."""
    span = max(1, int(hi) - int(lo) + 1)
    need = max(1, math.ceil(span / max(1, max_points)))
    width = 1
    while True:
        for m in (1, 2, 5):
            if width * m >= need:
                return width * m
        width *= 10


def worst_status(statuses: Any) -> str:
    """The worst of some finding statuses (ERROR > FAIL > WARN > SKIP > PASS); '' when there are none."""
    return _rules.worst(statuses, default="")


def _null(x: Any) -> bool:
    """Whether a list element read from DuckDB is NULL (None, a masked element or NaN, by the result's dtype)."""
    return x is None or x is np.ma.masked or x != x


def token_text(token_id: Any, decoder: Decoder | None = None) -> str:
    """How a token shows on screen: its run's decoder's text (`DashboardData.decoder`); without a decoder
    '#id', since an id is never guessed to be a byte."""
    return (decoder or decoder_for(None)).text(token_id)


@dataclass
class SqlResult:
    """What the SQL console shows: rows (or none) and one message line."""

    frame: pd.DataFrame = field(default_factory=pd.DataFrame)
    message: str = ""
    ok: bool = True
    truncated: bool = False
    seconds: float = 0.0


class _LRU:
    """A small thread-safe LRU cache of computed values, keyed by (function name, arguments)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return self._d[key]  # type: ignore[no-any-return]
        value = compute()  # outside the lock: other cached views stay served meanwhile
        with self._lock:
            self.misses += 1
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


def sel_key(sel: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """A hashable key of a selection dict ({'run', 'tag', 'steps'})."""
    sel = sel or {}
    steps = sel.get("steps")
    return (sel.get("run"), sel.get("tag"), tuple(steps) if steps else None)


class DashboardData:
    """Cached, read-only data access for one trace (`trace_root`); one instance per app."""

    def __init__(
        self,
        trace_root: str | Path,
        *,
        sql_timeout: float = 10.0,
        sql_max_rows: int = 1000,
        cache_size: int = 512,
        config: HealthConfig | str | Path | None = None,
    ) -> None:
        self.root = as_path(trace_root)  # a directory or an object-store URL
        #: Rule settings of the health findings and the threshold lines (default: ./moescope.toml if present).
        self.config: HealthConfig = as_config(config if config is not None else default_config_path())
        # Locked for our own queries too: the dashboard never needs to write, and this makes it impossible.
        # Its own queries are trusted: DuckDB's usual memory and every core; the console's caps are for visitors.
        self.trace = moescope.open(trace_root, locked=True, memory_limit="80%", threads=os.cpu_count() or 1)
        self._console: Any = None
        # The console's own database, with its own caps: a visitor's query can neither block nor starve the charts.
        self._console_args: dict[str, Any] = {"max_rows": int(sql_max_rows), "timeout": float(sql_timeout),
                                              "memory_limit": SQL_MEMORY_LIMIT, "threads": 2,
                                              "max_bytes": SQL_MAX_BYTES}
        # One DuckDB connection must not run two queries at once; the lock orders them (cheap: results are cached).
        self._lock = threading.RLock()
        self._console_lock = threading.Lock()
        self.cache = _LRU(cache_size)
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------------------

    def cached(self, key: Hashable, compute: Callable[[], T], runs: Any = None) -> T:
        """compute() once per key (under the connection lock), then from the LRU: for pages added later.

        `runs`: the only runs compute() reads (None: any), so a refresh that grew other runs keeps the result.
        """
        return self._cached(key, compute, runs)

    def _cached(self, key: Hashable, compute: Callable[[], T], runs: Any = None) -> T:
        def locked() -> T:
            with self._lock:
                return compute()

        # Keyed by the data version of what it reads (every run's, or those of `runs`): after a refresh that
        # found new data, nothing stale is served, and a run that did not change keeps its results.
        return self.cache.get((self.version(runs), key), locked)

    def version(self, runs: Any = None) -> Hashable:
        """The data version of `runs` (names; None: the whole trace): part of every cache key."""
        if runs is None:
            return self.trace.data_version
        return version_of(self.trace, [runs] if isinstance(runs, str) else runs)

    def refresh(self) -> bool:
        """Follow a trace being written: pick up new parts (Trace.refresh); True when the data version moved."""
        with self._lock:  # no dashboard query runs while the views are swapped
            changed = self.trace.refresh()
        if changed:
            with self._console_lock:
                console = self._console
            if console is not None:
                console.refresh()
        return changed

    def live_text(self) -> str:
        """The header's live state: 'recording · step 1,234 · updated 3 s ago', 'finished · …' or 'stopped by …'."""
        with self._lock:
            return self.trace.live_state().describe()

    def _df(self, query: str, params: list[Any] | None = None) -> pd.DataFrame:
        with self._lock:
            return self.trace.con.execute(query, params or []).df()

    def warm(self) -> float:
        """Compute what the first page views need (runs, health, each run's default views); returns seconds.

        create_app runs this on a background thread, so the first person to open a page on a big trace
        does not wait for the queries; a failure here only means that view computes on first open instead.
        """
        t0 = time.perf_counter()
        steps: list[Callable[[], Any]] = [self.runs, self.layer_info, self.step_ranges, self.health_grid, self.findings]
        # The per-run views of the first runs only (the pages open on the first run): on a root of 1,000 runs
        # warming every run would hold the connection for minutes while pages wait.
        for run in self.run_names()[:WARM_RUNS]:
            steps += [
                lambda r=run: self.utilization(r), lambda r=run: self.load_metrics(r),
                lambda r=run: self.layer_utilization(r), lambda r=run: self.similarity(r),
                lambda r=run: self.snapshot_steps(r), lambda r=run: self.sequences(r),
            ]
        steps.append(lambda: self.drift(*self.default_drift()))
        for step in steps:
            if self._closed:
                break
            try:
                step()
            except Exception:  # noqa: BLE001 - see the docstring: the page reports it when opened
                continue
        return time.perf_counter() - t0

    def stop_warming(self) -> None:
        """Stop `warm` between queries and interrupt the one running (DuckDB aborts the process when a daemon
        thread is killed inside a query at interpreter exit)."""
        self._closed = True
        try:
            self.trace.con.interrupt()
        except Exception:  # noqa: BLE001 - a closed connection has nothing to interrupt
            pass

    def close(self) -> None:
        """Close both connections."""
        self._closed = True
        self.trace.close()
        if self._console is not None:
            self._console.close()

    # -- runs, layers, steps -------------------------------------------------------------------------

    def runs(self) -> pd.DataFrame:
        """One row per run: model, layers, experts, top-k, step range, tokens, tags, routing rows, snapshots."""

        def compute() -> pd.DataFrame:
            base = self._df(
                "SELECT run, any_value(model_class) AS model, any_value(created) AS created, "
                "any_value(token_fraction) AS token_fraction, any_value(dropped_records) AS dropped_records "
                "FROM runs GROUP BY run"
            )
            layers = self._df(
                "SELECT run, COUNT(*) AS layers, MAX(n_experts) AS experts, MAX(top_k) AS top_k "
                "FROM layer_info GROUP BY run"
            )
            steps = self._df(
                "SELECT run, MIN(step) AS first_step, MAX(step) AS last_step, COUNT(DISTINCT step) AS steps "
                "FROM expert_load GROUP BY run"
            )
            tokens = self._df(
                "SELECT run, SUM(tokens) AS tokens FROM ("
                "  SELECT run, layer, SUM(tokens) AS tokens FROM router_stats GROUP BY run, layer"
                ") GROUP BY run"
            )
            # Mean over layers of tokens routed, i.e. tokens the model saw (each layer routes every token).
            tokens = tokens.merge(layers[["run", "layers"]], on="run", how="left")
            tokens["tokens"] = (tokens["tokens"] / tokens["layers"].where(tokens["layers"] > 0, 1)).round()
            routed = self._df("SELECT run, COUNT(*) AS routing_rows FROM routing GROUP BY run")
            snaps = self._df(
                "SELECT run, COUNT(DISTINCT step) AS snapshots FROM ("
                "  SELECT run, step FROM expert_similarity UNION ALL SELECT run, step FROM expert_spectra"
                ") GROUP BY run"
            )
            tag_rows = self._df("SELECT DISTINCT run, tag FROM expert_load ORDER BY run, tag")
            labels = {}
            for run, g in tag_rows.groupby("run"):
                named = [str(t) for t in g["tag"] if t]
                text = ", ".join(named) or "—"  # rows recorded outside any rec.tag(...) have tag ''
                labels[run] = text + (" (+ untagged)" if named and (g["tag"] == "").any() else "")
            steps["tags"] = steps["run"].map(labels)
            out = base
            for other in (layers, steps, tokens[["run", "tokens"]], routed, snaps):
                out = out.merge(other, on="run", how="left")
            order = {r: i for i, r in enumerate(self.trace.runs)}
            out = out.sort_values("run", key=lambda s: s.map(order)).reset_index(drop=True)
            for col in ("routing_rows", "snapshots"):
                out[col] = out[col].fillna(0).astype("int64")
            return out

        return self._cached(("runs",), compute)

    def run_names(self) -> list[str]:
        """Run names in discovery order."""
        return list(self.trace.runs)

    def layer_info(self) -> pd.DataFrame:
        """run, layer, n_experts, top_k, router_kind, module for every run × layer."""
        return self._cached(
            ("layer_info",),
            lambda: self._df(
                "SELECT run, CAST(layer AS INTEGER) AS layer, n_experts, top_k, router_kind, module "
                "FROM layer_info ORDER BY run, layer"
            ),
        )

    def layers(self, run: str | None) -> list[int]:
        """Layer numbers of `run`."""
        li = self.layer_info()
        return [int(x) for x in li.loc[li["run"] == run, "layer"]]

    def n_experts(self, run: str | None, layer: int | None = None) -> int:
        """Experts in `layer` of `run` (the largest layer when layer is None)."""
        li = self.layer_info()
        rows = li[(li["run"] == run) & ((li["layer"] == layer) if layer is not None else True)]
        return int(rows["n_experts"].max()) if len(rows) and pd.notna(rows["n_experts"].max()) else 0

    def step_ranges(self) -> dict[str, tuple[int, int]]:
        """Run → (first step, last step) seen in expert_load or router_stats."""

        def compute() -> dict[str, tuple[int, int]]:
            df = self._df(
                "SELECT run, MIN(lo) AS lo, MAX(hi) AS hi FROM ("
                "  SELECT run, MIN(step) AS lo, MAX(step) AS hi FROM expert_load GROUP BY run"
                "  UNION ALL SELECT run, MIN(step), MAX(step) FROM router_stats GROUP BY run"
                ") GROUP BY run"
            )
            return {str(r.run): (int(r.lo), int(r.hi)) for r in df.itertuples()}

        return self._cached(("step_ranges",), compute)

    def tags(self, run: str | None = None) -> list[str]:
        """Data-slice tags seen (in `run`, or anywhere)."""

        def compute() -> list[str]:
            if run is None:
                df = self._df("SELECT DISTINCT tag FROM expert_load ORDER BY tag")
                return [str(t) for t in df["tag"] if t is not None]
            return self.tags_by_run().get(run, [])

        return self._cached(("tags", run), compute)

    def tags_by_run(self) -> dict[str, list[str]]:
        """Run -> its tags (one query for every run: a query per run scans every file of the root each time)."""

        def compute() -> dict[str, list[str]]:
            df = self._df("SELECT DISTINCT run, tag FROM expert_load WHERE tag IS NOT NULL ORDER BY run, tag")
            out: dict[str, list[str]] = {r: [] for r in self.run_names()}
            for r, t in zip(df["run"], df["tag"], strict=True):
                out.setdefault(str(r), []).append(str(t))
            return out

        return self._cached(("tags_by_run",), compute)

    def baseline_tags(self, run: str) -> list[str]:
        """The run's named tags, the one whose expert load is closest to the run's untagged (training) rows first.

        A drift comparison reads "from the data the router was trained on to the new data" (English → code in
        the demo): the tag that routes most like training is the natural baseline. Without untagged rows the
        tags keep their sorted order.
        """

        def compute() -> list[str]:
            named = [t for t in self.tags(run) if t]
            if "" not in self.tags(run) or len(named) < 2:
                return named
            df = self._df(
                "WITH s AS (SELECT tag, layer, expert, SUM(CAST(tokens AS DOUBLE)) AS t FROM expert_load "
                "  WHERE run = ? GROUP BY tag, layer, expert), "
                "n AS (SELECT tag, layer, expert, t / NULLIF(SUM(t) OVER (PARTITION BY tag, layer), 0) AS share "
                "  FROM s) "
                "SELECT a.tag, SUM(ABS(a.share - COALESCE(b.share, 0))) AS distance FROM n a "
                "LEFT JOIN n b ON b.tag = '' AND b.layer = a.layer AND b.expert = a.expert "
                "WHERE a.tag <> '' GROUP BY a.tag ORDER BY distance, a.tag",
                [run],
            )
            return [str(t) for t in df["tag"]]

        return self._cached(("baseline_tags", run), compute, runs=run)

    def default_drift(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Drift page's first comparison: default_drift_sides with each run's tags baseline-first."""
        runs = self.run_names()
        tags = self.tags_by_run()
        # Only the run default_drift_sides picks (the first with two named tags) needs its baseline order.
        first = next((r for r in runs if sum(1 for t in tags.get(r, []) if t) >= 2), None)
        if first is not None:
            tags = {**tags, first: self.baseline_tags(first)}
        return default_drift_sides(runs, tags, self.step_ranges())

    def context(self) -> tuple[list[str], dict[str, list[int]], dict[str, tuple[int, int]]]:
        """(runs, layers per run, step range per run): what `state.resolve` checks a selection against."""
        runs = self.run_names()
        li = self.layer_info()
        by_run = {str(r): [int(x) for x in g] for r, g in li.groupby("run", sort=False)["layer"]}
        return runs, {r: by_run.get(r, []) for r in runs}, self.step_ranges()

    # -- health --------------------------------------------------------------------------------------

    def health(self, run: str | None = None) -> pd.DataFrame:
        """Findings of the health rules (every run; filtered to `run` when given), each run's kept by its version."""
        df = self._cached(("health",), self._health_by_run, runs=self.run_names())
        if run is not None:
            df = df[df["run"] == run].reset_index(drop=True)
        return df

    def _health_by_run(self) -> pd.DataFrame:
        """Every run's findings: those of runs changed since they were computed in one pass, the others kept.

        The rules judge each run on its own rows (its windows, its manifest), so a flush appended to one run
        leaves every other run's findings as they were: a refresh while recording pays for the growing run only.
        """
        runs = self.run_names()
        kept: dict[str, tuple[Hashable, pd.DataFrame]] = self.__dict__.setdefault("_health_runs", {})
        versions = {r: self.version(r) for r in runs}  # read before computing: a later refresh is seen next time
        stale = [r for r in runs if r not in kept or kept[r][0] != versions[r]]
        if stale:
            df = self.trace.health(run=stale, config=self.config).reset_index(drop=True)
            if df["run"].isna().any():  # a rule failed over several runs' window at once: not split per run
                kept.clear()
                return self.trace.health(config=self.config).reset_index(drop=True)
            got = {str(r): g.reset_index(drop=True) for r, g in df.groupby("run", sort=False)}
            for r in stale:
                kept[r] = (versions[r], got.get(r, df.iloc[:0]))
        for r in set(kept) - set(runs):  # a run that went away
            del kept[r]
        if not runs:
            return self.trace.health(config=self.config).reset_index(drop=True)
        # Findings are ordered by run first (health._frame): each run's block in sorted run order is that order.
        return pd.concat([kept[r][1] for r in sorted(runs)], ignore_index=True)

    def health_grid(self) -> pd.DataFrame:
        """Worst status per run × layer, with counts of WARN and FAIL findings: run, layer, status, warn, fail."""

        def compute() -> pd.DataFrame:
            df = self.health()
            df = df[df["layer"].notna()]
            if df.empty:
                return pd.DataFrame(columns=["run", "layer", "status", "warn", "fail", "findings"])
            g = df.groupby(["run", "layer"], sort=False)
            out = g["status"].agg(worst_status).rename("status").reset_index()
            out["warn"] = g["status"].agg(lambda s: int((s == "WARN").sum())).to_numpy()
            out["fail"] = g["status"].agg(lambda s: int(s.isin(["FAIL", "ERROR"]).sum())).to_numpy()
            out["findings"] = g["status"].size().to_numpy()
            out["layer"] = out["layer"].astype(int)
            return out

        return self._cached(("health_grid",), compute, runs=self.run_names())

    def alerts(self, run: str | None = None) -> pd.DataFrame:
        """Online alerts the recorder kept in the trace, newest first: run, step, step_start, layer, rule, status,
        value, threshold, experts, message."""
        from moescope.analysis.live import alerts_frame

        return self._cached(("alerts", run), lambda: alerts_frame(self.trace, run), runs=run)

    def findings(self, run: str | None = None, include_pass: bool = False) -> pd.DataFrame:
        """Findings worst first (without PASS unless asked), for the findings tables."""
        df = self.health(run)
        if not include_pass:
            df = df[df["status"] != "PASS"]
        rank = {s: i for i, s in enumerate(STATUS_ORDER)}
        df = df.assign(_r=df["status"].map(rank).fillna(-1))
        return df.sort_values(["_r", "run", "layer", "window_start"], ascending=[False, True, True, True]).drop(
            columns="_r"
        ).reset_index(drop=True)

    # -- utilization ---------------------------------------------------------------------------------

    def _window(self, run: str, steps: tuple[int, int] | None) -> tuple[tuple[int, int] | None, int]:
        lo, hi = steps or self.step_ranges().get(run, (0, 0))
        return steps, bucket_width(lo, hi)

    def utilization(self, run: str, steps: tuple[int, int] | None = None) -> pd.DataFrame:
        """Per layer × step window × expert (all layers of `run`): utilization N·f_e, load_share, assignments."""
        steps, width = self._window(run, steps)
        return self._cached(
            ("utilization", run, steps, width),
            lambda: self.trace.utilization(run=run, window=width, steps=steps).sort_values(
                ["layer", "window_start", "expert"]
            ).reset_index(drop=True),
            runs=run,
        )

    def load_metrics(self, run: str, steps: tuple[int, int] | None = None) -> pd.DataFrame:
        """Per layer × step window of `run`: aux_loss, z_loss, cv, maxvio, min_utilization, top_m_share, ..."""
        steps, width = self._window(run, steps)
        return self._cached(
            ("load_metrics", run, steps, width),
            lambda: self.trace.load_metrics(run=run, window=width, steps=steps).sort_values(
                ["layer", "window_start"]
            ).reset_index(drop=True),
            runs=run,
        )

    def layer_utilization(self, run: str, steps: tuple[int, int] | None = None) -> pd.DataFrame:
        """Per layer × expert over the whole selected window: utilization, load_share, assignments."""
        return self._cached(
            ("layer_utilization", run, steps),
            lambda: self.trace.utilization(run=run, window="all", steps=steps).sort_values(
                ["layer", "expert"]
            ).reset_index(drop=True),
            runs=run,
        )

    # -- similarity ----------------------------------------------------------------------------------

    def similarity(self, run: str) -> pd.DataFrame:
        """Expert × expert similarity rows of `run`: step, layer, expert_a, expert_b, metric, value."""
        return self._cached(("similarity", run), lambda: self.trace.similarity(run=run), runs=run)

    def snapshot_steps(self, run: str) -> list[int]:
        """Steps (checkpoints) with similarity or spectra snapshots in `run`."""

        def compute() -> list[int]:
            df = self._df(
                "SELECT DISTINCT step FROM (SELECT step FROM expert_similarity WHERE run = ? "
                "UNION ALL SELECT step FROM expert_spectra WHERE run = ?) ORDER BY step",
                [run, run],
            )
            return [int(s) for s in df["step"]]

        return self._cached(("snapshot_steps", run), compute, runs=run)

    def spectra(self, run: str, layer: int, step: int) -> pd.DataFrame:
        """Singular values of every expert's matrices at one snapshot: expert, matrix, idx, sigma."""
        return self._cached(
            ("spectra", run, layer, step),
            lambda: self._df(
                "SELECT expert, matrix, idx, sigma FROM expert_spectra "
                "WHERE run = ? AND layer = ? AND step = ? ORDER BY matrix, expert, idx",
                [run, layer, step],
            ),
            runs=run,
        )

    # -- drift ---------------------------------------------------------------------------------------

    def drift(self, baseline: Mapping[str, Any], current: Mapping[str, Any]) -> pd.DataFrame:
        """Per layer drift of current vs baseline load (the trace's own drift rule): js, tv, threshold, flagged."""
        return self._cached(
            ("drift", sel_key(baseline), sel_key(current)),
            lambda: self.trace.drift(baseline=_clean(baseline), current=_clean(current)),
            runs=_runs_of(baseline, current),
        )

    def expert_shares(self, sel: Mapping[str, Any]) -> pd.DataFrame:
        """Per layer × expert load share of a selection ({'run', 'tag', 'steps'}), pooled over its steps."""

        def compute() -> pd.DataFrame:
            s = Selection.of(_clean(sel))
            df = self._df(
                "SELECT run, CAST(layer AS INTEGER) AS layer, CAST(expert AS INTEGER) AS expert, "
                f"SUM(CAST(tokens AS DOUBLE)) AS assignments FROM expert_load WHERE {s.filter().sql} "
                "GROUP BY ALL"
            )
            df = df.groupby(["layer", "expert"], as_index=False)["assignments"].sum()
            total = df.groupby("layer")["assignments"].transform("sum")
            df["share"] = df["assignments"] / total.where(total > 0)
            return df.sort_values(["layer", "expert"]).reset_index(drop=True)

        return self._cached(("expert_shares", sel_key(sel)), compute, runs=_runs_of(sel))

    # -- tokens --------------------------------------------------------------------------------------

    def sequences(self, run: str) -> pd.DataFrame:
        """Token-level sequences kept in `run`: rank, step, tag, seq, tokens (one scan of `routing` per run, cached).

        A sequence is (rank, step, tag, seq): every rank numbers its own batch from 0.
        """
        return self._cached(
            ("sequences", run),
            lambda: self._df(
                "SELECT CAST(rank AS INTEGER) AS rank, step, tag, seq, COUNT(*) AS tokens FROM routing "
                "WHERE run = ? AND layer = (SELECT MIN(layer) FROM routing WHERE run = ?) "
                "GROUP BY rank, step, tag, seq ORDER BY step, rank, tag, seq",
                [run, run],
            ),
            runs=run,
        )

    def token_routing(
        self, run: str, step: int, seq: int, tag: str | None = None, rank: int | None = None
    ) -> pd.DataFrame:
        """Every layer's routing of one sequence: layer, pos, token_id, text, experts, weights, expert0."""

        def compute() -> pd.DataFrame:
            q = (
                "SELECT CAST(layer AS INTEGER) AS layer, pos, token_id, experts, weights FROM routing "
                "WHERE run = ? AND step = ? AND seq = ?"
            )
            params: list[Any] = [run, int(step), int(seq)]
            if tag is not None:
                q += " AND tag = ?"
                params.append(tag)
            if rank is not None:
                q += " AND rank = ?"
                params.append(int(rank))
            df = self._df(q + " ORDER BY layer, pos", params)
            # a NULL slot reached no expert (dropped): shown as -1, its weight NaN
            df["experts"] = df["experts"].map(lambda v: [-1 if _null(x) else int(x) for x in v] if v is not None else [])
            df["weights"] = df["weights"].map(
                lambda v: [math.nan if _null(x) else float(x) for x in v] if v is not None else [])
            df["expert0"] = df["experts"].map(lambda v: next((e for e in v if e >= 0), -1))  # first expert reached
            dec = self.decoder(run)
            df["text"] = df["token_id"].map(lambda t: token_text(t, dec))
            return df

        return self._cached(("token_routing", run, int(step), int(seq), tag, rank), compute, runs=run)

    def decoder(self, run: str) -> Decoder:
        """How `run`'s token ids show: its manifest's tokenizer (bytes, an HF tokenizer found locally), else ids."""
        try:
            source = (self.trace.manifest(run).get("model") or {}).get("tokenizer")
        except KeyError:  # not a run of this trace: nothing says how its ids decode
            source = None
        return decoder_for(source)

    def expert_tokens(self, run: str, steps: tuple[int, int] | None = None, top: int = 8,
                      min_count: int = 5) -> pd.DataFrame:
        """Per layer × expert of `run`: the tokens it takes most, decoded, share vs chance, tag shares and the
        sentence (Trace.vocab_specialization(per_expert=True) over the selected steps, one window)."""
        return self._cached(
            ("expert_tokens", run, steps, int(top), int(min_count)),
            lambda: self.trace.vocab_specialization(run=run, window="all", steps=steps, per_expert=True, top=top,
                                                    min_count=min_count),
            runs=run,
        )

    # -- precision sensitivity and flight dumps (the Utilization and Flight pages) ----------------------

    def precision(self, run: str, steps: tuple[int, int] | None = None) -> pd.DataFrame:
        """Per layer of `run`: sampled, flipped, flip_rate of the float32 re-route (empty: not recorded)."""
        from moescope.analysis.metrics import precision

        sel = Selection.of(_clean({"run": run, "steps": steps}))
        return self._cached(("precision", run, steps), lambda: precision(self.trace.cursor(), sel), runs=run)

    def flight_dumps(self) -> pd.DataFrame:
        """Every flight dump under the trace's runs, oldest first: run, name, step, rank, reason, alerts, layers,
        error (a dump whose meta.json cannot be read is listed with why). Not cached: dumps appear at any time."""
        from moescope.analysis.explain import find_dumps

        rows = []
        for run, run_dir in self.trace.run_dirs.items():
            if not isinstance(run_dir, Path):  # an object-store run: dumps are read from local folders only
                continue
            for path in find_dumps([run_dir]):
                row: dict[str, Any] = {"run": run, "name": path.name, "step": None, "rank": None, "reason": "",
                                       "alerts": "", "layers": "", "error": "", "path": str(path)}
                try:
                    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
                    alerts = meta.get("alerts") or []
                    row.update(step=int(meta["step"]), rank=int(meta.get("rank", 0)), reason=str(meta["reason"]),
                               alerts="; ".join(f"{a.get('status')} {a.get('rule')}: {a.get('message')}"
                                                for a in alerts),
                               layers=", ".join(str(ly["layer"]) for ly in meta["layers"]))
                except (OSError, ValueError, KeyError, TypeError) as e:
                    row["error"] = f"{path / 'meta.json'}: not a readable flight dump ({type(e).__name__})"
                rows.append(row)
        cols = ["run", "name", "step", "rank", "reason", "alerts", "layers", "error", "path"]
        return pd.DataFrame(rows, columns=cols)

    def flight_findings(self, run: str, name: str) -> tuple[str, pd.DataFrame]:
        """One dump's heading and its `moescope explain` findings, problems first: severity, kind, text, numbers.

        A dump that is not in the trace is a KeyError; a damaged one a TraceError naming the file."""
        from moescope.analysis.explain import explain, find_dumps, read_dump

        run_dir = self.trace.run_dirs.get(run)
        paths = [p for p in find_dumps([run_dir]) if p.name == name] if isinstance(run_dir, Path) else []
        if not paths:
            raise KeyError(f"no flight dump {name!r} in run {run!r}")
        path = paths[0]
        stamp = (path / "evidence.safetensors").stat().st_mtime_ns if (path / "evidence.safetensors").exists() else 0

        def compute() -> tuple[str, pd.DataFrame]:
            d = read_dump(path)
            findings = sorted(explain(d), key=lambda f: f.severity != "problem")  # problems of every layer first
            alerts = d.meta.get("alerts") or []
            head = f"{name}: written at step {d.step} ({d.meta.get('reason', '?')}" + (
                f": {alerts[0].get('message')}" if alerts else "") + ")"
            df = pd.DataFrame([{"severity": f.severity, "kind": f.kind, "text": f.text,
                                "numbers": ", ".join(f"{k}={_short(v)}" for k, v in f.numbers.items())}
                               for f in findings], columns=["severity", "kind", "text", "numbers"])
            return head, df

        return self.cache.get(("flight_findings", str(path), stamp), compute)

    # -- systems what-ifs (the Systems page) ---------------------------------------------------------

    def whatif_capacity(self, run: str, steps: tuple[int, int] | None = None) -> pd.DataFrame:
        """Drop rates at WHATIF_FACTORS for every layer of `run` over the step window."""
        return self._cached(
            ("whatif-capacity", run, steps),
            lambda: whatif.capacity_drops(self.trace, run=run, factors=WHATIF_FACTORS, steps=steps),
            runs=run,
        )

    def whatif_placement(self, run: str, devices: int) -> pd.DataFrame:
        """Held-out balancedness per layer: round-robin, greedy LPT, LPT with one spare replica per device."""

        def compute() -> pd.DataFrame:
            plain = whatif.suggest_placement(self.trace, devices=devices, run=run).report
            rep = whatif.suggest_placement(self.trace, devices=devices, run=run, replicas=devices).report
            if plain.empty:
                return pd.DataFrame()
            out = plain[["layer", "eval_start", "eval_end", "balancedness_before", "balancedness_after"]].rename(
                columns={"balancedness_before": "round-robin", "balancedness_after": "LPT"}
            )
            out[f"LPT + {devices} replicas"] = rep["balancedness_after"].to_numpy()
            return out

        return self._cached(("whatif-placement", run, devices), compute, runs=run)

    def whatif_cache(self, run: str, layer: int, steps: tuple[int, int] | None = None) -> pd.DataFrame:
        """Hit rates of one layer for cache sizes 1..N (empty when the run has no token-level routing)."""

        def compute() -> pd.DataFrame:
            try:
                return whatif.cache_hit_rates(self.trace, run=run, layer=layer, steps=steps)
            except ValueError:  # count-only run: the figure says so
                return pd.DataFrame(columns=whatif.CACHE_COLUMNS)

        return self._cached(("whatif-cache", run, layer, steps), compute, runs=run)

    # -- SQL console ---------------------------------------------------------------------------------

    @property
    def sql_limits(self) -> tuple[int, float]:
        """(row limit, time limit in seconds) of the SQL console."""
        return int(self._console_args["max_rows"]), float(self._console_args["timeout"])

    @property
    def console(self) -> Any:
        """The locked trace the SQL console queries (opened on first use)."""
        with self._console_lock:
            if self._console is None:
                self._console = moescope.open(self.root, locked=True, **self._console_args)
            return self._console

    def views(self) -> dict[str, list[tuple[str, str]]]:
        """Each view's (column, type) pairs, for the console's schema panel."""
        return self._cached(("views",), lambda: self.trace.views())

    def run_sql(self, query: str) -> SqlResult:
        """Run a user's query in locked mode; refusals, time-outs and errors come back as one message line."""
        from moescope.analysis.trace import QueryError

        query = (query or "").strip()
        if not query:
            return SqlResult(message="Type a SELECT over the views and press Run.", ok=False)
        t0 = time.perf_counter()
        console = self.console
        try:
            df = console.query(query)
        except QueryError as e:
            return SqlResult(message=str(e), ok=False, seconds=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - any failure of a user's query is a message, never a crash
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            return SqlResult(message=f"error: {first}", ok=False, seconds=time.perf_counter() - t0)
        dt = time.perf_counter() - t0
        truncated = bool(df.attrs.get("truncated", False))
        n = len(df)
        msg = f"{n} row{'s' if n != 1 else ''} in {dt:.2f} s"
        if truncated and df.attrs.get("truncated_by") == "bytes":
            msg += f" (cut at {n} rows: over the {SQL_MAX_BYTES >> 20} MB response limit)"
        elif truncated:
            msg += f" (cut at {n} rows)"
        return SqlResult(frame=df, message=msg, ok=True, truncated=truncated, seconds=dt)


def _short(v: Any) -> str:
    """A finding's number for a table cell: 4 significant digits, lists cut at 8 items."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v[:8]) + (", …" if len(v) > 8 else "") + "]"
    return str(v)


def _runs_of(*sels: Mapping[str, Any] | None) -> list[str] | None:
    """The runs some selections read, for a cache key; None when one of them reads every run (or another root)."""
    runs = []
    for sel in sels:
        run = (sel or {}).get("run")
        if not isinstance(run, str) or (sel or {}).get("root") is not None:
            return None
        runs.append(run)
    return runs


def _clean(sel: Mapping[str, Any] | None) -> dict[str, Any]:
    """A selection dict without unset entries (None, empty steps; '' stays for tag: the untagged rows)."""
    out: dict[str, Any] = {}
    for k, v in (sel or {}).items():
        if v is None or (k == "steps" and not v) or (v == "" and k != "tag"):
            continue
        out[k] = tuple(v) if k == "steps" else v
    return out


def current() -> DashboardData:
    """The DashboardData of the app serving this request (pages call this; one app per trace)."""
    import dash

    app = dash.get_app()
    data = getattr(app, "moescope_data", None)
    if data is None:
        raise RuntimeError("this Dash app was not built by moescope.dashboard.app.create_app")
    return data  # type: ignore[no-any-return]


#: The tag choice meaning "every tag" in the dashboard's controls.
ALL_TAGS = "*"
#: The tag choice meaning the empty tag (rows recorded outside any rec.tag(...)): URLs drop empty values.
UNTAGGED = "~"


#: Runs whose per-run views `DashboardData.warm` computes ahead of the first request.
WARM_RUNS = 4


def default_drift_sides(
    runs: list[str], tags: Mapping[str, list[str]], step_ranges: Mapping[str, tuple[int, int]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sensible first comparison: the first two tags of the first run that has two (English → code: list the
    baseline tag first, see DashboardData.baseline_tags), else the first two runs, else the early and late halves
    of the only run. `tags`: run -> its tags."""
    if not runs:
        return {}, {}
    for run in runs:
        named = [t for t in tags.get(run, []) if t]
        if len(named) >= 2:
            return {"run": run, "tag": named[0]}, {"run": run, "tag": named[1]}
    if len(runs) >= 2:
        return {"run": runs[0]}, {"run": runs[1]}
    first = runs[0]
    lo, hi = step_ranges.get(first, (0, 0))
    mid = lo + (hi - lo) // 2
    return {"run": first, "steps": (lo, mid)}, {"run": first, "steps": (min(mid + 1, hi), hi)}


def drift_side(query: Mapping[str, Any], prefix: str, default: Mapping[str, Any], runs: list[str],
               step_ranges: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """One side of the drift comparison from the URL keys `{prefix}run`, `{prefix}tag`, `{prefix}steps`."""
    from .state import parse_steps

    run = query.get(f"{prefix}run") or default.get("run")
    run = run if run in runs else (runs[0] if runs else None)
    tag = query.get(f"{prefix}tag") or (default["tag"] if default.get("tag") is not None else ALL_TAGS)
    tag = "" if tag == UNTAGGED else tag
    steps = parse_steps(query.get(f"{prefix}steps")) or default.get("steps")
    if steps is not None and run in step_ranges:
        lo, hi = step_ranges[run]
        steps = (max(steps[0], lo), min(steps[1], hi))
        if steps[0] > steps[1] or steps == (lo, hi):
            steps = None
    out: dict[str, Any] = {"run": run}
    if tag != ALL_TAGS:
        out["tag"] = tag
    if steps is not None:
        out["steps"] = steps
    return out


def describe_side(side: Mapping[str, Any]) -> str:
    """'collapse · tag code · steps 0–99' for a drift selection."""
    parts = [str(side.get("run", "?"))]
    tag = side.get("tag")
    parts.append("all tags" if tag is None else (f"tag {tag}" if tag else "untagged"))
    if side.get("steps"):
        a, b = side["steps"]
        parts.append(f"steps {a}–{b}")
    return " · ".join(parts)

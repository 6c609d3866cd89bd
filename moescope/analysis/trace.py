"""`Trace`: every run and rank below one or more trace roots as DuckDB views, plus the metric methods.

    tr = moescope.open("traces")
    tr.sql("SELECT layer, expert, sum(tokens) FROM expert_load GROUP BY ALL").df()
    tr.health(run="run-a")

Views: expert_load, router_stats, routing, assignments (routing unnested), expert_similarity,
expert_spectra, runs (one row per manifest file), layer_info (N and k per run × layer).
A table no run wrote is an empty view with the format's column types, so queries never depend on
what a run happened to capture.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import duckdb
import pandas as pd

from ..format.compact import visible_parts
from ..format.manifest import Manifest, TraceError
from ..format.reader import check_part, check_parts, check_run_values
from ..format.schema import TABLES, duckdb_columns
from ..format.storage import RemotePath, as_path, local_root, open_input, prune_copies
from . import console as _console
from . import live as _live
from . import metrics as M
from .console import QueryError  # noqa: F401 - re-exported: moescope.analysis.trace.QueryError is public
from .engine import ensure_layer_info, integer_counts, translate
from .selection import Selection, Window
from .sqlkit import literal, render

if TYPE_CHECKING:  # pragma: no cover
    from ..config import HealthConfig

PathLike = Union[str, "os.PathLike[str]"]
#: Views a Trace always defines (besides `layer_info`).
VIEWS = ("expert_load", "router_stats", "routing", "assignments", "expert_similarity", "expert_spectra", "alerts",
         "router_precision", "runs")


def open_trace(root: PathLike | Sequence[PathLike], engine: str = "duckdb", **kwargs: Any) -> Trace:
    """Open a trace on `engine`: "duckdb" (a `Trace`) or "spark" (a `SparkTrace`, the same analyses on PySpark)."""
    from .dialects import check_engine

    if check_engine(engine) == "spark":
        from .spark import SparkTrace

        return SparkTrace(root, **kwargs)
    return Trace(root, **kwargs)


@dataclass
class RunInfo:
    """One run directory found below a trace root."""

    run: str
    path: Path
    manifests: dict[int, dict[str, Any]]  # JSON form of `typed`, for callers that read keys
    files: dict[str, list[Path]] = field(default_factory=dict)
    typed: dict[int, Manifest] = field(default_factory=dict)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _rank_of(manifest: Path) -> int:
    if manifest.name == "manifest.json":
        return 0
    try:
        return int(manifest.name[len("manifest.rank-") : -len(".json")])
    except ValueError:
        return -1


def _load_manifest_file(p: Path) -> dict[str, Any]:
    """One manifest file, validated by the format's reader, as its JSON dict."""
    return Manifest.read(p).to_dict()


def discover(roots: Sequence[PathLike]) -> list[RunInfo]:
    """Find every run (a directory holding manifest.json or manifest.rank-R.json) below `roots`, validated."""
    runs: dict[str, RunInfo] = {}
    for root in roots:
        base = as_path(root).expanduser()
        if not base.exists():
            raise TraceError(f"{root}: no such trace root")
        if not base.is_dir():
            raise TraceError(f"{root}: a trace root must be a directory")
        base = base.resolve()
        manifests = sorted(set(base.rglob("manifest.json")) | set(base.rglob("manifest.rank-*.json")))
        if not manifests:
            raise TraceError(f"{root}: no moescope runs found (no manifest.json below it)")
        by_dir: dict[Path, list[Path]] = {}
        for m in manifests:  # grouped once: a scan per run directory grows with runs² on a root of 1,000 runs
            by_dir.setdefault(m.parent, []).append(m)
        for run_dir in sorted(by_dir):
            typed = {_rank_of(p): Manifest.read(p) for p in by_dir[run_dir]}
            primary = typed.get(0) or typed[min(typed)]
            name = primary.run or run_dir.name
            if name in runs and runs[name].path != run_dir:
                raise TraceError(
                    f"run name {name!r} appears twice ({runs[name].path} and {run_dir}); open the roots separately"
                )
            info = RunInfo(name, run_dir, {r: m.to_dict() for r, m in typed.items()}, typed=typed)
            # complete parts, less those a committed compaction replaced (moescope.format.compact)
            info.files.update({t: sorted(ps) for t, ps in visible_parts(run_dir).items()})
            runs[name] = info
    return list(runs.values())


def _check_file(path: Path) -> list[str]:
    """A part's column names; a truncated, foreign, newer or damaged file (page checksums) raises TraceError."""
    return check_part(path)


def _table_view_sql(table: str, files: list[Any], present: set[str], source: str | None = None) -> str:
    cols = duckdb_columns(table)
    if not files:
        sel = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in cols)
        return f"SELECT {sel} WHERE 1 = 0"
    # Columns absent from every file (an older writer) become typed NULLs; union_by_name handles the rest.
    sel = ", ".join(c if c in present else f"CAST(NULL AS {t}) AS {c}" for c, t in cols)
    if source is not None:
        return f"SELECT {sel} FROM {source}"
    # object-store parts are scanned from their local copies (format/storage.py: DuckDB's httpfs is not needed)
    paths = ", ".join(literal(str(open_input(p))) for p in files)
    return f"SELECT {sel} FROM read_parquet([{paths}], union_by_name = true)"


def _with_parts(con: duckdb.DuckDBPyConnection, table: str, files: list[Any], present: set[str],
                stmt: str) -> None:
    """Run `stmt` ("... {select}") over the rows of `files` (object-store parts scanned from their local copies)."""
    con.execute(stmt.format(select=_table_view_sql(table, files, present)))


#: Below this many bytes of Parquet, `materialize="auto"` loads every table into DuckDB memory at open: a root
#: of many small runs otherwise pays a scan of every part file on every query. Kept low because DuckDB holds a
#: loaded trace at many times its Parquet size (a 243 MiB, 100M-assignment trace: 5.7 GB RSS, 6 s to open).
MATERIALIZE_BYTES = 64 * 1024 * 1024


def _stamp(path: Path) -> tuple[int, int]:
    """Size and mtime of a part: a known part whose stamp moved was rewritten (compaction, set-aside)."""
    try:
        st = path.stat()
    except OSError:  # vanished since the listing: never equal to a loaded stamp, so its table is rebuilt
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _runs_frame(runs: list[RunInfo]) -> pd.DataFrame:
    rows = []
    for info in runs:
        for rank, m in sorted(info.typed.items()):
            capture = m.to_dict()["capture"]
            counters = m.to_dict()["counters"]
            rows.append(
                {
                    "run": info.run,
                    "rank": rank,
                    "path": str(info.path),
                    "created": m.created or None,
                    "updated": m.updated,
                    "closed": m.closed,
                    "world_size": m.world_size,
                    "moescope_version": m.moescope_version,
                    "model_class": m.model.class_name,
                    "n_params": m.model.n_params,
                    "tokenizer": m.model.tokenizer,  # how token ids decode (moescope.analysis.vocab); None: ids
                    "n_layers": len(m.layers),
                    "token_fraction": m.capture.tokens,
                    "flush_interval": m.capture.flush_every,
                    "dropped_records": m.counters.dropped_records,
                    "capture": json.dumps(capture, default=str, sort_keys=True),
                    "counters": json.dumps(counters, default=str, sort_keys=True),
                }
            )
    df = pd.DataFrame(rows)
    for col in ("token_fraction",):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("n_params", "dropped_records", "world_size"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["closed"] = df["closed"].astype("boolean")
    for col in ("flush_interval", "tokenizer"):
        df[col] = df[col].map(lambda v: None if v is None else str(v)).astype("object")
    return df


def _layers_frame(runs: list[RunInfo]) -> pd.DataFrame:
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for info in runs:
        for _, m in sorted(info.typed.items()):
            for entry in m.layers:
                rows.setdefault(
                    (info.run, entry.layer),
                    {"run": info.run, "layer": entry.layer, "n_experts": entry.n_experts, "top_k": entry.top_k,
                     "router_kind": entry.router_kind, "module": entry.module,
                     # False: the layer's spec reads no logits, so its logit statistics are NULL by design
                     "logits": entry.extra.get("logits") is not False,
                     # False: probabilities read in place of logits, so the lse (z-loss) columns are NULL by design
                     "lse": entry.extra.get("logits") is not False and entry.extra.get("lse") is not False},
                )
    df = pd.DataFrame(list(rows.values()),
                      columns=["run", "layer", "n_experts", "top_k", "router_kind", "module", "logits", "lse"])
    df["layer"] = df["layer"].astype("int16")
    for col in ("n_experts", "top_k"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int32")
    for col in ("run", "router_kind", "module"):
        df[col] = df[col].astype("object")
    df["logits"] = df["logits"].astype(bool)
    df["lse"] = df["lse"].astype(bool)
    return df


class Trace:
    """Every run and rank below one or more trace roots, as DuckDB views and metric methods.

    `root` is a trace root, a run directory, or a list of them (runs must have distinct names).
    `locked=True` makes `sql()` safe for untrusted input (the dashboard's SQL console): one SELECT at a
    time, no file access outside the trace roots, no extensions, no settings, at most `max_rows` rows
    (the rest cut off; `last_truncated` says so) and `timeout` seconds per query.
    `materialize` ("auto": below MATERIALIZE_BYTES of Parquet) loads the tables into DuckDB memory once instead of
    views that scan every part file per query; refresh() appends new parts and rebuilds a table whose parts moved.
    `open_trace(root, engine="spark")` opens the same trace on Spark (`moescope.analysis.spark.SparkTrace`).
    """

    #: The SQL engine the analyses run on (`moescope.analysis.dialects.ENGINES`).
    engine = "duckdb"

    def __init__(
        self,
        root: PathLike | Sequence[PathLike],
        locked: bool = False,
        *,
        max_rows: int = 10_000,
        timeout: float = 30.0,
        memory_limit: str | None = None,
        threads: int | None = None,
        max_bytes: int = _console.Limits.max_bytes,
        materialize: bool | str = "auto",
    ) -> None:
        roots = [root] if isinstance(root, (str, os.PathLike, RemotePath)) else list(root)
        if not roots:
            raise TraceError("no trace root given")
        self.roots: list[Path] = [as_path(r).expanduser().resolve() for r in roots]  # type: ignore[misc]
        self.locked = locked
        self.max_rows = int(max_rows)
        self.timeout = float(timeout)
        self.last_truncated = False
        if materialize not in (True, False, "auto"):
            raise TraceError(f"materialize must be True, False or 'auto', not {materialize!r}")
        self.materialize = materialize
        #: table -> stamps of the parts loaded into its in-memory copy (absent: the table is a view over the files)
        self._loaded: dict[str, dict[Path, tuple[int, int]]] = {}
        self._runs = discover(roots)
        #: Bumped by refresh() whenever the file set changed: key every cached result by it.
        self.data_version = 0
        self.refresh_error: str | None = None
        self.refreshed_at: float | None = None
        self._columns: dict[Path, list[str]] = {}  # footer columns of every part checked so far
        self._manifest_stamps = _live._manifest_stamps(self.roots)
        if not any(f for info in self._runs for f in info.files.values()):
            raise TraceError(f"{', '.join(str(r) for r in roots)}: the trace holds no data files (empty trace)")
        config: dict[str, Any] = {}
        if memory_limit:
            config["memory_limit"] = memory_limit
        if threads:
            config["threads"] = int(threads)
        self.con: duckdb.DuckDBPyConnection = duckdb.connect(":memory:", config=config)
        self._lock = threading.Lock()
        self._create_views()
        self._console: _console.Console | None = None
        if locked:
            self._lock_down(memory_limit, threads, int(max_bytes))

    # -- set-up ---------------------------------------------------------------------------------

    def _create_views(self) -> None:
        con = self.con
        all_files = {t: [f for info in self._runs for f in info.files.get(t, [])] for t in TABLES}
        # every new part: footer, version and page checksums (moescope.format.reader), verified in parallel
        self._columns.update(check_parts([f for fs in all_files.values() for f in fs if f not in self._columns]))
        stamps = {f: _stamp(f) for fs in all_files.values() for f in fs}
        if self.materialize == "auto":
            materialize = sum(s[0] for s in stamps.values()) < MATERIALIZE_BYTES
        else:
            materialize = bool(self.materialize)
        for info in self._runs:  # a run's cached copies are the parts it lists now: no copy of a vanished one
            if isinstance(info.path, RemotePath):
                prune_copies(info.path, [f for fs in info.files.values() for f in fs])  # type: ignore[misc]
        for table in TABLES:
            files = all_files[table]
            if materialize:
                self._load_table(table, files, stamps)
                continue
            if self._loaded.pop(table, None) is not None:  # grew past the threshold: back to a view
                con.execute(f"DROP TABLE {table}")
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {self._select(table, files)}")
        for info in self._runs:  # validated, not believed: run names, id ranges, counts (footer statistics)
            check_run_values(info.run, info.files, info.typed)
        con.execute(f"CREATE OR REPLACE VIEW assignments AS {render('view_assignments')}")
        files_df = pd.DataFrame(
            [(t, info.run, str(f)) for info in self._runs for t, fs in info.files.items() for f in fs],
            columns=["tbl", "run", "path"],
        )
        con.register("_files_df", files_df)
        con.execute("CREATE OR REPLACE TABLE trace_files AS SELECT * FROM _files_df")
        con.unregister("_files_df")
        runs_df = _runs_frame(self._runs)
        layers_df = _layers_frame(self._runs)
        con.register("_runs_df", runs_df)
        con.register("_layers_df", layers_df)
        con.execute("CREATE OR REPLACE TABLE runs AS SELECT * FROM _runs_df")
        con.execute("CREATE OR REPLACE TABLE manifest_layers AS SELECT * FROM _layers_df")
        con.unregister("_runs_df")
        con.unregister("_layers_df")
        for derived in ("layer_info", "layer_experts", "expert_ids"):  # rebuilt from the new manifests and rows
            con.execute(f"DROP TABLE IF EXISTS {derived}")
        ensure_layer_info(con)

    def _select(self, table: str, files: list[Path]) -> str:
        present = {c for f in files for c in self._columns[f]}
        return _table_view_sql(table, files, present)

    def _fill(self, table: str, files: list[Path], stmt: str) -> None:
        """Run `stmt` ("... {select}") over the rows of `files` (see _with_parts)."""
        _with_parts(self.con, table, files, {c for f in files for c in self._columns[f]}, stmt)

    def _load_table(self, table: str, files: list[Path], stamps: dict[Path, tuple[int, int]]) -> None:
        """Keep `table` an in-memory copy of `files`: append new parts, rebuild when a loaded part vanished or moved."""
        con = self.con
        loaded = self._loaded.get(table)
        if loaded is not None and all(stamps.get(f) == s for f, s in loaded.items()):
            new = [f for f in files if f not in loaded]
            if new:
                self._fill(table, new, f"INSERT INTO {table} {{select}}")
        else:
            if loaded is None:  # first load, or it was a view until now
                con.execute(f"DROP VIEW IF EXISTS {table}")
            self._fill(table, files, f"CREATE OR REPLACE TABLE {table} AS {{select}}")
        self._loaded[table] = {f: stamps[f] for f in files}

    def _rebuild_views(self) -> None:
        """Re-create every view and table over the current file set (refresh() holds `_lock` meanwhile).

        Not one transaction: ensure_layer_info probes for tables by catching errors, which aborts one. Callers
        that query from other threads order their queries with refresh() (DashboardData does, under its lock).
        """
        self._create_views()

    def refresh(self) -> bool:
        """Pick up new complete parts, ranks and runs (directory listings, manifest mtimes); True if data changed.

        Cheap enough to call every few seconds on a trace being written: known files are never re-read.
        `data_version` goes up by one on every change; key cached results by it.
        """
        return _live.refresh(self)

    def live_state(self) -> _live.LiveState:
        """Recording, finished or stopped by an alert; the last step and when data last arrived."""
        return _live.live_state(self)

    def _lock_down(self, memory_limit: str | None, threads: int | None, max_bytes: int) -> None:
        # Order matters: the views above already point at the files; from here on only the trace roots are
        # readable and settings are frozen; user SQL goes through the console's guard (moescope/analysis/console.py).
        tables = [r[0] for r in self.con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal UNION SELECT table_name FROM duckdb_tables()"
        ).fetchall()]
        # an object-store root's parts are scanned from its cache folder: that folder is the readable one
        _console.lock_down(self.con, [local_root(r) for r in self.roots], memory_limit, threads)
        limits = _console.Limits(max_rows=self.max_rows, timeout=self.timeout, max_bytes=max_bytes)
        self._console = _console.Console(self.con, tables, limits)

    # -- public data access -----------------------------------------------------------------------

    @property
    def runs(self) -> list[str]:
        """Names of the runs found, in discovery order."""
        return [r.run for r in self._runs]

    @property
    def run_dirs(self) -> dict[str, Path]:
        """Run name -> run directory."""
        return {r.run: r.path for r in self._runs}

    def manifest(self, run: str) -> dict[str, Any]:
        """The (rank 0 where present) manifest of `run`."""
        for r in self._runs:
            if r.run == run:
                return r.manifests.get(0) or r.manifests[min(r.manifests)]
        raise KeyError(f"no run {run!r} in this trace (runs: {', '.join(self.runs)})")

    def views(self) -> dict[str, list[tuple[str, str]]]:
        """Each view's (column, type) pairs, the views a user queries."""
        out: dict[str, list[tuple[str, str]]] = {}
        for name in (*VIEWS, "layer_info", "trace_files"):
            rows = self.con.execute(f"DESCRIBE {name}").fetchall()
            out[name] = [(r[0], r[1]) for r in rows]
        return out

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new DuckDB cursor over the same views and tables: use one per thread (a connection is not thread-safe)."""
        return self.con.cursor()

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run SQL over the views and return a DuckDB relation (locked: checked, limited, already executed)."""
        if not self.locked:
            try:
                rel = self.con.sql(query)
                return rel if rel is None else integer_counts(rel)  # sum(tokens) stays an integer in .df()
            except duckdb.Error as e:
                raise translate(e, self.con) from None
        return self._locked_sql(query)

    def query(self, query: str) -> pd.DataFrame:
        """Run SQL and return a DataFrame; in locked mode `df.attrs['truncated']` says whether rows were cut."""
        if self.locked and self._console is not None:
            result = self._console.run(query)
            self.last_truncated = result.truncated
            cur = self.con.cursor()  # its own cursor: console queries run concurrently, a connection is not thread-safe
            try:
                df = integer_counts(cur.from_arrow(result.table)).df()  # counts stay integers
            finally:
                cur.close()
            df.attrs["truncated"] = result.truncated
            df.attrs["truncated_by"] = result.reason  # "rows", "bytes" or ""
            return df
        rel = self.sql(query)
        if rel is None:
            return pd.DataFrame()
        df = rel.df()
        df.attrs["truncated"] = False
        return df

    def _locked_sql(self, query: str) -> duckdb.DuckDBPyRelation:
        assert self._console is not None
        result = self._console.run(query)  # checked, on its own cursor, within the limits; QueryError otherwise
        self.last_truncated = result.truncated
        with self._lock:
            return self.con.from_arrow(result.table)

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Trace({', '.join(str(r) for r in self.roots)}, runs={self.runs}{', locked' if self.locked else ''})"

    # -- metrics ---------------------------------------------------------------------------------

    @staticmethod
    def _sel(run: Any = None, tag: Any = None, steps: tuple[int, int] | None = None, layer: Any = None) -> Selection:
        return Selection.of({"run": run, "tag": tag, "steps": steps, "layer": layer})

    def utilization(
        self, run: Any = None, window: Window = None, *, tag: Any = None, steps: tuple[int, int] | None = None,
        layer: Any = None,
    ) -> pd.DataFrame:
        """Per run × layer × window × expert: assignments, tokens, load_share, utilization (N·f_e), mean_prob.

        window: None = thirds of each run's steps, "all", or a width in steps.
        """
        return M.utilization(self.cursor(), self._sel(run, tag, steps, layer), window)

    def load_metrics(
        self, run: Any = None, window: Window = None, *, tag: Any = None, steps: tuple[int, int] | None = None,
        layer: Any = None,
    ) -> pd.DataFrame:
        """Per run × layer × window: cv, maxvio, load_entropy, gini, aux_loss, z_loss, router_entropy, router_margin,
        nonfinite, dropped, drop_rate, min/max_utilization, m90, collapse_m, top_m_share, expected_per_expert."""
        return M.load_metrics(self.cursor(), self._sel(run, tag, steps, layer), window)

    def coactivation(
        self, run: Any = None, window: Window = "all", *, tag: Any = None, steps: tuple[int, int] | None = None,
        layer: Any = None,
    ) -> pd.DataFrame:
        """Per run × layer × window × ordered pair (expert_a, expert_b): n_a, n_b, n_ab, p_b_given_a, lift; token_steps,
        covers (the steps whose token rows it used)."""
        return M.coactivation(self.cursor(), self._sel(run, tag, steps, layer), window)

    def temporal_locality(
        self, run: Any = None, window: Window = "all", *, tag: Any = None, steps: tuple[int, int] | None = None,
        layer: Any = None,
    ) -> pd.DataFrame:
        """Per run × layer × window: pairs, first_choice, any_expert and their chance levels; token_steps, covers."""
        return M.temporal_locality(self.cursor(), self._sel(run, tag, steps, layer), window)

    def token_steps(self, run: Any = None, *, tag: Any = None, steps: tuple[int, int] | None = None,
                    layer: Any = None) -> pd.DataFrame:
        """(run, step) rows of the steps that hold token-level routing (record(tokens_every=N): every N-th step)."""
        return M.token_steps(self.cursor(), self._sel(run, tag, steps, layer))

    def domain_specialization(
        self, run: Any = None, window: Window = "all", *, tag: Any = None, steps: tuple[int, int] | None = None,
        layer: Any = None,
    ) -> pd.DataFrame:
        """Per run × layer × window × tag × expert: share, chance (k/N), specialization, expert_tag_share."""
        return M.domain_specialization(self.cursor(), self._sel(run, tag, steps, layer), window)

    def vocab_specialization(
        self, run: Any = None, window: Window = "all", *, tag: Any = None, steps: tuple[int, int] | None = None,
        layer: Any = None, min_count: int = 5, by_token: bool = False, per_expert: bool = False, top: int = 10,
    ) -> pd.DataFrame:
        """Per run × layer × window: token_ids, tokens, specialization, weighted_specialization, chance (k/N);
        token_steps, covers.

        per_expert=True: per run × layer × window × expert, the `top` token ids it takes most (by the share of
        each id's occurrences routed to it), decoded with the run's tokenizer (`texts`), their `share` vs
        `chance`, its `tags` shares and a sentence (`text`); see moescope.analysis.vocab.expert_view.
        """
        sel = self._sel(run, tag, steps, layer)
        if per_expert:
            from .vocab import expert_view, run_decoders

            if window is None or window == "thirds":  # thirds of routing steps and of load steps are other ranges
                raise ValueError("vocab_specialization(per_expert=True) takes window='all' or a width in steps, "
                                 "so its token rows and its tag shares cover the same windows")

            tokens = M.expert_tokens(self.cursor(), sel, window, min_count, top)
            domains = M.domain_specialization(self.cursor(), sel, window)
            return expert_view(tokens, domains, run_decoders(self, sorted(set(tokens["run"]))), min_count)
        return M.vocab_specialization(self.cursor(), sel, window, min_count, by_token)

    def saturation(
        self,
        checkpoint: Mapping[str, Any] | None = None,
        final: Mapping[str, Any] | None = None,
        *,
        run: str | None = None,
        on: Sequence[str] = ("tag", "seq", "pos"),
    ) -> pd.DataFrame:
        """Router saturation per checkpoint (run, step) × layer: tokens, saturation, chance (k/N).

        Either two selections (e.g. {"run": "ckpt-1000"} vs {"run": "final"}), or `run=` alone: every step of
        the run against its last step (an eval batch replayed at each checkpoint). Tokens match on layer,
        token_id and `on`.
        """
        if checkpoint is None and final is None:
            if run is None:
                raise ValueError("saturation needs checkpoint= and final= selections, or run=")
            row = self.cursor().execute("SELECT MAX(step) FROM routing WHERE run = ?", [run]).fetchone()
            if not row or row[0] is None:
                raise ValueError(f"saturation: run {run!r} has no token-level routing")
            last = int(row[0])
            checkpoint = {"run": run}
            final = {"run": run, "steps": (last, last)}
        if checkpoint is None or final is None:
            raise ValueError("saturation needs both checkpoint= and final=")
        return M.saturation(self.cursor(), Selection.of(checkpoint), Selection.of(final), on)

    def similarity(
        self, run: Any = None, *, metric: str | Sequence[str] | None = None, steps: tuple[int, int] | None = None,
        layer: Any = None,
    ) -> pd.DataFrame:
        """Expert × expert similarity: run, step, layer, expert_a, expert_b, metric, value (from snapshot_experts)."""
        return M.similarity(self.cursor(), self._sel(run, None, steps, layer), metric)

    def health(self, run: Any = None, config: HealthConfig | PathLike | None = None) -> pd.DataFrame:
        """Findings of the health rules, one row per rule × run × layer × window.

        Columns: rule, status (PASS/WARN/FAIL/SKIP/ERROR), run, layer, expert, window, window_start, window_end,
        metric, value, threshold, message. `config`: a HealthConfig, a moescope.toml path, or None (defaults).
        """
        from .health import health
        from .selection import check_selection

        sel = Selection(run=[run] if isinstance(run, str) else (list(run) if run is not None else self.runs))
        check_selection(self.cursor(), sel, "health")  # a typo'd run is an error, not an empty result
        return health(self.cursor(), sel, config)

    def drift(
        self,
        baseline: Mapping[str, Any] | None = None,
        current: Mapping[str, Any] | None = None,
        *,
        config: HealthConfig | PathLike | None = None,
        n_boot: int | None = None,
        seed: int | None = None,
    ) -> pd.DataFrame:
        """Per layer drift of current vs baseline expert load (see moescope.analysis.drift).

        Columns: layer, js (Jensen–Shannon distance, base 2), tv, psi (+1 smoothing), chi2, threshold (the JS limit
        applied: max(js_min, bootstrap)), flagged (JS > threshold and TV > tv_min), status (WARN/PASS/SKIP), message,
        bootstrap (the seeded bootstrap quantile), n_baseline, n_current (tokens), n_units, unit ("sequence" from
        routing, else "step"). Selections: {"run", "tag", "steps": (a, b), "layer", "root": another Trace or path}.
        """
        from .drift import drift
        from .selection import check_selection

        opened: list[Trace] = []
        units = None
        sides: list[tuple[duckdb.DuckDBPyConnection, Selection]] = []
        try:
            for name, spec in (("baseline", baseline or {}), ("current", current or {})):
                root = spec.get("root")
                tr = self if root is None else root if isinstance(root, Trace) else type(self)(root)  # same engine
                if tr is not self and tr is not root:
                    opened.append(tr)  # opened here, closed here
                sel = Selection.of({k: v for k, v in spec.items() if k != "root"})
                check_selection(tr.cursor(), sel, name)  # a typo'd tag or run is an error, not a silent SKIP
                sides.append((tr.cursor(), sel))
                if name == "baseline" and tr.engine == "duckdb":  # per-sequence counts kept per routing part
                    units = _live.sequence_units(tr, sel) if tr is self or tr is root else None
            (bcon, bsel), (ccon, csel) = sides
            return drift(bcon, bsel, ccon, csel, config, n_boot=n_boot, seed=seed, baseline_units=units)
        finally:
            for t in opened:
                t.close()

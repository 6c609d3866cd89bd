"""The analyses on Spark: `moescope.open(root, engine="spark")`, the same analyses/*.sql over the same Parquet.

`SparkTrace` is a `Trace` whose tables are Spark temporary views over the trace's part files, in a Spark
session of its own (`SparkSession.newSession()`: two traces open at once, e.g. a check against a reference,
keep their views apart). The metric, health and drift functions take its `SparkConnection` where they take a
DuckDB connection: it runs their SQL translated once per text by `moescope.analysis.dialects` and returns
DataFrames converted the way DuckDB's `.df()` converts (the same dtypes, so the rules read the same values).

What Spark cannot do here is an error naming it, never a different answer: live refresh, the locked SQL
console, in-memory materialization and DuckDB settings, and routing's half-float columns (weights, entropy,
lse, margin: Spark's Parquet reader rejects FLOAT16), hence also the `assignments` view. The health rules
and metrics read routing's expert lists only.

Needs `pip install 'moescope[spark]'` (pyspark, sqlglot) and a Java runtime.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from ..format.manifest import TraceError
from ..format.reader import check_parts, check_run_values
from ..format.schema import TABLES
from ..format.storage import RemotePath, as_path
from . import live as _live
from .dialects import bind, translate, unsupported
from .engine import LAYER_EXPERTS_SQL, MAX_EXPERTS, ROUTING_TOP_K_SQL
from .sqlkit import render
from .trace import VIEWS, PathLike, Trace, _layers_frame, _runs_frame, discover

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame as SparkFrame
    from pyspark.sql import SparkSession

ENGINE = "spark"
#: Trace-format columns Spark's Parquet reader cannot read (FLOAT16): left out of the Spark views.
HALF_FLOAT: dict[str, list[str]] = {
    t: [f.name for f in s if f.type in (pa.float16(), pa.list_(pa.float16()))] for t, s in TABLES.items()
}
#: Views that need a half-float column, so Spark does not define them.
NEEDS_HALF_FLOAT = ("assignments",)


def _require() -> None:
    try:
        import pyspark  # noqa: F401
        import sqlglot  # noqa: F401
    except ImportError as e:
        raise ImportError(f"engine=spark needs pyspark and sqlglot: pip install 'moescope[spark]' ({e})") from None


def session(conf: Mapping[str, str] | None = None) -> SparkSession:
    """The active SparkSession, or a new one with `conf` (`spark.master` defaults to local[*], all cores here)."""
    _require()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and not conf:
        return active
    b = SparkSession.builder.appName("moescope")
    conf = dict(conf or {})
    # spark-submit and PYSPARK_SUBMIT_ARGS set the master themselves; a plain `python` gets this machine.
    if "spark.master" not in conf and "PYSPARK_SUBMIT_ARGS" not in os.environ and "SPARK_MASTER" not in os.environ:
        conf["spark.master"] = "local[*]"
    for k, v in conf.items():
        b = b.config(k, v)
    return b.getOrCreate()


class SparkResult:
    """One query's result, read like a DuckDB result: `df()`, `fetchall()`, `fetchone()`, `columns`."""

    def __init__(self, frame: SparkFrame, con: SparkConnection) -> None:
        self._frame = frame
        self._con = con

    @property
    def columns(self) -> list[str]:
        """The result's column names."""
        return list(self._frame.columns)

    def arrow(self) -> pa.Table:
        """The rows as an Arrow table (collected to the driver)."""
        try:
            return self._frame.toArrow()
        except Exception as e:
            raise _explain(e) from None

    def df(self) -> pd.DataFrame:
        """The rows as pandas, converted by DuckDB's own `.df()`: the dtypes of the DuckDB engine's results."""
        return self._con.to_pandas(self.arrow())

    def fetchall(self) -> list[tuple[Any, ...]]:
        """The rows as tuples."""
        return [tuple(r) for r in self._frame.collect()]

    def fetchone(self) -> tuple[Any, ...] | None:
        """The first row, or None."""
        rows = self._frame.take(1)
        return tuple(rows[0]) if rows else None


class SparkConnection:
    """What the analysis functions ask of a connection, on one Spark session: DuckDB SQL in, DuckDB-like results out."""

    dialect = ENGINE

    def __init__(self, spark: SparkSession) -> None:
        import duckdb

        self.spark = spark
        self._local = duckdb.connect(":memory:")  # only converts collected Arrow results to pandas
        self._local_lock = threading.Lock()  # a DuckDB connection is not thread-safe

    def execute(self, query: str, params: Sequence[Any] | None = None) -> SparkResult:
        """Run a DuckDB-dialect query (with `?` parameters bound as literals) on Spark."""
        text = bind(query, params, ENGINE) if params else translate(query, ENGINE)
        try:
            frame = self.spark.sql(text)
        except Exception as e:
            raise _explain(e) from None
        return SparkResult(frame, self)

    def sql(self, query: str) -> SparkResult:
        """Run a DuckDB-dialect query on Spark."""
        return self.execute(query)

    def frame(self, query: str) -> pd.DataFrame:
        """Run a query and return its rows as a DataFrame (the seam `engine.run_analysis` uses)."""
        return self.execute(query).df()

    def to_pandas(self, table: pa.Table) -> pd.DataFrame:
        """An Arrow result as pandas, by DuckDB's `.df()` (DECIMAL as float64, nullable ints as Int*)."""
        with self._local_lock:
            return self._local.from_arrow(table).df()

    def cursor(self) -> SparkConnection:
        """This connection (a Spark session is safe to share between threads)."""
        return self

    def view(self, name: str, data: pd.DataFrame | pa.Table | SparkFrame) -> None:
        """Define (or replace) the temporary view `name` over a DataFrame, an Arrow table or a Spark frame."""
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        if isinstance(data, pa.Table):
            data = self.spark.createDataFrame(data)
        data.createOrReplaceTempView(name)

    def close(self) -> None:
        """Release the local converter (the Spark session stays: starting one costs seconds)."""
        self._local.close()


def _explain(e: Exception) -> Exception:
    """A Spark error about a column or view this engine leaves out becomes the one-line unsupported error."""
    text = str(e)
    cls = getattr(e, "getCondition", lambda: None)() or ""
    half = sorted({c for cols in HALF_FLOAT.values() for c in cols})
    if "UNRESOLVED_COLUMN" in (cls or text) and any(f"`{c}`" in text for c in half):
        return unsupported(f"reading routing's half-float columns ({', '.join(half)}; Spark cannot read FLOAT16)",
                           ENGINE)
    if "TABLE_OR_VIEW_NOT_FOUND" in (cls or text) and any(f"`{v}`" in text for v in NEEDS_HALF_FLOAT):
        return unsupported("the assignments view (it needs routing's half-float weights)", ENGINE)
    return e


def spark_schema(table: str) -> Any:
    """The Spark schema of a trace table: the format's Arrow schema less the half-float columns."""
    from pyspark.sql.pandas.types import from_arrow_schema

    half = set(HALF_FLOAT[table])
    return from_arrow_schema(pa.schema([f for f in TABLES[table] if f.name not in half]))


def executor_uri(path: Path | RemotePath, root: Path | RemotePath, location: str | None = None) -> str:
    """Where the executors read a part: under `location` (the root as they see it), else the part's own URI
    (`s3://` as Hadoop's `s3a://`, `file://` for a local path)."""
    if location is not None:
        rel = path.relative_to(root)  # type: ignore[arg-type]
        return location.rstrip("/") + "/" + (rel if isinstance(rel, str) else rel.as_posix())
    if isinstance(path, RemotePath):
        url = str(path)
        return "s3a://" + url[len("s3://"):] if url.startswith("s3://") else url
    return path.as_uri()


class SparkTrace(Trace):
    """A trace whose tables are Spark views over its Parquet parts; the metric and health methods of `Trace`.

    `spark`: a SparkSession to use (its own new session is derived from it), else `session(spark_conf)`.
    `location`: where the executors read the trace root when it differs from the path this process lists
    (e.g. "hdfs://nn/traces/run-a" or "s3a://bucket/traces/run-a" for a root mounted here); one root only.
    """

    engine = ENGINE

    def __init__(
        self,
        root: PathLike | Sequence[PathLike],
        locked: bool = False,
        *,
        spark: SparkSession | None = None,
        spark_conf: Mapping[str, str] | None = None,
        location: str | None = None,
        materialize: bool | str = "auto",
        memory_limit: str | None = None,
        threads: int | None = None,
        **limits: Any,
    ) -> None:
        if locked:
            raise unsupported("the locked SQL console (locked=True)", ENGINE)
        if materialize is True:
            raise unsupported("materialize=True (in-memory DuckDB tables)", ENGINE)
        if memory_limit or threads:
            raise unsupported("memory_limit/threads (DuckDB settings; use spark_conf)", ENGINE)
        unknown = set(limits) - {"max_rows", "timeout", "max_bytes"}  # the locked console's limits: unused here
        if unknown:
            raise TypeError(f"unexpected argument(s) {sorted(unknown)}")
        _require()
        roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        if not roots:
            raise TraceError("no trace root given")
        if location is not None and len(roots) != 1:
            raise ValueError("location= maps one trace root; open one root at a time")
        self.roots = [as_path(r).expanduser().resolve() for r in roots]  # type: ignore[misc]
        self.locked = False
        self.max_rows, self.timeout = int(limits.get("max_rows", 10_000)), float(limits.get("timeout", 30.0))
        self.last_truncated = False
        self.materialize = False
        self._loaded = {}
        self._runs = discover(roots)
        self.data_version = 0
        self.refresh_error = None
        self.refreshed_at = None
        self._manifest_stamps = _live._manifest_stamps(self.roots)
        self._lock = threading.Lock()
        self._console = None
        self.location = location
        files = {t: [f for info in self._runs for f in info.files.get(t, [])] for t in TABLES}
        if not any(files.values()):
            raise TraceError(f"{', '.join(str(r) for r in roots)}: the trace holds no data files (empty trace)")
        # The same checks as the DuckDB engine: footers, versions, page checksums, run names and id ranges.
        self._columns = check_parts([f for fs in files.values() for f in fs])
        for info in self._runs:
            check_run_values(info.run, info.files, info.typed)
        self.spark = (spark if spark is not None else session(spark_conf)).newSession()
        self.con = SparkConnection(self.spark)  # type: ignore[assignment] - the analyses' connection seam
        self._create_spark_views(files)

    def _uri(self, path: Path | RemotePath) -> str:
        return executor_uri(path, self.roots[0], self.location)

    def _create_spark_views(self, files: dict[str, list[Path]]) -> None:
        con, spark = self.con, self.spark
        for table in TABLES:
            schema = spark_schema(table)
            # An explicit schema: columns an older writer left out read as NULL (DuckDB's union_by_name + casts).
            frame = (spark.read.schema(schema).parquet(*[self._uri(f) for f in files[table]]) if files[table]
                     else spark.createDataFrame([], schema))
            frame.createOrReplaceTempView(table)
        con.view("trace_files", pd.DataFrame(
            [(t, info.run, str(f)) for info in self._runs for t, fs in info.files.items() for f in fs],
            columns=["tbl", "run", "path"]))
        con.view("runs", _runs_frame(self._runs))
        con.view("manifest_layers", _layers_frame(self._runs))
        self._layer_info()

    def _layer_info(self) -> None:
        """layer_info, expert_ids and layer_experts as engine.ensure_layer_info defines them, kept as small views."""
        con = self.con
        li = con.frame(render("view_layer_info"))
        if li["top_k"].isna().any():  # k still unknown: the longest routing list, else 1 (engine.ensure_layer_info)
            k = con.frame(ROUTING_TOP_K_SQL)
            li = li.merge(k, on=["run", "layer"], how="left")
            li["top_k"] = li["top_k"].fillna(li.pop("k")).fillna(1)
        li["top_k"] = li["top_k"].astype("Int32")
        li["n_experts"] = li["n_experts"].astype("Int32")
        con.view("layer_info", li)
        n = min(int(li["n_experts"].max()) if len(li) and li["n_experts"].notna().any() else 0, MAX_EXPERTS)
        con.view("expert_ids", pd.DataFrame({"i": pd.Series(range(max(n, 1)), dtype="int16")}))
        con.view("layer_experts", con.frame(LAYER_EXPERTS_SQL))

    # -- what only the DuckDB engine does -----------------------------------------------------------

    def refresh(self) -> bool:
        """Not on Spark: a Spark trace is read as it was when opened."""
        raise unsupported("live refresh (Trace.refresh)", ENGINE)

    def cursor(self) -> SparkConnection:  # type: ignore[override]
        """The trace's Spark connection (the analyses' connection seam)."""
        return self.con  # type: ignore[return-value]

    def sql(self, query: str) -> SparkResult:  # type: ignore[override]
        """Run DuckDB-dialect SQL over the views on Spark; `.df()` gives the rows."""
        return self.con.sql(query)  # type: ignore[return-value]

    def query(self, query: str) -> pd.DataFrame:
        """Run DuckDB-dialect SQL over the views on Spark and return a DataFrame."""
        df = self.con.frame(query)  # type: ignore[attr-defined]
        df.attrs["truncated"] = False
        return df

    def views(self) -> dict[str, list[tuple[str, str]]]:
        """Each view's (column, Spark type) pairs (no `assignments`: it needs routing's half floats)."""
        out: dict[str, list[tuple[str, str]]] = {}
        for name in (*VIEWS, "layer_info", "trace_files"):
            if name in NEEDS_HALF_FLOAT:
                continue
            out[name] = [(f.name, f.dataType.simpleString()) for f in self.spark.table(name).schema.fields]
        return out

    def close(self) -> None:
        """Drop this trace's views (the Spark session stays for the next trace: starting one costs seconds)."""
        for name in self.spark.catalog.listTables():
            if name.isTemporary:
                self.spark.catalog.dropTempView(name.name)
        self.con.close()

    def __repr__(self) -> str:
        return f"SparkTrace({', '.join(str(r) for r in self.roots)}, runs={self.runs})"

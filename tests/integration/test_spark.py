"""engine="spark": the same analyses/*.sql on PySpark (local[2]) give the same findings and metrics as DuckDB.

Known-answer comparison: every health finding and metric equal between the engines (floats within 1e-9
relative), on sample_traces/ and on hand-planted traces (a collapse, a dead expert, non-finite logits, lost
steps, k known only from the routing lists). The dialect rules are checked on their own (no JVM needed).
One SparkSession for the module: starting one costs ~20 s on this machine.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sqlglot = pytest.importorskip("sqlglot")

from trace_helpers import layer_spec, load_frame, routing_frame, stats_frame  # noqa: E402

import moescope  # noqa: E402
from moescope.analysis import dialects  # noqa: E402
from moescope.format.writer import write_run  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
#: Sort keys of each metric's rows (row order is an engine's choice; the values are not).
METRICS = {
    "load_metrics": ["run", "layer", "window"],
    "utilization": ["run", "layer", "window", "expert"],
    "temporal_locality": ["run", "layer", "window"],
    "coactivation": ["run", "layer", "window", "expert_a", "expert_b"],
    "vocab_specialization": ["run", "layer", "window"],
    "domain_specialization": ["run", "layer", "window", "tag", "expert"],
}
#: Metrics that take arguments, and theirs (saturation of one run: every step against its last step).
EXTRA_ARGS = {"saturation": {"run": "upcycled"}}
FINDING_KEYS = ["rule", "run", "layer", "window_start", "metric", "expert", "status", "message"]


# -- the dialect rules (sqlglot only) ------------------------------------------------------------------


def test_duckdb_sql_is_never_translated() -> None:
    sql = "SELECT list_has_any(experts, [1]) FROM routing"
    assert dialects.translate(sql, "duckdb") is sql  # the very same string: no parse, no generation


def test_spark_rules_keep_duckdb_meaning() -> None:
    out = dialects.translate("SELECT experts[1] AS a, experts[i + 1] AS b, len(experts) AS c, "
                             "list_has_any(experts, prev) AS d, n / 4.0 AS e FROM t", "spark")
    # 1-based DuckDB indexing becomes 0-based GET (NULL past the end, like DuckDB), literal or not
    assert "GET(experts, 0) AS a" in out and "GET(experts, i + 1 - 1) AS b" in out
    assert "SIZE(experts) AS c" in out and "ARRAYS_OVERLAP(experts, prev) AS d" in out
    assert "n / CAST(4.0 AS DOUBLE) AS e" in out  # DOUBLE division, as DuckDB computes it
    assert dialects.bind("SELECT * FROM runs WHERE list_contains(?, run) AND step > ?", [["a", "o'k"], 3],
                         "spark") == "SELECT * FROM runs WHERE ARRAY_CONTAINS(ARRAY('a', 'o\\'k'), run) AND step > 3"
    with pytest.raises(ValueError, match="too few parameters"):
        dialects.bind("SELECT ? + ?", [1], "spark")


def test_translation_is_cached_per_text() -> None:
    from moescope.analysis.sqlkit import Raw, render

    sql = render("temporal_locality", {"filter": Raw("run = 'cache-probe'"), "window": 0, "n_windows": 3})
    first = dialects.translate(sql, "spark")
    hits = dialects._translate.cache_info().hits
    assert dialects.translate(sql, "spark") is first
    assert dialects._translate.cache_info().hits == hits + 1


def test_executor_uri() -> None:
    from moescope.analysis.spark import executor_uri
    from moescope.format.storage import as_path

    part = Path("/mnt/traces/run-a/expert_load/part-0-000000.parquet")
    assert executor_uri(part, Path("/mnt/traces")) == "file:///mnt/traces/run-a/expert_load/part-0-000000.parquet"
    assert (executor_uri(part, Path("/mnt/traces"), "hdfs://nn/traces/")
            == "hdfs://nn/traces/run-a/expert_load/part-0-000000.parquet")
    root = as_path("s3://bucket/traces")
    assert executor_uri(root / "run-a" / "routing" / "part-1-000002.parquet", root) == \
        "s3a://bucket/traces/run-a/routing/part-1-000002.parquet"  # Hadoop's S3 connector


def test_unknown_engine_is_a_usage_error(tmp_path: Path) -> None:
    from moescope.errors import classify

    with pytest.raises(dialects.UnsupportedError, match="unknown engine 'sparkk'") as e:
        moescope.open(SAMPLES / "balanced", engine="sparkk")
    assert classify(e.value).code == 2


# -- the engines side by side (PySpark, Java) ---------------------------------------------------------


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("engine=spark needs a Java runtime (java not on PATH)")
    out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60).stderr
    m = re.search(r'version "(\d+)', out)
    if m is None or int(m.group(1)) < 17:
        pytest.skip(f"PySpark 4 needs Java 17+: java -version says {out.splitlines()[0] if out else 'nothing'}")
    from moescope.analysis.spark import session

    s = session({"spark.master": "local[2]", "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
                 "spark.sql.shuffle.partitions": "4"})
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


def _same_frames(a: pd.DataFrame, b: pd.DataFrame, keys: list[str], what: str) -> None:
    """Equal rows after sorting by `keys`: numbers within 1e-9 relative, everything else exactly."""
    assert list(a.columns) == list(b.columns), what
    assert len(a) == len(b), f"{what}: {len(a)} rows on DuckDB, {len(b)} on Spark"
    a, b = (f.iloc[_order(f, keys)].reset_index(drop=True) for f in (a, b))
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            xf, yf = x.astype("float64").to_numpy(), y.astype("float64").to_numpy()
            assert np.array_equal(np.isnan(xf), np.isnan(yf)), f"{what}.{col}: NULLs differ"
            ok = ~np.isnan(xf)
            np.testing.assert_allclose(yf[ok], xf[ok], rtol=1e-9, atol=0, err_msg=f"{what}.{col}")
        else:
            xs = [None if _missing(v) else str(v) for v in x]
            ys = [None if _missing(v) else str(v) for v in y]
            assert xs == ys, f"{what}.{col}"


def _order(df: pd.DataFrame, keys: list[str]) -> list[int]:
    """Row order by `keys` as text (a finding's `expert` may be a list of ids)."""
    text = [tuple("" if _missing(v) else str(v) for v in row) for row in df[keys].itertuples(index=False)]
    return sorted(range(len(df)), key=lambda i: text[i])


def _missing(v: object) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _compare(root: Path, spark, metrics: dict[str, list[str]] = METRICS,
             drift: tuple[str, str] | None = None) -> pd.DataFrame:
    """Health and metrics (and drift between two runs) of `root` on both engines, asserted equal."""
    duck = moescope.open(root)
    sp = moescope.open(root, engine="spark", spark=spark)
    try:
        assert sp.runs == duck.runs
        hd, hs = duck.health(), sp.health()
        _same_frames(hd, hs, FINDING_KEYS, "health")
        for name, keys in metrics.items():
            kwargs = EXTRA_ARGS.get(name, {})
            _same_frames(getattr(duck, name)(**kwargs), getattr(sp, name)(**kwargs), keys, name)
        if drift is not None:  # the statistics; the bootstrap threshold depends on the order units come back
            cols = ["layer", "js", "tv", "psi", "chi2", "n_baseline", "n_current", "n_units", "unit"]
            base, cur = {"run": drift[0]}, {"run": drift[1]}
            _same_frames(duck.drift(base, cur)[cols], sp.drift(base, cur)[cols], ["layer"], "drift")
        return hd
    finally:
        sp.close()
        duck.close()


@pytest.mark.slow
def test_sample_traces_same_findings_and_metrics(spark) -> None:
    more = {"saturation": ["run", "step", "layer"], "similarity": ["run", "step", "layer", "metric", "expert_a",
                                                                    "expert_b"]}
    hd = _compare(SAMPLES, spark, {**METRICS, **more}, drift=("balanced", "shift"))
    # the comparison is not between two empty answers: the collapse sample fails its collapse rule
    got = hd[(hd["run"] == "collapse") & (hd["rule"] == "collapse")]
    assert (got["status"] == "FAIL").any()
    assert len(hd) > 100 and set(hd["run"]) == {"balanced", "collapse", "shift", "upcycled"}


def _planted(root: Path) -> None:
    """Runs with planted faults: a collapse and a dead expert, non-finite logits, lost steps, k from routing only."""
    n, k, steps = 8, 2, 12
    rng = np.random.default_rng(7)
    # run "planted": layer 0 collapses onto expert 3 in the last third; layer 1 never uses expert 5
    load, stats = [], []
    for s in range(steps):
        c0 = rng.integers(40, 60, n).astype(float)
        if s >= 8:
            c0[:] = 2.0
            c0[3] = 400.0
        c1 = rng.integers(40, 60, n).astype(float)
        c1[5] = 0.0
        load += [(s, 0, c0), (s, 1, c1)]
        stats += [{"step": s, "layer": 0, "tokens": int(c0.sum()) // k, "nonfinite": 3 if s == 4 else 0,
                   "entropy_sum": 1.5 * c0.sum() / k, "margin_sum": 0.2 * c0.sum() / k, "lse_sq_sum": 4.0 * s},
                  {"step": s, "layer": 1, "tokens": int(c1.sum()) // k, "entropy_sum": 1.9 * c1.sum() / k}]
    routing = [{"step": s, "layer": layer, "seq": q, "pos": p, "token_id": int(rng.integers(0, 20)),
                "experts": [int(e) for e in rng.choice(n, k, replace=False)]}
               for s in (0, 6, 11) for layer in (0, 1) for q in range(3) for p in range(16)]
    write_run(root / "planted", {"expert_load": load_frame(load), "router_stats": stats_frame(stats),
                                 "routing": routing_frame(routing)},
              layers=[layer_spec(0, n, k), layer_spec(1, n, k)],
              extra={"counters": {"dropped_flushes": 2, "lost_steps": [[12, 13]], "write_errors": []}})
    # run "nok": no manifest layers and no router_stats: N from the ids, k from the routing lists (3 here)
    load2 = [(s, 0, [30, 30, 30, 30, 0, 0]) for s in range(6)]
    routing2 = [{"step": s, "layer": 0, "seq": 0, "pos": p, "experts": [p % 4, (p + 1) % 4, (p + 2) % 4]}
                for s in range(6) for p in range(10)]
    write_run(root / "nok", {"expert_load": load_frame(load2), "routing": routing_frame(routing2)})


@pytest.mark.slow
def test_planted_traces_check_and_metrics(spark, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`moescope check --engine spark` gives DuckDB's verdict and findings; the metrics match too."""
    from moescope.cli import main

    _planted(tmp_path)
    reports = {}
    for engine in ("duckdb", "spark"):
        code = main(["check", str(tmp_path), "--engine", engine, "--format", "json",
                     *(["--spark-conf", "spark.sql.shuffle.partitions=4"] if engine == "spark" else [])])
        reports[engine] = (code, json.loads(capsys.readouterr().out))
    (cd, jd), (cs, js) = reports["duckdb"], reports["spark"]
    assert cd == cs == 1  # the planted collapse fails the check on both engines
    assert jd["summary"] == js["summary"] and js["meta"]["engine"] == "spark"

    def key(c: dict) -> tuple:
        return c["rule"], c["run"], str(c["layer"]), str(c["window"]), str(c["expert"]), c["metric"]

    for a, b in zip(sorted(jd["checks"], key=key), sorted(js["checks"], key=key), strict=True):
        assert {k: v for k, v in a.items() if k != "value"} == {k: v for k, v in b.items() if k != "value"}
        assert (a["value"] is None) == (b["value"] is None)
        if a["value"] is not None:
            assert b["value"] == pytest.approx(a["value"], rel=1e-9)
    found = {(c["run"], c["rule"], c["layer"], c["status"]) for c in jd["checks"]}
    assert ("planted", "recording", None, "ERROR") in found  # the lost steps, from the manifest's counters
    assert ("planted", "collapse", 0, "FAIL") in found
    assert ("planted", "dead_expert", 1, "FAIL") in found
    assert any(r == "planted" and rule == "nonfinite" and s in ("WARN", "FAIL") for r, rule, _, s in found)

    duck, sp = moescope.open(tmp_path), moescope.open(tmp_path, engine="spark", spark=spark)
    try:
        for name in ("load_metrics", "utilization", "temporal_locality"):
            _same_frames(getattr(duck, name)(), getattr(sp, name)(), METRICS[name], name)
        # "nok" has no manifest layers and no router_stats: N = 6 from the ids in expert_load (two never
        # chosen), k = 3 from the routing lists (engine.ROUTING_TOP_K_SQL), on Spark as on DuckDB
        q = "SELECT n_experts, top_k FROM layer_info WHERE run = 'nok'"
        assert sp.query(q).values.tolist() == duck.query(q).values.tolist() == [[6, 3]]
    finally:
        sp.close()
        duck.close()


@pytest.mark.slow
def test_duckdb_only_features_say_so(spark, tmp_path: Path) -> None:
    from moescope.errors import classify

    for kwargs, what in (({"locked": True}, "locked SQL console"), ({"materialize": True}, "materialize=True")):
        with pytest.raises(dialects.UnsupportedError, match=f"{what}.*not supported on engine=spark") as e:
            moescope.open(SAMPLES / "balanced", engine="spark", spark=spark, **kwargs)
        assert classify(e.value).code == 2 and "\n" not in str(e.value)
    sp = moescope.open(SAMPLES / "balanced", engine="spark", spark=spark)
    try:
        with pytest.raises(dialects.UnsupportedError, match=r"live refresh \(Trace.refresh\) is not supported on engine=spark"):
            sp.refresh()
        # half floats: Spark's Parquet reader rejects FLOAT16, so a query on them is an error, never NULLs
        with pytest.raises(dialects.UnsupportedError, match="half-float columns .* not supported on engine=spark"):
            sp.query("SELECT avg(entropy) FROM routing")
        with pytest.raises(dialects.UnsupportedError, match="assignments view .* not supported on engine=spark"):
            sp.query("SELECT count(*) FROM assignments")
        # what the views do hold is the trace's: row counts equal DuckDB's
        duck = moescope.open(SAMPLES / "balanced")
        for table in ("expert_load", "router_stats", "routing"):
            q = f"SELECT count(*) AS n FROM {table}"
            assert int(sp.query(q)["n"][0]) == int(duck.query(q)["n"][0]) > 0
        duck.close()
    finally:
        sp.close()


@pytest.mark.slow
def test_location_is_where_executors_read(spark, tmp_path: Path) -> None:
    """location= maps the listed root to the URI the executors read: a copy with other counts gives its answer."""
    listed, served = tmp_path / "listed", tmp_path / "served"
    write_run(listed / "r", {"expert_load": load_frame([(0, 0, [10, 10, 10, 10])])}, layers=[layer_spec(0, 4, 1)])
    write_run(served / "r", {"expert_load": load_frame([(0, 0, [37, 1, 1, 1])])}, layers=[layer_spec(0, 4, 1)])
    sp = moescope.open(listed, engine="spark", spark=spark, location=served.as_uri())
    try:
        got = sp.query("SELECT expert, tokens FROM expert_load ORDER BY expert")["tokens"].tolist()
        assert got == [37, 1, 1, 1]
    finally:
        sp.close()

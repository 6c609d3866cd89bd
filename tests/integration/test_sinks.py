"""Metric sinks from a plain training loop: each flush's per-layer scalars reach W&B (offline), MLflow (file store),
TensorBoard and a Prometheus endpoint, and read back equal to the values of the known expert counts.

The model routes by construction: token id t goes to expert t % 4 in layer 0 and (t // 4) % 4 in layer 1, so the
counts of each window are known before the run; a forward hook on each router also counts what the model
dispatched, and both must agree with what the sinks logged. Expected scalars are written out by hand below
(CV = std/mean, MaxVio = max/mean − 1, entropy / ln N, N·f = N·c/Σc, dead = N·f < 0.05), not taken from moescope.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moescope  # noqa: E402
from moescope.format.manifest import Manifest  # noqa: E402
from moescope.integrations._scalars import metrics_from_tables  # noqa: E402
from moescope.sinks import FlushScalars, MetricSink, Prometheus  # noqa: E402

E = 4
#: One batch [1, 4] of token ids per step; flush_every=2 makes windows {0, 1} and {2, 3}.
BATCHES = [[0, 0, 5, 6], [4, 8, 12, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
#: Window counts [E] per layer, worked out from BATCHES by hand.
COUNTS = {1: {0: [6, 1, 1, 0], 1: [3, 3, 1, 1]}, 3: {0: [6, 2, 0, 0], 1: [8, 0, 0, 0]}}
METRICS = ("load_cv", "maxvio", "entropy_norm", "dead_experts", "min_utilization")


def _h(*p: float) -> float:
    """Load entropy over ln N of fractions p."""
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(E)


#: The scalars of each window (last step -> layer -> name -> value), by hand from COUNTS.
EXPECTED = {
    1: {0: {"load_cv": math.sqrt(5.5) / 2, "maxvio": 2.0, "entropy_norm": _h(.75, .125, .125), "dead_experts": 1,
            "min_utilization": 0.0},
        1: {"load_cv": 0.5, "maxvio": 0.5, "entropy_norm": _h(.375, .375, .125, .125), "dead_experts": 0,
            "min_utilization": 0.5}},
    3: {0: {"load_cv": math.sqrt(6) / 2, "maxvio": 2.0, "entropy_norm": _h(.75, .25), "dead_experts": 2,
            "min_utilization": 0.0},
        1: {"load_cv": math.sqrt(3), "maxvio": 3.0, "entropy_norm": 0.0, "dead_experts": 3, "min_utilization": 0.0}},
}


def _flat(step: int) -> dict[str, float]:
    return {f"moescope/layer{layer}/{k}": float(v) for layer, d in EXPECTED[step].items() for k, v in d.items()}


class FixedRouter(torch.nn.Module):
    """Routes each token to the expert in column `col` of its features: (logits [T, E], weights [T, 1], ids [T, 1])."""

    def __init__(self, col: int) -> None:
        super().__init__()
        self.col, self.n_experts, self.top_k = col, E, 1

    def forward(self, x: Any) -> tuple[Any, Any, Any]:
        ids = x[:, self.col].long()[:, None]  # [T, 1]
        logits = torch.nn.functional.one_hot(ids[:, 0], E).float() * 4.0  # [T, E]
        return logits, torch.ones_like(ids, dtype=torch.float32), ids


class FixedMoE(torch.nn.Module):
    """Two MoE layers whose routing is a function of the token id (no weights to learn)."""

    def __init__(self) -> None:
        super().__init__()
        self.routers = torch.nn.ModuleList([FixedRouter(0), FixedRouter(1)])

    def forward(self, input_ids: Any) -> Any:
        x = torch.stack([input_ids % E, (input_ids // E) % E], -1).reshape(-1, 2).float()  # [T, 2]
        for r in self.routers:
            r(x)
        return x.sum()


moescope.register_router(FixedRouter, source="output", logits=0, weights=1, ids=2, n_experts="n_experts",
                         top_k="top_k", family="fixed_sink_test")


def _train(run_dir: Path, sinks: list[Any], **opts: Any) -> dict[int, np.ndarray]:
    """The plain loop every test runs; returns what the model itself dispatched per layer over all steps."""
    model = FixedMoE()
    seen = {i: np.zeros(E, np.int64) for i in range(2)}

    def hook(i: int) -> Any:
        return lambda mod, args, out: np.add.at(seen[i], out[2].reshape(-1).numpy(), 1)

    for i, r in enumerate(model.routers):
        r.register_forward_hook(hook(i))
    with moescope.record(model, run_dir, flush_every=2, sinks=sinks, **opts) as rec:
        for step, batch in enumerate(BATCHES):
            rec.step = step
            model(torch.tensor([batch]))
    return seen


def _check_dispatched(seen: dict[int, np.ndarray]) -> None:
    """The model's own dispatch equals the window counts the expectations were worked out from."""
    for layer in (0, 1):
        assert seen[layer].tolist() == (np.array(COUNTS[1][layer]) + np.array(COUNTS[3][layer])).tolist()


class Keep(MetricSink):
    """A custom sink that keeps what it is given."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.got: list[FlushScalars] = []

    def write(self, flush: FlushScalars) -> None:
        self.got.append(flush)


class Broken(MetricSink):
    """A backend that is down."""

    def write(self, flush: FlushScalars) -> None:
        raise ConnectionError("backend unreachable")


def test_custom_sink_gets_the_known_scalars_and_a_failing_sink_never_breaks_the_loop(tmp_path: Path) -> None:
    keep, tables_seen = Keep(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = _train(tmp_path / "run", [Broken(), keep], on_flush=lambda rec, t: tables_seen.append(t))
    _check_dispatched(seen)
    sink_warnings = [w for w in caught if "metric sink Broken failed" in str(w.message)]
    assert len(sink_warnings) == 1 and "ConnectionError: backend unreachable" in str(sink_warnings[0].message)
    # Every flush still reached the next sink, with the run, rank and window steps of the flush.
    assert [(f.run, f.rank, f.step_start, f.step_end) for f in keep.got] == [("run", 0, 0, 1), ("run", 0, 2, 3)]
    for f in keep.got:
        assert {layer: c.tolist() for layer, c in f.counts.items()} == COUNTS[f.step_end]
        assert f.metrics() == pytest.approx(_flat(f.step_end))
    # The callbacks' metrics_from_tables and the sinks read the same definition: same names, same values.
    assert [metrics_from_tables(t) for t in tables_seen] == [f.metrics() for f in keep.got]
    man = Manifest.read_run(tmp_path / "run")
    assert man.counters.extra["sink_errors"] == {"Broken": 2}
    # The trace itself is complete.
    tr = moescope.open(tmp_path / "run")
    rows = tr.sql("SELECT layer, expert, sum(tokens) AS n FROM expert_load GROUP BY ALL ORDER BY ALL").fetchall()
    assert [int(n) for *_, n in rows] == seen[0].tolist() + seen[1].tolist()


def test_sink_tags_keep_only_those_forwards(tmp_path: Path) -> None:
    every, train_only = Keep(), Keep(tags=[""])
    model = FixedMoE()
    with moescope.record(model, tmp_path / "run", flush_every=2, sinks=[every, train_only]) as rec:
        for step, batch in enumerate(BATCHES[:2]):
            rec.step = step
            model(torch.tensor([batch]))
        with rec.tag("val"):
            model(torch.tensor([[3, 3, 3, 3]]))  # layer 0: 4 more on expert 3; layer 1: 4 more on expert 0
    assert [f.counts[0].tolist() for f in train_only.got] == [COUNTS[1][0]]
    assert [f.counts[0].tolist() for f in every.got] == [[6, 1, 1, 4]]
    assert every.got[0].metrics()["moescope/layer1/min_utilization"] == pytest.approx(4 * 1 / 12)


def test_hand_built_flush_and_one_computation_for_all_sinks(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    import moescope.integrations.sinks as S

    load = pa.table({"run": ["r"] * 4, "rank": pa.array([2] * 4, pa.int16()), "step": [7] * 4, "tag": [""] * 4,
                     "layer": pa.array([5] * 4, pa.int16()), "expert": pa.array(range(4), pa.int16()),
                     "tokens": [3, 1, 0, 0]})
    calls = []
    real = S.flush_scalars
    monkeypatch.setattr(S, "flush_scalars", lambda t, tags: calls.append(tags) or real(t, tags))
    sinks = [Keep(), Keep(), Keep(tags=["val"])]
    for sink in sinks:
        sink.write_flush({"expert_load": load})
    assert len(calls) == 2  # the two sinks reading every tag share one computation
    (f,) = sinks[0].got
    assert (f.run, f.rank, f.step_start, f.step_end) == ("r", 2, 7, 7) and sinks[1].got == [f]
    assert f.metrics() == pytest.approx({"moescope/layer5/load_cv": math.sqrt(1.5), "moescope/layer5/maxvio": 2.0,
                                         "moescope/layer5/entropy_norm": _h(.75, .25),
                                         "moescope/layer5/dead_experts": 2.0, "moescope/layer5/min_utilization": 0.0})
    assert sinks[2].got == []  # no "val" forwards: nothing to log, not a row of NaN


def test_callbacks_pass_sinks_to_their_recorder(tmp_path: Path) -> None:
    """The Lightning and HF callbacks' shared session takes `sinks=` like any capture option."""
    from moescope.integrations._base import RecordingSession

    keep, model = Keep(tags=[""]), FixedMoE()
    session = RecordingSession(tmp_path / "run", sinks=[keep], flush_every=2, alerts=False)
    session.start(model, 0, None)
    for step, batch in enumerate(BATCHES):
        session.set_step(step)
        model(torch.tensor([batch]))
        session.end_step()
    session.close()
    assert [f.step_end for f in keep.got] == [1, 3]
    assert [f.metrics() for f in keep.got] == [pytest.approx(_flat(1)), pytest.approx(_flat(3))]
    assert [m for _, m in session.history] == [f.metrics() for f in keep.got]  # what the trainers' loggers get


def test_sinks_must_have_write_flush(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="has no write_flush"):
        moescope.record(FixedMoE(), tmp_path / "run", sinks=[print])


def _wandb_history(run_dir: Path, wait_s: float = 60.0) -> list[dict[str, Any]]:
    """History rows of an offline run, read from its run-*.wandb transaction log (LevelDB log records of
    `wandb_internal_pb2.Record`: 7-byte file header, 32 KiB blocks, records split FULL/FIRST/MIDDLE/LAST).

    wandb-core may still be writing the log when `finish()` returns: read until its `exit` record is there."""
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        records = _wandb_records(path.read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def _wandb_records(data: bytes) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


@pytest.mark.parametrize("user_logs", [True, False], ids=["beside-user-logs", "alone"])
def test_wandb_offline_run_holds_each_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_logs: bool) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="moescope-test", dir=str(tmp_path), settings=wandb.Settings(x_disable_stats=True))
    model = FixedMoE()
    try:
        with moescope.record(model, tmp_path / "trace", flush_every=2, sinks=[moescope.sinks.WandB(run)]) as rec:
            for step, batch in enumerate(BATCHES):
                if user_logs:  # the caller logs at explicit steps before and after the step change that flushes
                    run.log({"lr": float(-step)}, step=step)
                rec.step = step
                model(torch.tensor([batch]))
                if user_logs:
                    run.log({"loss": float(step)}, step=step)
    finally:
        run.finish()
    history = _wandb_history(Path(run.dir).parent)
    rows = [r for r in history if "moescope/step" in r]
    assert [r["moescope/step"] for r in rows] == [1, 3]
    for r in rows:
        got = {k: v for k, v in r.items() if k.startswith("moescope/layer")}
        assert got == pytest.approx(_flat(r["moescope/step"]))
    if user_logs:
        # None of the caller's values is dropped, and each stays in the row of its step.
        assert sorted((r["_step"], r.get("lr"), r.get("loss")) for r in history if "loss" in r or "lr" in r) == [
            (s, -s, s) for s in range(4)]


def test_mlflow_file_store_holds_each_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    # MLflow 3 keeps the file store in maintenance mode behind this switch; it is the store that needs no server.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # CI has no network to send it to
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            seen = _train(tmp_path / "trace", [moescope.sinks.MLflow()])
    finally:
        mlflow.set_tracking_uri(None)
    _check_dispatched(seen)
    client = mlflow.tracking.MlflowClient(uri)
    for layer in (0, 1):
        for name in METRICS:
            hist = client.get_metric_history(active.info.run_id, f"moescope/layer{layer}/{name}")
            assert [m.step for m in hist] == [1, 3]
            assert [m.value for m in hist] == pytest.approx([EXPECTED[s][layer][name] for s in (1, 3)])


def test_tensorboard_events_hold_each_flush(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = moescope.sinks.TensorBoard(tmp_path / "tb")
    try:
        seen = _train(tmp_path / "trace", [sink])
    finally:
        sink.close()
    _check_dispatched(seen)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for layer in (0, 1):
        for name in METRICS:
            ev = acc.Scalars(f"moescope/layer{layer}/{name}")
            assert [e.step for e in ev] == [1, 3]
            assert [e.value for e in ev] == pytest.approx([EXPECTED[s][layer][name] for s in (1, 3)], abs=1e-6)
        hist = acc.Histograms(f"moescope/layer{layer}/expert_load")
        assert [(h.step, list(h.histogram_value.bucket)) for h in hist] == [
            (s, [float(c) for c in COUNTS[s][layer]]) for s in (1, 3)]


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET the endpoint and parse it with prometheus_client's reference parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        assert fam.type == "gauge"
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _gauges(step: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    exp = {(f"moescope_{k}", (("layer", str(layer)), ("rank", "0"), ("run", "run"))): float(v)
           for layer, d in EXPECTED[step].items() for k, v in d.items()}
    exp[("moescope_window_last_step", (("rank", "0"), ("run", "run")))] = float(step)
    return exp


def test_prometheus_endpoint_is_scraped_over_http(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    with Prometheus(port=0) as prom:
        assert prom.host == "127.0.0.1" and prom.port and prom.port > 0
        assert prom._server is not None and prom._server.server_address[0] == "127.0.0.1"
        assert _scrape(prom.url) == {}  # before any flush: no gauges, still a valid page
        model, scrapes = FixedMoE(), []
        with moescope.record(model, tmp_path / "run", flush_every=2, sinks=[prom]) as rec:
            for step, batch in enumerate(BATCHES):
                rec.step = step
                model(torch.tensor([batch]))
                scrapes.append(_scrape(prom.url))
        # A window flushes when the next one starts (step 2) and at close: the page shows the last flushed
        # window, never a partial one.
        assert scrapes[0] == scrapes[1] == {}
        assert scrapes[2] == scrapes[3] == pytest.approx(_gauges(1))
        assert _scrape(prom.url) == pytest.approx(_gauges(3))
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(prom.url.replace("/metrics", "/other"), timeout=10)
        assert err.value.code == 404
        url = prom.url
    with pytest.raises(urllib.error.URLError):  # closed: the port is released
        urllib.request.urlopen(url, timeout=5)


def test_prometheus_gauges_join_an_existing_registry(tmp_path: Path) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Gauge("app_requests", "the serving process' own gauge", registry=registry).set(7)
    with Prometheus(port=None, registry=registry) as prom:
        assert prom.url is None
        _train(tmp_path / "run", [prom])
        text = prometheus_client.generate_latest(registry).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith("moescope_")}
    assert got == pytest.approx(_gauges(3))
    assert "app_requests 7.0" in text
    assert "moescope_" not in prometheus_client.generate_latest(registry).decode()  # close() left the registry


def test_sinks_import_no_backend_until_built() -> None:
    code = ("import sys, moescope, moescope.sinks; "
            "print(sorted(m for m in ('torch', 'wandb', 'mlflow', 'tensorboard', 'prometheus_client') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"

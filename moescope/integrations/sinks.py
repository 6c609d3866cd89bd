"""Metric sinks: the per-layer load scalars of every flush, sent to W&B, MLflow, TensorBoard or a Prometheus endpoint.

    with moescope.record(model, "traces/run-a", sinks=[moescope.sinks.WandB(run), moescope.sinks.Prometheus()]):
        ...

The recorder calls `sink.write_flush(tables)` after each flush (the `sinks` capture option); `MetricSink` turns
the flush's `expert_load` into `FlushScalars` with `_scalars.flush_scalars` — the same scalars, names and
formulas the Lightning and HF callbacks log — and hands them to `write`. A sink that raises is warned about once
and counted in the manifest (`counters.extra.sink_errors`); training goes on. The recorder never closes a sink:
the run, writer or endpoint is the caller's (close it, or use the sink as a context manager).

wandb, mlflow, tensorboard and prometheus_client are imported when a sink is built, never at moescope import.
The Prometheus endpoint is served by the standard library (no prometheus_client needed); prometheus_client is
only used to add the gauges to a registry you already serve (`Prometheus(port=None, registry=REGISTRY)`).
"""

from __future__ import annotations

import http.server
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa

from ._base import add_expert_histogram
from ._scalars import FlushScalars, LoadScalars, flush_scalars

__all__ = ["FlushScalars", "LoadScalars", "MLflow", "MetricSink", "Prometheus", "TensorBoard", "WandB"]

#: What each per-layer scalar means, for Prometheus' HELP lines (names are `LoadScalars.as_metrics`' own).
HELP = {
    "load_cv": "coefficient of variation of per-expert assignments in the last flushed window (0 = even)",
    "maxvio": "MaxVio: max expert load / mean load - 1 in the last flushed window (0 = even)",
    "entropy_norm": "entropy of the per-expert load / ln N in the last flushed window (1 = uniform)",
    "dead_experts": "experts whose N*f is below the dead_expert rule's fail_below in the last flushed window",
    "min_utilization": "min over experts of N*f (1 = fair share, 0 = an expert got nothing) in the last window",
}

_memo_lock = threading.Lock()
_memo: tuple[weakref.ref[pa.Table], frozenset[str] | None, FlushScalars | None] | None = None


def _scalars_of(tables: Mapping[str, pa.Table], tags: frozenset[str] | None) -> FlushScalars | None:
    """`flush_scalars` once per flush, however many sinks read it (a weak reference: the table is not kept)."""
    global _memo
    load = tables.get("expert_load")
    if load is None:
        return None
    with _memo_lock:
        if _memo is not None and _memo[0]() is load and _memo[1] == tags:
            return _memo[2]
        fs = flush_scalars(tables, tags)
        _memo = (weakref.ref(load), tags, fs)
        return fs


class MetricSink:
    """Base of the metric sinks: `write_flush(tables)` (what the recorder calls) → `write(FlushScalars)`."""

    #: The name warnings and the manifest's `sink_errors` use (default: the class name).
    name: str = ""

    def __init__(self, *, tags: Iterable[str] | None = None, prefix: str = "moescope") -> None:
        """`tags`: the data-slice tags whose forwards count (default all); `prefix`: the metric names' first part."""
        self.tags = None if tags is None else frozenset(str(t) for t in tags)
        self.prefix = prefix

    def write_flush(self, tables: Mapping[str, pa.Table]) -> None:
        """Compute this flush's per-layer scalars and write them (nothing when no layer had assignments)."""
        fs = _scalars_of(tables, self.tags)
        if fs is not None:
            self.write(fs)

    def write(self, flush: FlushScalars) -> None:
        """Send one flush's scalars to the backend (subclasses implement this)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink opened itself (nothing by default)."""

    def __enter__(self) -> MetricSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _need(module: str, pip: str) -> Any:
    """Import an optional backend, or an ImportError that says what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this moescope sink needs {pip}: pip install {pip}  ({e})") from None


class WandB(MetricSink):
    """Log each flush to a Weights & Biases run against its own x-axis `moescope/step` (the window's last step).

    W&B keeps one value per key per history row, and a row it has committed refuses later logs at its step.
    So a flush joins the caller's current row (`commit=False`, committed by the caller's next step or by
    `finish()`), and only when the previous flush is still waiting in that same row is the row committed first.
    """

    def __init__(self, run: Any = None, *, step_metric: str | None = None, tags: Iterable[str] | None = None,
                 prefix: str = "moescope") -> None:
        """`run`: a `wandb.init()` run (default: the active `wandb.run` at each flush)."""
        super().__init__(tags=tags, prefix=prefix)
        self._wandb = _need("wandb", "wandb")
        self.run = run
        self.step_metric = step_metric or f"{prefix}/step"
        self._defined: set[int] = set()
        self._pending: dict[int, int] = {}  # id(run) -> run.step of the row holding our last flush

    def write(self, flush: FlushScalars) -> None:
        """`run.log` the flat metrics with the step as a metric, never with `step=` (W&B's `_step` is the caller's)."""
        run = self.run if self.run is not None else self._wandb.run
        if run is None:
            raise RuntimeError("no active W&B run: call wandb.init() before training or pass WandB(run)")
        if id(run) not in self._defined:
            # A custom x-axis (as Lightning's WandbLogger does): the window's step is a metric of the row, so
            # log() needs no step= and W&B's own row counter stays the caller's.
            run.define_metric(self.step_metric)
            run.define_metric(f"{self.prefix}/*", step_metric=self.step_metric)
            self._defined.add(id(run))
        if self._pending.get(id(run)) == run.step:
            run.log({}, commit=True)  # nobody committed since our last flush: keep it rather than overwrite it
        run.log({**flush.metrics(self.prefix), self.step_metric: flush.step_end}, commit=False)
        self._pending[id(run)] = run.step


class MLflow(MetricSink):
    """Log each flush to an MLflow run (metrics `moescope/layer{L}/…` at step = the window's last step)."""

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 tags: Iterable[str] | None = None, prefix: str = "moescope") -> None:
        """`run_id`: the run to log to (default: `mlflow.active_run()` at each flush); `tracking_uri` its store."""
        super().__init__(tags=tags, prefix=prefix)
        self._mlflow = _need("mlflow", "mlflow-skinny")
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._clients: dict[str, Any] = {}  # tracking URI -> MlflowClient

    def write(self, flush: FlushScalars) -> None:
        """One `log_batch` per flush (chunked at MLflow's 1,000 metrics per batch)."""
        from mlflow.entities import Metric

        run_id = self.run_id
        if run_id is None:
            active = self._mlflow.active_run()
            if active is None:
                raise RuntimeError("no active MLflow run: call mlflow.start_run() or pass MLflow(run_id)")
            run_id = active.info.run_id
        # Resolved at each flush, so a set_tracking_uri() after the sink was built is followed.
        uri = self.tracking_uri or self._mlflow.get_tracking_uri()
        if uri not in self._clients:
            self._clients[uri] = self._mlflow.tracking.MlflowClient(uri)
        client = self._clients[uri]
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, flush.step_end) for k, v in flush.metrics(self.prefix).items()]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i:i + 1000])


class TensorBoard(MetricSink):
    """Write each flush as TensorBoard scalars (and a one-bin-per-expert load histogram per layer)."""

    def __init__(self, logdir: str | os.PathLike[str] | None = None, *, writer: Any = None, histograms: bool = True,
                 tags: Iterable[str] | None = None, prefix: str = "moescope") -> None:
        """Either `logdir` (a `SummaryWriter` is opened there) or an open `writer` with add_scalar (yours to close)."""
        super().__init__(tags=tags, prefix=prefix)
        if (logdir is None) == (writer is None):
            raise ValueError("TensorBoard sink: pass exactly one of logdir or writer")
        self._own = writer is None
        if writer is None:
            _need("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=os.fspath(logdir))  # type: ignore[arg-type]
        self.writer = writer
        self.histograms = histograms

    def write(self, flush: FlushScalars) -> None:
        """add_scalar per metric at the window's last step, then flush so a reader sees it now."""
        for k, v in flush.metrics(self.prefix).items():
            self.writer.add_scalar(k, v, global_step=flush.step_end)
        if self.histograms and hasattr(self.writer, "add_histogram_raw"):
            for layer, c in flush.counts.items():
                add_expert_histogram(self.writer, layer, flush.step_end, c)
        self.writer.flush()

    def close(self) -> None:
        """Close the writer this sink opened (a writer passed in stays open)."""
        if self._own:
            self.writer.close()


def _label(v: object) -> str:
    """A label value escaped as the Prometheus text format requires."""
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Prometheus(MetricSink):
    """Serve the last flushed window's per-layer scalars as Prometheus gauges on `/metrics`.

    Gauges `moescope_{load_cv,maxvio,entropy_norm,dead_experts,min_utilization}{run,rank,layer}` and
    `moescope_window_last_step{run,rank}`; each run's gauges are replaced at each of its flushes.
    """

    def __init__(self, port: int | None = 0, *, host: str = "127.0.0.1", registry: Any = None,
                 tags: Iterable[str] | None = None, prefix: str = "moescope") -> None:
        """`port` 0 = an ephemeral port (read `.port`/`.url`); None = no server (use `registry`); `host` 127.0.0.1."""
        super().__init__(tags=tags, prefix=prefix)
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, int], FlushScalars] = {}
        self._server: http.server.ThreadingHTTPServer | None = None
        self._registry = registry
        self._collector: Any = None
        self.port: int | None = None
        if registry is not None:
            self._collector = _Collector(self)
            registry.register(self._collector)
        if port is not None:
            sink = self

            class Handler(http.server.BaseHTTPRequestHandler):
                def do_GET(self) -> None:  # noqa: N802 - the http.server name
                    if self.path.split("?", 1)[0] != "/metrics":
                        self.send_error(404, "moescope serves /metrics only")
                        return
                    body = sink.exposition().encode("utf-8")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not news
                    pass

            self._server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
            self._server.daemon_threads = True
            self.port = int(self._server.server_address[1])
            self.host = host
            threading.Thread(target=self._server.serve_forever, name="moescope-prometheus", daemon=True).start()

    @property
    def url(self) -> str | None:
        """The endpoint's URL (None without a server)."""
        return None if self.port is None else f"http://{self.host}:{self.port}/metrics"

    def write(self, flush: FlushScalars) -> None:
        """Replace this (run, rank)'s gauges with the flush's layers."""
        with self._lock:
            self._runs[(flush.run, flush.rank)] = flush

    def samples(self) -> Iterator[tuple[str, str, list[tuple[dict[str, str], float]]]]:
        """(gauge name, help, [(labels, value)]) of every gauge, from the last flush of each run."""
        with self._lock:
            runs = sorted(self._runs.items())
        per: dict[str, list[tuple[dict[str, str], float]]] = {}
        for (run, rank), fs in runs:
            for s in fs.layers:
                for key, v in s.as_metrics(self.prefix).items():
                    per.setdefault(key.rsplit("/", 1)[1], []).append(
                        ({"run": run, "rank": str(rank), "layer": str(s.layer)}, float(v)))
        for name, rows in per.items():
            yield f"{self.prefix}_{name}", HELP.get(name, name), rows
        if runs:
            yield (f"{self.prefix}_window_last_step", "last step of the last flushed window",
                   [({"run": run, "rank": str(rank)}, float(fs.step_end)) for (run, rank), fs in runs])

    def exposition(self) -> str:
        """The Prometheus text format (0.0.4) of every gauge."""
        lines: list[str] = []
        for name, help_, rows in self.samples():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
            for labels, v in rows:
                lab = ",".join(f'{k}="{_label(x)}"' for k, x in labels.items())
                lines.append(f"{name}{{{lab}}} {_num(v)}")
        return "\n".join(lines) + "\n" if lines else ""

    def close(self) -> None:
        """Stop the server and leave the registry (idempotent)."""
        srv, self._server = self._server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        col, self._collector = self._collector, None
        if col is not None:
            self._registry.unregister(col)


class _Collector:
    """The gauges as a prometheus_client collector, for a registry the process already serves."""

    def __init__(self, sink: Prometheus) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for name, help_, rows in self.sink.samples():
            labels = list(rows[0][0]) if rows else []
            g = GaugeMetricFamily(name, help_, labels=labels)
            for lab, v in rows:
                g.add_metric([lab[k] for k in labels], v)
            yield g


"""Writing trace files: atomic Parquet parts (with page checksums), the manifest, and the background writer thread."""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import Manifest, TraceError, atomic_write_bytes, manifest_name, now_utc
from .schema import FORMAT, FORMAT_VERSION, META_KEY, TABLES

__all__ = ["TraceError", "manifest_name", "write_manifest", "read_manifest", "write_part", "write_run", "TraceWriter",
           "next_part_seq", "atomic_write_bytes", "WriterStats", "Manifest"]

_PART_RE = re.compile(r"^part-(\d+)-(\d{6})\.parquet$")
#: Row groups of at least this many rows keep column statistics useful and readers fast.
ROW_GROUP_ROWS = 1_000_000


def _version() -> str:
    from .. import __version__

    return __version__


def write_part(run_dir: str | Path, table: str, rank: int, seq: int, data: pa.Table) -> Path:
    """Write one Parquet part of `table` atomically; returns its final path."""
    schema = TABLES[table]
    data = data.select(schema.names).cast(schema)
    data = data.replace_schema_metadata({META_KEY: str(FORMAT_VERSION).encode()})
    out = Path(run_dir) / table / f"part-{rank}-{seq:06d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    pq.write_table(
        data,
        tmp,
        compression="zstd",
        compression_level=3,
        row_group_size=ROW_GROUP_ROWS,
        # Dictionaries help ids and keys, not half floats (byte-stream-split would help those, but DuckDB
        # cannot read it for FLOAT16).
        use_dictionary=[f.name if not pa.types.is_list(f.type) else f"{f.name}.list.element"
                        for f in schema if f.type not in (pa.float16(), pa.list_(pa.float16()))],
        write_statistics=True,
        # A CRC per page: a flipped or zeroed page is an error when read (moescope.format.reader), not other numbers.
        write_page_checksum=True,
    )
    os.replace(tmp, out)
    return out


def next_part_seq(run_dir: str | Path, rank: int) -> int:
    """First unused part number for `rank` across all tables (so a resumed run never overwrites)."""
    best = -1
    root = Path(run_dir)
    for table in TABLES:
        d = root / table
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _PART_RE.match(p.name)
            if m and int(m.group(1)) == rank:
                best = max(best, int(m.group(2)))
    return best + 1


def write_manifest(run_dir: str | Path, manifest: Manifest | dict[str, Any], rank: int = 0) -> Path:
    """Write a run's manifest atomically; a dict is validated through `Manifest` first (one schema)."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict({"format": FORMAT, "version": FORMAT_VERSION, **manifest},
                                      Path(run_dir) / manifest_name(rank))
    return manifest.write(run_dir, rank)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """A run's primary manifest, validated, as its JSON dict (`Manifest.read_run` gives the typed form)."""
    return Manifest.read_run(run_dir).to_dict()


@dataclass
class WriterStats:
    """Counters the writer keeps for the manifest."""

    parts_written: int = 0
    rows_written: dict[str, int] = field(default_factory=dict)
    dropped_flushes: int = 0
    dropped_rows: int = 0
    bytes_written: int = 0
    errors: list[str] = field(default_factory=list)


class TraceWriter:
    """A background thread that turns flushed batches into Parquet parts, with a bounded memory queue.

    `submit` takes a callable producing {table: pa.Table}; the callable runs on the writer thread, so Arrow
    conversion and compression never block the training loop. When the queued bytes exceed `max_queue_bytes`,
    `on_full="block"` waits and `on_full="drop"` discards the batch and counts it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        rank: int = 0,
        max_queue_bytes: int = 256 << 20,
        on_full: str = "block",
    ) -> None:
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.max_queue_bytes = max_queue_bytes
        self.on_full = on_full
        self.stats = WriterStats()
        self._seq = next_part_seq(self.run_dir, rank)
        self._q: queue.Queue[tuple[Callable[[], dict[str, pa.Table]], int, int] | None] = queue.Queue()
        self._queued_bytes = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="moescope-writer", daemon=True)
        self._thread.start()

    def submit(self, make: Callable[[], dict[str, pa.Table]], nbytes: int, nrows: int = 0) -> bool:
        """Queue one flush; returns False when it was dropped because the queue was full."""
        with self._cv:
            if self._queued_bytes > 0 and self._queued_bytes + nbytes > self.max_queue_bytes:
                if self.on_full == "drop":
                    self.stats.dropped_flushes += 1
                    self.stats.dropped_rows += nrows
                    return False
                while self._queued_bytes > 0 and self._queued_bytes + nbytes > self.max_queue_bytes:
                    self._cv.wait(timeout=1.0)
            self._queued_bytes += nbytes
        self._q.put((make, nbytes, nrows))
        return True

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            make, nbytes, _ = item
            try:
                tables = make()
                for name, tbl in tables.items():
                    if tbl.num_rows == 0:
                        continue
                    path = write_part(self.run_dir, name, self.rank, self._seq, tbl)
                    self.stats.parts_written += 1
                    self.stats.rows_written[name] = self.stats.rows_written.get(name, 0) + tbl.num_rows
                    self.stats.bytes_written += path.stat().st_size
                self._seq += 1
            except Exception as e:  # a failed write must not kill training; it is reported at close
                self.stats.errors.append(f"{e.__class__.__name__}: {e}")
            finally:
                with self._cv:
                    self._queued_bytes -= nbytes
                    self._cv.notify_all()
                self._q.task_done()

    def wait(self) -> None:
        """Block until every queued flush is on disk."""
        self._q.join()

    def close(self, timeout: float = 600.0) -> None:
        """Drain the queue and stop the thread."""
        self._q.put(None)
        t0 = time.monotonic()
        self._thread.join(timeout=max(0.0, timeout - (time.monotonic() - t0)))


def write_run(
    run_dir: str | Path,
    tables: dict[str, Any],
    *,
    run: str | None = None,
    layers: list[dict[str, Any]] | None = None,
    rank: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a whole run from DataFrames or Arrow tables (hand-built traces for tests, conversions, tools).

    Missing `run`/`rank` columns are filled in; every other column must match the trace schema.
    """
    run_dir = Path(run_dir)
    run = run or run_dir.name
    seq = next_part_seq(run_dir, rank)
    for name, data in tables.items():
        tbl = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
        if "run" not in tbl.column_names:
            tbl = tbl.append_column("run", pa.array([run] * tbl.num_rows, pa.string()))
        if "rank" not in tbl.column_names:
            tbl = tbl.append_column("rank", pa.array([rank] * tbl.num_rows, pa.int16()))
        for f in TABLES[name]:
            if f.name not in tbl.column_names and f.name in ("tag",):
                tbl = tbl.append_column("tag", pa.array([""] * tbl.num_rows, pa.string()))
            if f.name not in tbl.column_names and name == "router_stats":
                tbl = tbl.append_column(f.name, pa.array([0] * tbl.num_rows, f.type))
        write_part(run_dir, name, rank, seq, tbl)
    if not (run_dir / manifest_name(rank)).exists():
        body = {"run": run, "created": now_utc(), "moescope_version": _version(),
                "model": {"class": "hand-built", "n_params": 0}, "layers": layers or [], **(extra or {})}
        write_manifest(run_dir, body, rank)  # through Manifest: hand-built traces meet the same schema
    return run_dir

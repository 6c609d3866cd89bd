"""Writing trace files: atomic Parquet parts (with page checksums), the manifest, and the background writer thread."""

from __future__ import annotations

import os
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import Manifest, TraceError, atomic_write_bytes, manifest_name, now_utc
from .schema import FORMAT, FORMAT_VERSION, META_KEY, TABLES
from .storage import AnyPath, RemotePath, as_path, list_names

__all__ = ["TraceError", "manifest_name", "write_manifest", "read_manifest", "write_part", "write_run", "TraceWriter",
           "next_part_seq", "atomic_write_bytes", "WriterStats", "Manifest", "set_aside_torn", "step_ranges"]

_PART_RE = re.compile(r"^part-(\d+)-(\d{6})\.parquet$")
#: A part `moescope compact` merged from the parts numbered FIRST..LAST of one rank (moescope.format.compact).
MERGED_RE = re.compile(r"^part-(\d+)-(\d{6})-(\d{6})\.parquet$")
#: Row groups of at least this many rows keep column statistics useful and readers fast.
ROW_GROUP_ROWS = 1_000_000


def _version() -> str:
    from .. import __version__

    return __version__


def write_part(run_dir: str | Path | RemotePath, table: str, rank: int, seq: int, data: pa.Table) -> AnyPath:
    """Write one Parquet part of `table` atomically (an object store: one PUT); returns its final path."""
    schema = TABLES[table]
    data = data.select(schema.names).cast(schema)
    data = data.replace_schema_metadata({META_KEY: str(FORMAT_VERSION).encode()})
    out = as_path(run_dir) / table / f"part-{rank}-{seq:06d}.parquet"
    if isinstance(out, RemotePath):  # the finished bytes in one PUT: the object appears whole or not at all
        sink = pa.BufferOutputStream()
        _write_parquet(data, sink, schema)
        out.write_bytes(sink.getvalue().to_pybytes())
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _write_parquet(data, tmp, schema)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written temporary would keep the disk full
        raise
    os.replace(tmp, out)
    return out


def _write_parquet(data: pa.Table, tmp: Path | pa.NativeFile, schema: pa.Schema) -> None:
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


def next_part_seq(run_dir: str | Path | RemotePath, rank: int) -> int:
    """First unused part number for `rank` across all tables (so a resumed run never overwrites).

    Merged parts count with the last number they cover: numbers are never reused after a compaction either.
    """
    best = -1
    root = as_path(run_dir)
    for table in TABLES:
        for name in list_names(root / table):
            m = _PART_RE.match(name) or MERGED_RE.match(name)
            if m and int(m.group(1)) == rank:
                best = max(best, int(m.group(m.lastindex or 2)))
    return best + 1


def set_aside_torn(run_dir: str | os.PathLike[str], rank: int) -> list[Path]:
    """Rename the parts of an unfinished last flush of `rank` (a crash between its tables) to `*.torn`.

    Every flush writes its router_stats and expert_load parts under one part number. Parts numbered after the
    last number both tables have come from a flush a crash cut short: without them every table ends at the
    same step, so a resumed recorder rewrites those steps in every table (and nothing is counted twice).
    """
    root = as_path(run_dir)
    seqs: dict[str, dict[int, AnyPath]] = {}
    merged: dict[str, int] = {}  # table -> last part number a merged part covers (compaction merges whole flushes)
    for table in ("expert_load", "router_stats", "routing"):
        d = root / table
        seqs[table] = {}
        for name in list_names(d):
            m = _PART_RE.match(name)
            if m and int(m.group(1)) == rank:
                seqs[table][int(m.group(2))] = d / name
            mm = MERGED_RE.match(name)
            if mm and int(mm.group(1)) == rank:
                merged[table] = max(merged.get(table, -1), int(mm.group(3)))
    if not seqs["router_stats"] and "router_stats" not in merged:
        return []  # a hand-built trace with load counts only: nothing pairs up, nothing to judge
    both = set(seqs["expert_load"]) & set(seqs["router_stats"])
    # Compaction only merges flushes both tables hold, so a merged range is a committed one.
    last = max(both | {min(merged.get("expert_load", -1), merged.get("router_stats", -1))})
    moved = []
    for parts in seqs.values():
        for seq, p in parts.items():
            if seq > last:
                torn = p.with_name(p.name + ".torn")
                if isinstance(p, RemotePath):  # an object store cannot rename: copy, then delete
                    p.rename(torn)
                else:
                    os.replace(p, torn)
                moved.append(torn)
    return sorted(moved)  # type: ignore[type-var]


def write_manifest(run_dir: str | Path, manifest: Manifest | dict[str, Any], rank: int = 0) -> Path:
    """Write a run's manifest atomically; a dict is validated through `Manifest` first (one schema)."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict({"format": FORMAT, "version": FORMAT_VERSION, **manifest},
                                      as_path(run_dir) / manifest_name(rank))
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
    #: steps whose rows never reached the disk (failed writes and dropped flushes), as [first, last] ranges
    lost_steps: list[list[int]] = field(default_factory=list)

    def lose(self, steps: Iterable[int]) -> None:
        """Add `steps` to the lost ranges (merged, sorted)."""
        self.lost_steps = step_ranges([s for a, b in self.lost_steps for s in range(a, b + 1)] + list(steps))


def step_ranges(steps: Iterable[int]) -> list[list[int]]:
    """Sorted steps as merged [first, last] ranges: [1, 2, 3, 7] -> [[1, 3], [7, 7]]."""
    out: list[list[int]] = []
    for s in sorted(set(int(x) for x in steps)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _fmt_steps(steps: list[int]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in step_ranges(steps)) or "none"


class TraceWriter:
    """A background thread that turns flushed batches into Parquet parts, with a bounded memory queue.

    `submit` takes a callable producing {table: pa.Table}; the callable runs on the writer thread, so Arrow
    conversion and compression never block the training loop. When the queued bytes exceed `max_queue_bytes`,
    `on_full="block"` waits and `on_full="drop"` discards the batch and counts it.

    Every loss (a failed write, a dropped flush) is counted in `stats` with its steps, warned about once when
    it happens (later ones are counted, not repeated), and passed to `on_loss` (the recorder rewrites its
    manifest there, so the loss is on disk even if the process dies next). A flush whose write fails is removed
    whole (no table keeps steps another lacks), and its part number is never reused.
    """

    def __init__(
        self,
        run_dir: str | Path,
        rank: int = 0,
        max_queue_bytes: int = 256 << 20,
        on_full: str = "block",
        on_loss: Callable[[str], None] | None = None,
    ) -> None:
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        self.run_dir = as_path(run_dir)
        self.rank = rank
        self.max_queue_bytes = max_queue_bytes
        self.on_full = on_full
        self.stats = WriterStats()
        self.on_loss = on_loss
        self._warned = False
        self._seq = next_part_seq(self.run_dir, rank)
        self._q: queue.Queue[tuple[Callable[[], dict[str, pa.Table]], int, int, list[int]] | None] = queue.Queue()
        self._queued_bytes = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="moescope-writer", daemon=True)
        self._thread.start()

    def submit(self, make: Callable[[], dict[str, pa.Table]], nbytes: int, nrows: int = 0,
               steps: Iterable[int] = ()) -> bool:
        """Queue one flush of `steps`; returns False when it was dropped because the queue was full."""
        steps = sorted(set(int(s) for s in steps))
        with self._cv:
            if self._queued_bytes > 0 and self._queued_bytes + nbytes > self.max_queue_bytes:
                if self.on_full == "drop":
                    self.stats.dropped_flushes += 1
                    self.stats.dropped_rows += nrows
                    self.stats.lose(steps)
                    self._report(f"dropped a flush of steps {_fmt_steps(steps)} ({nrows} token rows): the "
                                 f"writer queue was full (on_full='drop', max_queue_mb="
                                 f"{self.max_queue_bytes / (1 << 20):g})")
                    return False
                while self._queued_bytes > 0 and self._queued_bytes + nbytes > self.max_queue_bytes:
                    self._cv.wait(timeout=1.0)
            self._queued_bytes += nbytes
        self._q.put((make, nbytes, nrows, steps))
        return True

    def _report(self, what: str) -> None:
        """Warn about the first loss (naming it); count every loss; tell `on_loss`."""
        if not self._warned:
            self._warned = True
            warnings.warn(f"moescope: {self.run_dir}: {what}; later losses are counted in the manifest and "
                          "reported by `moescope check`", RuntimeWarning, stacklevel=3)
        if self.on_loss is not None:
            try:
                self.on_loss(what)
            except Exception:  # noqa: S110 - the loss is counted already; a full disk may refuse the manifest too
                pass

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            make, nbytes, _, steps = item
            written: list[tuple[str, AnyPath, int]] = []
            name = "?"
            try:
                tables = make()
                # expert_load last: its part is the flush's commit mark (resume reads the last step from it).
                for name, tbl in sorted(tables.items(), key=lambda kv: kv[0] == "expert_load"):
                    if tbl.num_rows == 0:
                        continue
                    path = write_part(self.run_dir, name, self.rank, self._seq, tbl)
                    written.append((name, path, tbl.num_rows))
                for name, path, n in written:
                    self.stats.parts_written += 1
                    self.stats.rows_written[name] = self.stats.rows_written.get(name, 0) + n
                    self.stats.bytes_written += path.stat().st_size
            except Exception as e:  # a failed write must not kill training: remove the flush whole, report it
                for _, path, _ in written:
                    path.unlink(missing_ok=True)
                cause = f"{e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                self.stats.errors.append(f"{name} part {self._seq} (steps {_fmt_steps(steps)}): {cause}")
                self.stats.lose(steps)
                self._report(f"writing {name} for steps {_fmt_steps(steps)} failed ({cause})")
            finally:
                self._seq += 1  # never reused, even after a failure: a later flush cannot overwrite a part
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
    run_dir = as_path(run_dir)
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

"""Compaction: merge a run's small parts into large row groups without a reader ever seeing a row missing or twice.

A recorder writes one small part per table and flush (`TABLE/part-R-SEQ.parquet`). `compact_run` merges the parts
of one rank and table into `TABLE/part-R-FIRST-LAST.parquet` (the part numbers it covers, so numbers are never
reused), in row groups of `writer.ROW_GROUP_ROWS`, with page checksums like every part.

The protocol (one compaction record per run, `RUN/.moescope-compaction.json`, replaced atomically, never deleted):

1. the merged part is written under a temporary name (`.NAME.compact.tmp`: readers list `part-*` only) and verified;
2. the record gains one entry per source, `"TABLE/part-0-000003.parquet": "TABLE/part-0-000000-000041.parquet"`,
   and its `generation` goes up;
3. the temporary is renamed to its final name: the commit point. From here on readers honour the entries;
4. the sources are removed (after `grace_s` seconds: readers that scan part files lazily get that long to refresh);
5. entries whose source is gone are dropped from the record (generation up again).

Readers (`visible_parts`) read the record, list the part folders, and read the record again, retrying when its
generation moved; a listed part is left out when the chain of entries from it reaches a listed part. Before step 3
the chain reaches nothing (the sources count), after it the merged part (the sources are hidden, then gone). A
compaction killed at any point leaves a state readers count exactly; the next compaction rolls it back (before
step 3: temporaries deleted, entries dropped) or forward (after it: sources deleted, entries dropped).

Ranks are merged one after another, each committed (and, without a grace period, cleaned up) before the next: the
record holds one rank's entries at a time, and a run of 1,024 ranks never holds 1,024 open lock files.

Locks: one compaction per run (`RUN/.moescope-compact.lock`); each rank's lock is held while its parts are merged (a
recorder that starts then is refused, naming the compaction). A rank being recorded is compacted
only up to `up_to_step`, which must be a step it has flushed, and only whole flushes (part numbers both
expert_load and router_stats hold): a torn last flush stays for a resumed recorder to set aside.

On an object store (`s3://`) there is no rename: the merged part's one PUT, after the record's, is the commit. There
is no flock either: a rank with a lock object counts as being recorded (live or crashed: `up_to_step` required),
and a compaction lock object refuses a second compaction (a killed one leaves it; the refusal says to delete it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .lock import RunLock, RunLocked, lock_name
from .manifest import TraceError
from .reader import check_parts, part_info
from .schema import FORMAT_VERSION, META_KEY, TABLES
from .storage import AnyPath, RemotePath, as_path, list_names, open_input, write_atomic
from .writer import _PART_RE, MERGED_RE, ROW_GROUP_ROWS, _write_parquet

__all__ = ["CompactResult", "CompactUsageError", "compact_run", "visible_parts", "RECORD", "COMPACT_LOCK"]

#: The compaction record of a run (replaced atomically; kept once written, so its generation never goes back).
RECORD = ".moescope-compaction.json"
#: One compaction at a time per run.
COMPACT_LOCK = ".moescope-compact.lock"
_TMP_SUFFIX = ".compact.tmp"
#: The tables a flush writes under one part number (a flush is whole when expert_load, its commit mark, is there).
_FLUSH_TABLES = ("expert_load", "router_stats", "routing")


class CompactUsageError(ValueError):
    """A compaction that cannot be done as asked (a live rank without --up-to-step, a step not flushed yet)."""


def _at(stage: str) -> None:
    """Called at each stage of a compaction; tests replace it to kill the process there."""


@dataclass
class _Record:
    generation: int = 0
    #: "TABLE/source-name" -> ["TABLE/merged-name", unix time of the commit]
    replaced: dict[str, list[Any]] = field(default_factory=dict)


def _read_record(run_dir: AnyPath) -> _Record:
    p = run_dir / RECORD
    try:
        raw = json.loads(p.read_bytes())
    except FileNotFoundError:
        return _Record()
    except (OSError, ValueError) as e:
        raise TraceError(f"{p}: unreadable compaction record ({e.__class__.__name__})") from None
    try:
        rec = _Record(int(raw["generation"]), {str(k): [str(v[0]), float(v[1])] for k, v in raw["replaced"].items()})
    except (KeyError, TypeError, ValueError, IndexError):
        raise TraceError(f"{p}: malformed compaction record") from None
    return rec


def _write_record(run_dir: AnyPath, rec: _Record) -> None:
    rec.generation += 1
    body = {"format": "moescope-compaction", "version": 1, "generation": rec.generation, "replaced": rec.replaced}
    write_atomic(run_dir / RECORD, json.dumps(body, indent=1, sort_keys=True).encode())


def _hidden(name: str, replaced: dict[str, list[Any]], present: set[str]) -> bool:
    """True when the chain of replacements from `name` reaches a part that is there (it holds these rows)."""
    seen = {name}
    cur = name
    while cur in replaced:
        cur = replaced[cur][0]
        if cur in seen:  # a cycle cannot be written by compact_run; never loop on a hand-edited record
            return False
        if cur in present:
            return True
        seen.add(cur)
    return False


def visible_parts(run_dir: str | os.PathLike[str] | RemotePath, tables: tuple[str, ...] | None = None,
                  ) -> dict[str, list[AnyPath]]:
    """The parts a reader counts, per table: every complete part but those a committed compaction replaced."""
    root = as_path(run_dir)
    tables = tuple(TABLES) if tables is None else tables
    for _ in range(200):
        before = _read_record(root)
        listing = {t: [n for n in list_names(root / t) if n.startswith("part-") and n.endswith(".parquet")]
                   for t in tables}
        after = _read_record(root)
        if after.generation == before.generation:
            break
        time.sleep(0.01)  # a compaction moved on while we listed: list again under one record
    else:
        raise TraceError(f"{root}: the compaction record kept changing while listing the parts")
    if not before.replaced:
        return {t: [root / t / n for n in names] for t, names in listing.items()}
    present = {f"{t}/{n}" for t, names in listing.items() for n in names}
    return {t: [root / t / n for n in names if not _hidden(f"{t}/{n}", before.replaced, present)]
            for t, names in listing.items()}


@dataclass
class CompactResult:
    """What a compaction did: visible parts and their bytes before and after, the merged parts written."""

    run_dir: str
    parts_before: int = 0
    parts_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rows: int = 0  # rows in the parts merged (equal to the rows of the merged parts)
    merged: list[str] = field(default_factory=list)  # "TABLE/part-R-FIRST-LAST.parquet"
    removed: int = 0  # replaced parts deleted (this compaction's and any a killed one left)
    rolled_back: int = 0  # temporaries and entries of a compaction killed before its commit
    live_ranks: list[int] = field(default_factory=list)  # ranks a recorder held: compacted up to the step only

    @property
    def bytes(self) -> int:
        """Bytes of the visible parts after compaction."""
        return self.bytes_after

    def summary(self) -> str:
        """One line for a person."""
        return (f"{self.run_dir}: {self.parts_before:,} parts ({_mb(self.bytes_before)}) -> {self.parts_after:,} "
                f"({_mb(self.bytes_after)}); {len(self.merged)} merged part(s) of {self.rows:,} rows; "
                f"{self.removed:,} replaced part(s) removed")


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _ranks(root: Path) -> set[int]:
    ranks = {0} if (root / "manifest.json").exists() else set()
    for name in list_names(root):
        if name.startswith("manifest.rank-") and name.endswith(".json"):
            try:
                ranks.add(int(name[len("manifest.rank-"):-len(".json")]))
            except ValueError:
                pass
    for t in TABLES:
        for name in list_names(root / t):
            m = _PART_RE.match(name) or MERGED_RE.match(name)
            if m:
                ranks.add(int(m.group(1)))
    return ranks


def _seq_range(name: str) -> tuple[int, int, int] | None:
    """(rank, first, last) part numbers of a small or merged part name."""
    m = _PART_RE.match(name)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(2))
    m = MERGED_RE.match(name)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    return None


def _max_step(path: Path) -> int | None:
    """Largest step in a part (footer statistics; None when there are none)."""
    lo_hi = part_info(path).ranges.get("step")
    return None if lo_hi is None or lo_hi[1] is None else int(lo_hi[1])


def _recover(root: Path, grace_s: float, now: float, res: CompactResult) -> None:
    """Roll a killed compaction back (before its commit) or forward (after it); remove replaced parts past grace."""
    for t in TABLES:
        for name in list_names(root / t):
            if name.endswith(_TMP_SUFFIX):  # a merged part never committed
                (root / t / name).unlink(missing_ok=True)
                res.rolled_back += 1
    rec = _read_record(root)
    if not rec.replaced:
        return
    present = {f"{t}/{n}" for t in TABLES for n in list_names(root / t)}
    keep: dict[str, list[Any]] = {}
    changed = False
    for src, (dst, when) in rec.replaced.items():
        if src not in present:
            changed = True  # done: the source is gone
            continue
        if not _hidden(src, rec.replaced, present):
            changed = True  # the merged part never appeared: the source still counts, the entry goes
            res.rolled_back += 1
            continue
        if now - when >= grace_s:
            (root / src).unlink(missing_ok=True)
            res.removed += 1
            _at("deleting")
            changed = True
            continue
        keep[src] = [dst, when]
    if changed:
        # Entries pointing at a source still kept stay resolvable: an entry is dropped only with its source.
        rec.replaced = keep
        _write_record(root, rec)


def _count(root: Path) -> tuple[int, int]:
    parts = [p for ps in visible_parts(root).values() for p in ps]
    return len(parts), sum(p.stat().st_size for p in parts)


def compact_run(
    run_dir: str | os.PathLike[str],
    up_to_step: int | None = None,
    *,
    grace_s: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> CompactResult:
    """Merge the small parts of a run (of a rank being recorded: up to `up_to_step`, flushed) into large parts.

    `grace_s`: seconds the replaced parts stay on disk after the commit (this call waits, then removes them), so a
    reader whose views scan part files and that refreshes at least that often never meets a vanished file.
    Raises CompactUsageError for a rank being recorded without `up_to_step`, or with a step it has not flushed.
    """
    root = as_path(run_dir)
    remote = isinstance(root, RemotePath)
    if not (root / "manifest.json").exists() and not any(root.glob("manifest.rank-*.json")):
        raise CompactUsageError(f"{run_dir}: not a moescope run directory (no manifest.json)")
    say = progress or (lambda _msg: None)
    res = CompactResult(str(root))
    clock = RunLock(root, name=COMPACT_LOCK, reserve=0, role="compacted")
    clock.acquire()  # RunLocked names the other compaction
    try:
        _recover(root, grace_s, time.time(), res)
        res.parts_before, res.bytes_before = _count(root)
        ranks = sorted(_ranks(root))
        for rank in ranks:  # probed one at a time: a run of 1,024 ranks must not hold 1,024 open files
            if remote:  # no flock: a recorder's lock object says it is live (or crashed: then --up-to-step too)
                if (root / lock_name(rank)).exists():
                    res.live_ranks.append(rank)
                continue
            probe = RunLock(root, rank, reserve=0, role="compacted")
            try:
                probe.acquire()
                probe.release()
            except RunLocked:
                res.live_ranks.append(rank)
        if res.live_ranks and up_to_step is None:
            raise CompactUsageError(
                f"{run_dir}: rank(s) {', '.join(map(str, res.live_ranks))} are being recorded; compact a running "
                "run with up_to_step (--up-to-step STEP), a step every rank has flushed")
        plan = _plan(root, up_to_step, res.live_ranks)  # one listing; later parts are never among its sources
        if not plan:
            say("nothing to merge")
            res.parts_after, res.bytes_after = res.parts_before, res.bytes_before
            return res
        # Every source's pages verified before anything is written: a damaged part is an error, nothing changed.
        check_parts([p for *_, sources in plan for p in sources])
        by_rank: dict[int, list[tuple[str, int, list[Path]]]] = {}
        for item in plan:
            by_rank.setdefault(item[1], []).append(item)
        done = 0
        for rank, groups in sorted(by_rank.items()):
            lock = RunLock(root, rank, reserve=0, role="compacted")
            try:  # held while this rank is merged: a recorder starting now is refused, naming the compaction
                if not remote:  # (an object store cannot refuse a recorder: nothing to hold there)
                    lock.acquire()
            except RunLocked:
                pass  # live (or became live): its plan holds only flushes it had finished, which it never touches
            try:
                entries = _commit_rank(root, groups, res, say, done, len(plan))
                done += len(groups)
                if grace_s <= 0:
                    _drop(root, entries, res)
            finally:
                lock.release()
        if grace_s > 0:
            say(f"keeping the replaced parts {grace_s:g} s for readers that scan part files")
            time.sleep(grace_s)
            _recover(root, grace_s, time.time(), res)
        _at("cleaned")
        res.parts_after, res.bytes_after = _count(root)
        return res
    finally:
        clock.release()


def _commit_rank(root: Path, groups: list[tuple[str, int, list[Path]]], res: CompactResult,
                 say: Callable[[str], None], done: int, total: int) -> list[str]:
    """Merge one rank's groups to temporaries, record them, rename them (the commit); the record keys written."""
    tmps = []
    try:
        for i, (table, rank, sources) in enumerate(groups, done + 1):
            first, last = _seq_range(sources[0].name)[1], max(_seq_range(p.name)[2] for p in sources)  # type: ignore[index]
            final = root / table / f"part-{rank}-{first:06d}-{last:06d}.parquet"
            say(f"merging {len(sources):,} {table} parts of rank {rank} ({i}/{total})")
            # An object store cannot rename: the merged bytes wait in memory and their one PUT is the commit.
            tmp = final.with_name(f".{final.name}{_TMP_SUFFIX}") if isinstance(final, Path) else None
            tmps.append((table, sources, tmp, final))
            rows, merged = _merge(sources, tmp)
            tmps[-1] = (table, sources, merged, final)
            res.rows += rows
    except BaseException:
        for *_, tmp, _ in tmps:
            if isinstance(tmp, Path):
                tmp.unlink(missing_ok=True)
        raise
    _at("written")
    rec = _read_record(root)
    now = time.time()
    keys = []
    for table, sources, _, final in tmps:
        for src in sources:
            keys.append(f"{table}/{src.name}")
            rec.replaced[keys[-1]] = [f"{table}/{final.name}", now]
    _write_record(root, rec)
    _at("recorded")
    for i, (_, _, tmp, final) in enumerate(tmps):
        # the commit of this table's merge: its sources are hidden from here on
        if isinstance(tmp, Path):
            os.replace(tmp, final)
        else:
            final.write_bytes(tmp.to_pybytes())
        res.merged.append(f"{final.parent.name}/{final.name}")
        if i == 0:
            _at("renaming")
    _fsync_dirs({final.parent for *_, final in tmps if isinstance(final, Path)})
    _at("renamed")
    return keys


def _drop(root: Path, keys: list[str], res: CompactResult) -> None:
    """Remove the committed sources `keys`, then their record entries (readers hide them until then)."""
    for key in keys:
        (root / key).unlink(missing_ok=True)
        res.removed += 1
        _at("deleting")
    rec = _read_record(root)
    for key in keys:
        rec.replaced.pop(key, None)
    _write_record(root, rec)


def _plan(root: Path, up_to_step: int | None, live: list[int]) -> list[tuple[str, int, list[Path]]]:
    """(table, rank, sources in part-number order) for every table × rank with two or more parts to merge."""
    parts = visible_parts(root)
    by_rank: dict[int, dict[str, list[tuple[int, int, Path]]]] = {}
    for table, paths in parts.items():
        for p in paths:
            r = _seq_range(p.name)
            if r is not None:
                by_rank.setdefault(r[0], {}).setdefault(table, []).append((r[1], r[2], p))  # type: ignore[arg-type]
    plan = []
    for rank, tables in sorted(by_rank.items()):
        # Whole flushes only: part numbers both expert_load and router_stats hold (a torn last flush stays small,
        # where a resumed recorder sets it aside).
        commit: int | None = None  # None: a hand-built trace without router_stats, nothing pairs up
        if "router_stats" in tables:
            load_seqs = {s for first, last, _ in tables.get("expert_load", []) for s in range(first, last + 1)}
            stat_seqs = {s for first, last, _ in tables["router_stats"] for s in range(first, last + 1)}
            commit = max(load_seqs & stat_seqs, default=-1)
        if rank in live and up_to_step is not None:
            # a rank that writes token rows only (reduce="global": another rank writes the counts) has no commit mark
            marks = tables.get("expert_load") or tables.get("routing") or []
            flushed = [s for _, _, p in marks if (s := _max_step(p)) is not None
                       and (commit is None or _seq_range(p.name)[2] <= commit)]  # type: ignore[index]
            if not flushed or max(flushed) < up_to_step:
                have = f"up to step {max(flushed)}" if flushed else "no step yet"
                raise CompactUsageError(f"{root}: rank {rank} is being recorded and has flushed {have}; "
                                        f"compact up to a flushed step (--up-to-step {max(flushed) if flushed else 0} "
                                        "or less)")
        for table, ps in sorted(tables.items()):
            ps.sort()
            chosen = []
            for _first, last, p in ps:
                if commit is not None and table in _FLUSH_TABLES and last > commit:
                    break  # part numbers run in write order: everything after a torn flush waits too
                if up_to_step is not None:
                    top = _max_step(p)
                    if top is None or top > up_to_step:
                        break
                if MERGED_RE.match(p.name) and part_info(p).num_rows >= ROW_GROUP_ROWS:
                    continue  # already large: rewriting it would only copy bytes
                chosen.append(p)
            if len(chosen) >= 2:
                plan.append((table, rank, chosen))
    return plan


def _merge(sources: list[Path], tmp: Path | None) -> tuple[int, Path | pa.Buffer]:
    """Write the rows of `sources` (in order) as one part to `tmp` (a local temporary; None: into memory, for an
    object store); verify it; return its rows and where it is."""
    table = sources[0].parent.name
    schema = TABLES[table]
    tables = [pq.read_table(open_input(p)) for p in sources]
    versions = [int((t.schema.metadata or {}).get(META_KEY, FORMAT_VERSION)) for t in tables]
    names = [f.name for f in schema if any(f.name in t.column_names for t in tables)]
    # Columns an older writer left out stay absent (read back as NULL), as in the sources; types are the format's.
    target = pa.schema([schema.field(n) for n in names])
    data = pa.concat_tables([t.select([n for n in names if n in t.column_names]) for t in tables],
                            promote_options="default")
    data = data.select(names).cast(target)
    # The oldest source's version: merging never claims what an older writer did not record.
    data = data.replace_schema_metadata({META_KEY: str(min(versions)).encode()})
    expected = sum(t.num_rows for t in tables)
    if tmp is None:
        sink = pa.BufferOutputStream()
        _write_parquet(data, sink, target)
        out: Path | pa.Buffer = sink.getvalue()
    else:
        out = tmp
    tmp = out
    try:
        if isinstance(tmp, Path):
            _write_parquet(data, tmp, target)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        pf = pq.ParquetFile(tmp if isinstance(tmp, Path) else pa.BufferReader(tmp), page_checksum_verification=True)
        rows = pf.metadata.num_rows
        for i in range(pf.num_row_groups):
            pf.read_row_group(i)  # every page of the merged part verifies before anything points at it
        pf.close()
    except BaseException:
        if isinstance(tmp, Path):
            tmp.unlink(missing_ok=True)
        raise
    if rows != expected:
        if isinstance(tmp, Path):
            tmp.unlink(missing_ok=True)
        raise TraceError(f"{sources[0].parent}: merged part holds {rows} rows, its sources {expected}")
    return rows, tmp


def _fsync_dirs(dirs: set[Path]) -> None:
    for d in dirs:
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

"""Reading trace parts safely: footer, format version, schema, page checksums and value ranges.

DuckDB reads Parquet pages without verifying their CRCs, so a zeroed or flipped page would come back as other
numbers. `check_part` reads every page once with pyarrow's checksum verification when a part is first seen;
the verdict is cached by (path, size, mtime), so opening the same trace again costs one `stat` per part.
Parts written before checksums existed (older traces) have none to verify and still read.

Traces are validated, not believed: a part's columns must have the format's types (a string `step` is an
error naming the file and column, not a crash in some query), and `check_values` compares the footer's column
statistics (no data read) with the run's manifest: run name, expert ids within [0, n_experts), counts
non-negative and without NULLs, sums finite.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import Manifest, TraceError
from .schema import FORMAT_VERSION, META_KEY, TABLES
from .storage import as_path, open_input

#: Columns every part of a table must have (what every version of the writer wrote).
REQUIRED = {
    "expert_load": ("run", "rank", "step", "tag", "layer", "expert", "tokens"),
    "router_stats": ("run", "rank", "step", "tag", "layer", "tokens"),
    "routing": ("run", "rank", "step", "tag", "layer", "experts"),
    "expert_similarity": ("run", "step", "layer", "expert_a", "expert_b", "metric", "value"),
    "expert_spectra": ("run", "step", "layer", "expert", "sigma"),
    "router_precision": ("run", "rank", "step", "tag", "layer", "sampled", "flipped"),
}
#: Counts that are never negative or NULL; sums that are always finite (NaN/Inf tokens add nothing to them).
COUNTS = {"tokens", "nonfinite", "dropped", "sampled", "flipped"}
#: Counts that may be NULL: not measured (router_stats.nonfinite of a `stats=False` recording).
NULLABLE_COUNTS = {"nonfinite"}
SUMS = {"prob_sum", "weight_sum", "entropy_sum", "lse_sq_sum", "lse_sum", "margin_sum"}
#: Columns (Parquet leaf paths) that hold expert ids.
EXPERT_IDS = {"expert", "expert_a", "expert_b", "experts.list.element"}


@dataclass
class PartInfo:
    """What the footer says about a verified part: its columns and each leaf column's (min, max, nulls)."""

    names: list[str]
    ranges: dict[str, tuple[Any, Any, int]] = field(default_factory=dict)
    num_rows: int = 0

    def fingerprint(self) -> tuple[Any, ...]:
        """Rows and every column's (min, max, nulls): equal for a copy of a part, never for two real flushes."""
        return (self.num_rows, tuple(sorted((k, repr(v)) for k, v in self.ranges.items())))


#: (path, size, mtime_ns) -> footer facts of a part whose every page verified.
_VERIFIED: dict[tuple[str, int, int], PartInfo] = {}
_LOCK = threading.Lock()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def verify_part(path: str | os.PathLike[str]) -> None:
    """Read every page of a part with checksum verification, ignoring the cache; TraceError naming it if broken."""
    p = as_path(path)
    with _LOCK:
        for key in [k for k in _VERIFIED if k[0] == str(p)]:
            del _VERIFIED[key]
    check_part(p)


def check_part(path: str | os.PathLike[str], verify_pages: bool = True) -> list[str]:
    """A part's column names after checking its footer, format version and (once) every page's checksum.

    Raises a one-line TraceError naming the file when it is truncated, not Parquet, from a newer format,
    or when a page fails its checksum or cannot be decoded.
    """
    p = as_path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise TraceError(f"{p}: cannot read ({e.strerror or e})") from None
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _LOCK:
        known = _VERIFIED.get(key)
    if known is not None:
        return list(known.names)
    try:
        src = open_input(p)  # an object's cached copy: a store or cache failure stays an OSError naming itself
    except FileNotFoundError as e:  # gone since the listing (a compaction removed it)
        raise TraceError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        pf = pq.ParquetFile(src, page_checksum_verification=verify_pages)
        schema = pf.schema_arrow
    except Exception as e:  # pyarrow raises several types for broken files
        raise TraceError(f"{p}: corrupt or truncated Parquet file ({_first_line(e)})") from None
    meta = schema.metadata or {}
    if META_KEY in meta:
        try:
            version = int(meta[META_KEY])
        except ValueError:
            raise TraceError(f"{p}: bad format version in Parquet metadata") from None
        if version > FORMAT_VERSION:
            raise TraceError(f"{p}: trace format v{version} is newer than this moescope (v{FORMAT_VERSION})")
    names = list(schema.names)
    _check_schema(p, schema)
    if verify_pages:
        try:
            for i in range(pf.num_row_groups):  # one row group at a time keeps memory flat
                pf.read_row_group(i)
        except Exception as e:
            raise TraceError(f"{p}: corrupt Parquet data ({_first_line(e)})") from None
        finally:
            pf.close()
        with _LOCK:
            _VERIFIED[key] = PartInfo(names, _ranges(pf.metadata), pf.metadata.num_rows)
    return names


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Same kind of value (integer, float, string, list of those): widths may differ between writers."""
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _compatible(
            actual.value_type, expected.value_type)
    for kind in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean):
        if kind(expected):
            # floats and ints convert into each other's columns; strings, lists and structs do not
            return kind(actual) or (pa.types.is_floating(expected) and pa.types.is_integer(actual))
    if pa.types.is_string(expected) or pa.types.is_large_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual) or pa.types.is_dictionary(actual)
    return actual == expected


def _check_schema(path: Path, schema: pa.Schema) -> None:
    """A part of a known table (its folder's name) has the format's column types and its required columns."""
    table = path.parent.name
    expected = TABLES.get(table)
    if expected is None:
        return
    for f in schema:
        if f.name in expected.names and not _compatible(f.type, expected.field(f.name).type):
            raise TraceError(f"{path}: column {f.name!r} is {f.type}, trace format v{FORMAT_VERSION} says "
                             f"{expected.field(f.name).type}")
    missing = [c for c in REQUIRED.get(table, ()) if c not in schema.names]
    if missing:
        raise TraceError(f"{path}: {table} part without column(s) {', '.join(missing)}")


def _ranges(md: pq.FileMetaData) -> dict[str, tuple[Any, Any, int]]:
    """Per leaf column: (min, max, null count) over all row groups, from the footer's statistics (None if absent)."""
    out: dict[str, tuple[Any, Any, int]] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for i in range(rg.num_columns):
            col = rg.column(i)
            st = col.statistics
            if st is None or col.physical_type == "FIXED_LEN_BYTE_ARRAY":  # half floats: raw bytes, not numbers
                continue
            lo, hi = (st.min, st.max) if st.has_min_max else (None, None)
            nulls = st.null_count if st.has_null_count else 0
            name = col.path_in_schema
            if name in out:
                a, b, n = out[name]
                lo = a if lo is None else lo if a is None else min(a, lo)
                hi = b if hi is None else hi if b is None else max(b, hi)
                nulls += n
            out[name] = (lo, hi, nulls)
    return out


def part_info(path: Path) -> PartInfo:
    """The footer facts of a part `check_part` verified (footer read again if it was checked another way)."""
    st = path.stat()
    with _LOCK:
        known = _VERIFIED.get((str(path), st.st_size, st.st_mtime_ns))
    if known is not None:
        return known
    md = pq.read_metadata(open_input(path))
    return PartInfo(list(md.schema.to_arrow_schema().names), _ranges(md), md.num_rows)


def check_run_values(run: str, files: dict[str, list[Path]], manifests: dict[int, Manifest]) -> None:
    """`check_values` for every part of one run, against the largest N its manifests give (footer stats only)."""
    layers = [ly for m in manifests.values() for ly in m.layers]
    known = [ly.n_experts for ly in layers if ly.n_experts is not None]
    n_max = max(known) if known and len(known) == len(layers) else None
    for parts in files.values():
        seen: dict[tuple[Any, ...], Path] = {}
        for path in parts:
            check_values(path, run, n_max)
            fp = part_info(path).fingerprint()
            if fp[0] and fp in seen:  # a copied part would count every one of its rows twice
                raise TraceError(f"{path}: the same rows as {seen[fp].name} (a duplicated part; remove one)")
            seen[fp] = path


def check_values(path: Path, run: str, n_experts: int | None) -> None:
    """Compare a part's column statistics with its run's manifest; a violation is a TraceError naming the file.

    `n_experts`: the largest N of the run's layers (None: unknown, ids are only checked for being >= 0).
    """
    ranges = part_info(path).ranges
    lo, hi, _ = ranges.get("run", (None, None, 0))
    if lo is not None and (lo != run or hi != run):
        shown = lo if lo != run else hi
        raise TraceError(f"{path}: rows of run {shown!r} in run {run!r} (the manifest and the data disagree)")
    for name, (lo, hi, nulls) in ranges.items():
        leaf = name.split(".", 1)[0]
        if name in EXPERT_IDS and lo is not None:
            if lo < 0 or (n_experts is not None and hi >= n_experts):
                bad = lo if lo < 0 else hi
                limit = f"[0, {n_experts})" if n_experts is not None else ">= 0"
                raise TraceError(f"{path}: expert id {bad} in column {leaf!r} is outside {limit} (manifest n_experts)")
        if leaf in COUNTS:
            if nulls and leaf not in NULLABLE_COUNTS:
                raise TraceError(f"{path}: {nulls} NULL value(s) in count column {leaf!r}")
            if lo is not None and lo < 0:
                raise TraceError(f"{path}: negative count {lo} in column {leaf!r}")
        if leaf in SUMS and lo is not None and not (math.isfinite(lo) and math.isfinite(hi)):
            raise TraceError(f"{path}: non-finite value ({lo if not math.isfinite(lo) else hi}) in column {leaf!r}")


def check_parts(paths: list[Path]) -> dict[Path, list[str]]:
    """`check_part` for many parts, on a few threads (pyarrow decodes without the GIL); first failure raised.

    The failure raised is the first in `paths` order, so the error names the same file on every run.
    """
    todo = list(dict.fromkeys(paths))
    if len(todo) <= 1:
        return {p: check_part(p) for p in todo}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1, len(todo)), thread_name_prefix="moescope-verify") as ex:
        futures = [ex.submit(check_part, p) for p in todo]
        return {p: f.result() for p, f in zip(todo, futures)}


def forget_verified() -> None:
    """Drop the cache of verified parts (benchmarks measure a cold open with it)."""
    with _LOCK:
        _VERIFIED.clear()

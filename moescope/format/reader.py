"""Reading trace parts safely: footer, format version and page checksums, checked once per file version.

DuckDB reads Parquet pages without verifying their CRCs, so a zeroed or flipped page would come back as other
numbers. `check_part` reads every page once with pyarrow's checksum verification when a part is first seen;
the verdict is cached by (path, size, mtime), so opening the same trace again costs one `stat` per part.
Parts written before checksums existed (older traces) have none to verify and still read.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow.parquet as pq

from .manifest import TraceError
from .schema import FORMAT_VERSION, META_KEY

#: (path, size, mtime_ns) -> column names of a part whose every page verified.
_VERIFIED: dict[tuple[str, int, int], list[str]] = {}
_LOCK = threading.Lock()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def check_part(path: str | os.PathLike[str], verify_pages: bool = True) -> list[str]:
    """A part's column names after checking its footer, format version and (once) every page's checksum.

    Raises a one-line TraceError naming the file when it is truncated, not Parquet, from a newer format,
    or when a page fails its checksum or cannot be decoded.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise TraceError(f"{p}: cannot read ({e.strerror or e})") from None
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _LOCK:
        known = _VERIFIED.get(key)
    if known is not None:
        return list(known)
    try:
        pf = pq.ParquetFile(p, page_checksum_verification=verify_pages)
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
    if verify_pages:
        try:
            for i in range(pf.num_row_groups):  # one row group at a time keeps memory flat
                pf.read_row_group(i)
        except Exception as e:
            raise TraceError(f"{p}: corrupt Parquet data ({_first_line(e)})") from None
        finally:
            pf.close()
        with _LOCK:
            _VERIFIED[key] = names
    return names


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

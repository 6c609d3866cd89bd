"""Where a trace lives: a local directory, or an object-store URL (`s3://bucket/traces/run`) through fsspec.

Local paths stay `pathlib.Path` and every local code path is unchanged. A URL becomes a `RemotePath`: the few
`Path` methods the format's writers and readers use (`/`, `name`, `parent`, `stat`, `read_bytes`, `iterdir`,
`glob`, `rglob`, `unlink`, ...), over an fsspec filesystem (s3fs for `s3://`, any fsspec protocol otherwise).

The complete-file guarantee carries over without renames: an object store makes a whole-object PUT visible
at once or not at all, so `write_atomic` writes each part and manifest as one PUT of the finished bytes (s3fs
switches to a multipart upload above its block size, which also becomes visible only when completed).

Reading: a part of an object-store trace is downloaded once into a local cache (`MOESCOPE_CACHE_DIR`, default
`~/.cache/moescope/parts`; one file per object version, named by its size and modification time) and read from
there: DuckDB scans it like a local part, so a trace larger than memory opens and queries from an object store as
it does from a disk. Parts never change in place (a compaction writes new names), so a cached copy whose object
still lists with the same size and time is the object. `Trace` keeps each root's cache equal to the parts it
lists: copies of objects that are gone (compacted away, deleted) are removed at open and at each refresh.

Connection settings: fsspec's own (`~/.config/fsspec`, `FSSPEC_S3_*` variables), the AWS variables s3fs reads
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible
server), and `MOESCOPE_STORAGE_OPTIONS`, a JSON object passed to the filesystem (e.g.
`{"endpoint_url": "http://127.0.0.1:9000", "anon": false}`).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["RemotePath", "AnyPath", "is_url", "as_path", "storage_options", "write_atomic", "open_input",
           "list_names", "is_remote", "local_copy", "local_root", "prune_copies", "forget_copy", "cache_root", "CACHE_ENV"]

#: Environment variable holding extra fsspec options (JSON object) for object-store URLs.
OPTIONS_ENV = "MOESCOPE_STORAGE_OPTIONS"
#: Environment variable naming the folder that holds local copies of object-store parts.
CACHE_ENV = "MOESCOPE_CACHE_DIR"


def is_url(x: object) -> bool:
    """True for an object-store URL (`s3://...`, `memory://...`); `file://` and plain paths are local."""
    s = str(x)
    return "://" in s and not s.startswith("file://")


def storage_options() -> dict[str, Any]:
    """The fsspec options of `MOESCOPE_STORAGE_OPTIONS` ({} when unset); a malformed value is an OSError (usage)."""
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError:
        opts = None
    if not isinstance(opts, dict):
        raise OSError(f"{OPTIONS_ENV} must be a JSON object like '{{\"anon\": true}}', got {raw[:60]!r}")
    return opts


def _options_for(protocol: str) -> dict[str, Any]:
    opts = storage_options()
    if protocol in ("s3", "s3a") and "endpoint_url" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        # Older botocore ignores AWS_ENDPOINT_URL: pass it explicitly so an S3-compatible server is always used.
        opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return opts


_FS_LOCK = threading.Lock()


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path without protocol) of a URL; filesystems are cached by fsspec per options."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the `s3` extra
        raise OSError(f"{url}: object-store URLs need fsspec (pip install 'moescope[s3]')") from None
    protocol = url.split("://", 1)[0]
    with _FS_LOCK:
        fs, path = fsspec.core.url_to_fs(url, **_options_for(protocol))
    return fs, path


@dataclass(frozen=True)
class _Stat:
    """The `os.stat_result` fields the readers use."""

    st_size: int
    st_mtime_ns: int

    @property
    def st_mtime(self) -> float:
        return self.st_mtime_ns / 1e9


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("LastModified", "mtime", "last_modified", "created", "updated"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return int(v.timestamp() * 1e9)
        try:
            return int(float(v) * 1e9)
        except (TypeError, ValueError):
            continue
    return 0


class RemotePath:
    """A file or folder of an object store, with the `Path` methods moescope's format code uses."""

    def __init__(self, url: str, _fs: Any = None, _key: str | None = None) -> None:
        if _fs is None:
            _fs, _key = _filesystem(url)
        self.fs = _fs
        self.key = str(_key).rstrip("/")
        self.url = self.fs.unstrip_protocol(self.key)

    # -- naming ------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.url, self.fs, posixpath.join(self.key, str(name)))

    @property
    def name(self) -> str:
        """The last component."""
        return posixpath.basename(self.key)

    @property
    def parent(self) -> RemotePath:
        """The folder above."""
        return RemotePath(self.url, self.fs, posixpath.dirname(self.key))

    def with_name(self, name: str) -> RemotePath:
        """The same folder, another name."""
        return self.parent / name

    def relative_to(self, other: RemotePath) -> str:
        """This path below `other`, as a relative posix path."""
        return posixpath.relpath(self.key, other.key)

    def expanduser(self) -> RemotePath:
        """Itself (URLs have no home)."""
        return self

    def resolve(self) -> RemotePath:
        """Itself (URLs are absolute)."""
        return self

    # -- queries ------------------------------------------------------------------------------------
    def stat(self) -> _Stat:
        """Size and modification time; OSError (FileNotFoundError) when the object is missing."""
        try:
            try:
                info = self.fs.info(self.key)
            except FileNotFoundError:
                # fsspec answers from a cached listing of the folder, which another thread may have stored just
                # before this object was written: ask the store itself before saying it is not there
                try:
                    info = self.fs.info(self.key, refresh=True)
                except TypeError:  # a filesystem without `refresh`
                    self.fs.invalidate_cache(self.key)
                    info = self.fs.info(self.key)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - network and permission errors surface as OSError like local ones
            raise OSError(f"{self.url}: {e}") from None
        if info.get("type") == "directory":
            return _Stat(0, 0)
        return _Stat(int(info.get("size") or 0), _mtime_ns(info))

    def exists(self) -> bool:
        """True when an object or a prefix with objects is there."""
        self.fs.invalidate_cache(self.key)
        return bool(self.fs.exists(self.key))

    def is_dir(self) -> bool:
        """True when objects exist below this prefix (object stores have no empty folders)."""
        self.fs.invalidate_cache(self.key)
        try:
            return bool(self.fs.isdir(self.key))
        except FileNotFoundError:
            return False

    def is_file(self) -> bool:
        """True when an object is stored under exactly this key."""
        self.fs.invalidate_cache(self.key)
        try:
            return bool(self.fs.isfile(self.key))
        except FileNotFoundError:
            return False

    def iterdir(self) -> Iterator[RemotePath]:
        """The files and folders directly below (freshly listed: an object store's listing cache is dropped)."""
        self.fs.invalidate_cache(self.key)
        try:
            entries = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter(RemotePath(self.url, self.fs, e) for e in sorted(entries) if e.rstrip("/") != self.key)

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Direct children whose name matches `pattern` (fnmatch)."""
        return (p for p in self.iterdir() if fnmatch(p.name, pattern))

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        """Every object below whose name matches `pattern`."""
        self.fs.invalidate_cache(self.key)
        try:
            found = self.fs.find(self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter(RemotePath(self.url, self.fs, f) for f in sorted(found) if fnmatch(posixpath.basename(f), pattern))

    # -- reading and writing -----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The whole object."""
        try:
            return bytes(self.fs.cat_file(self.key))
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise OSError(f"{self.url}: {e}") from None

    def read_text(self, encoding: str = "utf-8") -> str:
        """The whole object as text."""
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One PUT of the whole object: readers see all of it or none of it."""
        try:
            self.fs.pipe_file(self.key, bytes(data))
        except Exception as e:  # noqa: BLE001
            raise OSError(f"{self.url}: write failed ({e})") from None
        self.fs.invalidate_cache(self.parent.key)
        return len(data)

    def open(self, mode: str = "rb") -> BinaryIO:
        """A file object (reading: random access for pyarrow's footer and page reads)."""
        return self.fs.open(self.key, mode)  # type: ignore[no-any-return]

    def unlink(self, missing_ok: bool = False) -> None:
        """Delete the object (and its cached copy, format/storage.py's local_copy)."""
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise
        finally:
            forget_copy(self)
        self.fs.invalidate_cache(self.parent.key)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores create prefixes with their first object."""

    def rename(self, target: RemotePath) -> RemotePath:
        """Copy then delete (object stores cannot rename: not atomic, used only where a torn copy is harmless)."""
        self.fs.copy(self.key, target.key)
        self.unlink(missing_ok=True)
        return target


AnyPath = Path | RemotePath


def as_path(x: str | os.PathLike[str] | RemotePath) -> AnyPath:
    """A `RemotePath` for an object-store URL, else a local `Path` (`file://` stripped)."""
    if isinstance(x, (Path, RemotePath)):
        return x
    s = os.fspath(x)
    if is_url(s):
        return RemotePath(s)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def is_remote(p: object) -> bool:
    """True for a `RemotePath` (or a URL string)."""
    return isinstance(p, RemotePath) or (isinstance(p, str) and is_url(p))


def write_atomic(path: AnyPath, data: bytes, *, fsync: bool = True) -> None:
    """Make `path` hold `data` at once: local files by temporary name + rename, objects by one PUT."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half-written temporary
        raise
    os.replace(tmp, path)


def open_input(path: AnyPath) -> Path:
    """The local file a part's bytes are read from (pyarrow, DuckDB): the path itself, or the object's cached copy."""
    if isinstance(path, RemotePath):
        return local_copy(path)
    return path


def cache_root() -> Path:
    """The folder of cached object-store parts: MOESCOPE_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /moescope/parts."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if raw:
        return Path(raw).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "moescope" / "parts"


def _cache_dir(path: RemotePath) -> Path:
    """The cache folder of one object (or prefix): protocol / bucket / key, each component kept inside the cache."""
    protocol, rest = path.url.split("://", 1)
    parts = [c if c not in ("", ".", "..") else f"%{c or 'empty'}" for c in rest.strip("/").split("/")]
    return cache_root().joinpath(protocol, *parts)


def local_root(path: AnyPath) -> Path:
    """The local folder holding the bytes DuckDB scans for a root: the folder itself, or its cache folder."""
    return _cache_dir(path) if isinstance(path, RemotePath) else path


def _versions(folder: Path) -> list[Path]:
    try:
        return [e for e in folder.iterdir() if e.is_file() and not e.name.startswith(".")]
    except OSError:
        return []


def _cache_error(path: RemotePath, e: OSError) -> OSError:
    return OSError(f"{path.url}: cannot copy into the cache {cache_root()} ({e.strerror or e}); "
                   f"set {CACHE_ENV} to a writable folder")


def local_copy(path: RemotePath) -> Path:
    """A local file with the object's bytes: downloaded (one streamed GET) unless this version is cached already."""
    st = path.stat()  # the store's errors: FileNotFoundError, or an OSError naming the URL
    folder = _cache_dir(path)
    target = folder / f"{st.st_size}-{st.st_mtime_ns}"
    if target.is_file() and target.stat().st_size == st.st_size:
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(path, e) from None
    tmp = folder / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        path.fs.get_file(path.key, str(tmp))
        if tmp.stat().st_size != st.st_size:  # replaced between the listing and the GET: name what was read
            target = folder / f"{tmp.stat().st_size}-{path.stat().st_mtime_ns}"
        os.replace(tmp, target)
    except OSError as e:
        if str(getattr(e, "filename", "") or "").startswith(str(folder)):  # the local side: disk full, permissions
            raise _cache_error(path, e) from None
        if isinstance(e, FileNotFoundError):
            raise
        raise OSError(f"{path.url}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the store's errors (botocore, aiohttp) surface as OSError
        raise OSError(f"{path.url}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    for old in _versions(folder):  # an older version of the same object
        if old != target:
            old.unlink(missing_ok=True)
    return target


def forget_copy(path: RemotePath) -> None:
    """Drop the cached copies of one object (it was deleted)."""
    folder = _cache_dir(path)
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)


def prune_copies(root: RemotePath, keep: Iterable[RemotePath]) -> int:
    """Remove the cached copies below `root` of every object not in `keep` (gone from the store); how many."""
    base = _cache_dir(root)
    wanted = {_cache_dir(p) for p in keep}
    removed = 0
    for folder, dirs, files in os.walk(base, topdown=False):
        here = Path(folder)
        if any(not f.startswith(".") for f in files) and here not in wanted:
            shutil.rmtree(here, ignore_errors=True)
            removed += 1
        elif not dirs and not files and here != base:
            with contextlib.suppress(OSError):
                here.rmdir()
    return removed


def list_names(folder: AnyPath) -> list[str]:
    """Names of the entries of a folder, sorted ([] when it does not exist)."""
    if isinstance(folder, RemotePath):
        return sorted(p.name for p in folder.iterdir())
    try:
        return sorted(e.name for e in os.scandir(folder))
    except OSError:
        return []


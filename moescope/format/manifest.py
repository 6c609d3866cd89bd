"""The run manifest (ROOT/RUN/manifest.json): one typed schema, one writer, one reader.

Every writer (the recorder, `write_run`, spectral snapshots) builds a `Manifest` and calls `write()`; every
reader calls `Manifest.read()`, which checks each field's type and raises a one-line TraceError naming the
file and the field. Keys this version does not know are kept in `extra` and written back unchanged, so a
newer minor writer's additions survive a round trip. Old v1 spellings (`capture.token_fraction`,
`capture.flush_interval`, `counters.dropped_rows`, …) are read here and nowhere else.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .schema import FORMAT, FORMAT_VERSION
from .storage import RemotePath, as_path, write_atomic


class TraceError(Exception):
    """A trace could not be read or written; the message is one line meant for a person."""


def manifest_name(rank: int) -> str:
    """Rank 0 owns manifest.json; other ranks write their own counters beside it."""
    return "manifest.json" if rank == 0 else f"manifest.rank-{rank}.json"


def now_utc() -> str:
    """The manifest's timestamp format (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def atomic_write_bytes(path: Path | RemotePath, data: bytes) -> None:
    """Write a file under a temporary name and rename it, so a reader never sees half of it (objects: one PUT)."""
    write_atomic(path, data)


# -- field checks: each returns the value or raises _Bad(expected) -----------------------------------------------


class _Bad(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        # 3.0 from a JSON writer that only has doubles is still the integer 3
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise _Bad("an integer")
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad("a number")
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad("a string")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad("a non-empty string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _dict(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad("an object")
    return v


def _opt(check: Any, v: Any) -> Any:
    return None if v is None else check(v)


def _take(d: dict[str, Any], key: str, check: Any, where: str, *aliases: str, default: Any = None) -> Any:
    """Pop `key` (or the first alias present) from `d` and check its type; a mismatch names the field."""
    name = next((k for k in (key, *aliases) if k in d), None)
    if name is None:
        return default
    value = d[name]
    for k in (key, *aliases):  # aliases of one field are one field: drop them all
        d.pop(k, None)
    try:
        return _opt(check, value)
    except _Bad as e:
        raise TraceError(f"manifest field '{where}{name}' must be {e.expected}, got {value!r:.60}") from None


# -- the schema ----------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """The recorded model: its class name and parameter count."""

    class_name: str | None = None
    n_params: int | None = None
    #: how to decode its token ids: "bytes" (ids are bytes), an HF tokenizer's name or path; None: not recorded
    tokenizer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerEntry:
    """One hooked router (a `layers` entry): trace layer number, module path, N experts, top-k, router kind."""

    layer: int
    module: str | None = None
    n_experts: int | None = None
    top_k: int | None = None
    router_kind: str | None = None
    family: str | None = None
    experts_module: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptureSettings:
    """How the run was recorded: token-level fraction, flush interval, sampling seed, back-pressure policy."""

    tokens: float | None = None
    flush_every: int | None = None
    seed: int | None = None
    on_full: str | None = None
    max_queue_mb: float | None = None
    #: token rows only on steps that are multiples of this (None: written before the option, i.e. every step)
    tokens_every: int | None = None
    #: "global": counts summed over a process group of `reduce_group_size` ranks, one rank wrote them; "none": per rank
    reduce: str | None = None
    reduce_group_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Counters:
    """What the recorder counted: forwards, flushes, parts and rows written, losses and write errors."""

    forwards: int | None = None
    flushes: int | None = None
    parts_written: int | None = None
    rows_written: dict[str, int] = field(default_factory=dict)
    dropped_flushes: int | None = None
    dropped_records: int | None = None
    skipped_resumed_forwards: int | None = None
    resumed_after_step: int | None = None
    write_errors: list[str] = field(default_factory=list)
    #: steps whose rows never reached the disk (failed writes, dropped flushes), as [first, last] ranges
    lost_steps: list[list[int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _layer(v: Any, i: int) -> LayerEntry:
    where = f"layers[{i}]."
    if not isinstance(v, dict):
        raise TraceError(f"manifest field 'layers[{i}]' must be an object, got {v!r:.60}")
    d = dict(v)
    if "layer" not in d:
        raise TraceError(f"manifest field 'layers[{i}]' needs a 'layer' number")
    e = LayerEntry(
        layer=_take(d, "layer", _int, where),
        module=_take(d, "module", _str, where),
        n_experts=_take(d, "n_experts", _int, where),
        top_k=_take(d, "top_k", _int, where),
        router_kind=_take(d, "router_kind", _str, where),
        family=_take(d, "family", _str, where),
        experts_module=_take(d, "experts_module", _str, where),
        extra=d,
    )
    if e.layer < 0:
        raise TraceError(f"manifest field '{where}layer' must be >= 0, got {e.layer}")
    if e.n_experts is not None and e.n_experts < 1:
        raise TraceError(f"manifest field '{where}n_experts' must be >= 1, got {e.n_experts}")
    if e.top_k is not None and (e.top_k < 1 or (e.n_experts is not None and e.top_k > e.n_experts)):
        raise TraceError(f"manifest field '{where}top_k' must be between 1 and n_experts ({e.n_experts}), "
                         f"got {e.top_k}")
    return e


@dataclass
class Manifest:
    """One run's manifest (trace format v1). `read()` validates types; `write()` is the only writer."""

    run: str = ""
    created: str | None = None
    updated: str | None = None
    closed: bool | None = None
    moescope_version: str | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    layers: list[LayerEntry] = field(default_factory=list)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    counters: Counters = field(default_factory=Counters)
    rank: int | None = None
    world_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stopped_by_alert: dict[str, Any] | None = None
    format: str = FORMAT
    version: int = FORMAT_VERSION
    #: top-level keys this version does not know, written back unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def write_errors(self) -> list[str]:
        """Flushes that failed to reach the disk (kept under counters in v1)."""
        return self.counters.write_errors

    # -- reading --------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any, source: str | os.PathLike[str] = "manifest") -> Manifest:
        """Validate a decoded manifest; a wrong format, a newer version or a wrong-typed field is a TraceError."""
        try:
            return cls._from_dict(raw)
        except TraceError as e:
            raise TraceError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise TraceError("not a moescope trace manifest")
        d = dict(raw)
        d.pop("format")
        version = _take(d, "version", _int, "", default=None)
        if version is None:
            raise TraceError("manifest field 'version' is missing")
        if version > FORMAT_VERSION:
            raise TraceError(f"trace format v{version} is newer than this moescope (v{FORMAT_VERSION})")
        model_d = dict(_take(d, "model", _dict, "", default={}))
        model = ModelInfo(_take(model_d, "class", _str, "model."), _take(model_d, "n_params", _int, "model."),
                          tokenizer=_take(model_d, "tokenizer", _name, "model."), extra=model_d)
        layers_raw = _take(d, "layers", _list, "", default=[])
        layers = [_layer(v, i) for i, v in enumerate(layers_raw)]
        cap_d = dict(_take(d, "capture", _dict, "", default={}))
        w = "capture."
        capture = CaptureSettings(
            tokens=_take(cap_d, "tokens", _num, w, "token_fraction"),
            flush_every=_take(cap_d, "flush_every", _int, w, "flush_interval", "flush_steps"),
            seed=_take(cap_d, "seed", _int, w),
            on_full=_take(cap_d, "on_full", _str, w),
            max_queue_mb=_take(cap_d, "max_queue_mb", _num, w),
            tokens_every=_take(cap_d, "tokens_every", _int, w),
            reduce=_take(cap_d, "reduce", _str, w),
            reduce_group_size=_take(cap_d, "reduce_group_size", _int, w),
            extra=cap_d,
        )
        if capture.tokens_every is not None and capture.tokens_every < 1:
            raise TraceError(f"manifest field 'capture.tokens_every' must be >= 1, got {capture.tokens_every}")
        if capture.tokens is not None and not (0.0 <= capture.tokens <= 1.0):
            raise TraceError(f"manifest field 'capture.tokens' must be a fraction in [0, 1], got {capture.tokens}")
        cnt_d = dict(_take(d, "counters", _dict, "", default={}))
        w = "counters."
        counters = Counters(
            forwards=_take(cnt_d, "forwards", _count, w),
            flushes=_take(cnt_d, "flushes", _count, w),
            parts_written=_take(cnt_d, "parts_written", _count, w),
            rows_written=_take(cnt_d, "rows_written", _counts, w, default={}),
            dropped_flushes=_take(cnt_d, "dropped_flushes", _count, w),
            dropped_records=_take(cnt_d, "dropped_records", _count, w, "dropped_rows", "dropped"),
            skipped_resumed_forwards=_take(cnt_d, "skipped_resumed_forwards", _count, w),
            resumed_after_step=_take(cnt_d, "resumed_after_step", _int, w),
            write_errors=_take(cnt_d, "write_errors", _strs, w, default=[]),
            lost_steps=_take(cnt_d, "lost_steps", _ranges, w, default=[]),
            extra=cnt_d,
        )
        top_errors = _take(d, "write_errors", _strs, "")  # a top-level spelling some writers may use
        if top_errors:
            counters.write_errors = [*counters.write_errors, *top_errors]
        return cls(
            run=_take(d, "run", _str, "", default=""),
            created=_take(d, "created", _str, ""),
            updated=_take(d, "updated", _str, ""),
            closed=_take(d, "closed", _bool, ""),
            moescope_version=_take(d, "moescope_version", _str, ""),
            model=model,
            layers=layers,
            capture=capture,
            counters=counters,
            rank=_take(d, "rank", _int, ""),
            world_size=_take(d, "world_size", _int, ""),
            meta=_take(d, "meta", _dict, "", default={}),
            stopped_by_alert=_take(d, "stopped_by_alert", _dict, ""),
            version=version,
            extra=d,
        )

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and validate one manifest file; every failure is a one-line TraceError naming the file."""
        p = as_path(path)
        try:
            raw = json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TraceError(f"{p}: unreadable manifest ({e.__class__.__name__}: {text})") from None
        return cls.from_dict(raw, p)

    @classmethod
    def read_run(cls, run_dir: str | os.PathLike[str]) -> Manifest:
        """The primary manifest of a run directory (rank 0's, else the lowest rank's)."""
        p = as_path(run_dir) / "manifest.json"
        if not p.is_file():
            others = sorted(as_path(run_dir).glob("manifest.rank-*.json"))  # type: ignore[type-var]
            if not others:
                raise TraceError(f"{run_dir}: no manifest.json (not a moescope run directory)")
            p = others[0]
        return cls.read(p)

    # -- writing --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (v1 key spellings); fields never recorded (None) are left out."""

        def clean(obj: Any, rename: Mapping[str, str] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for f in fields(obj):
                if f.name == "extra":
                    continue
                v = getattr(obj, f.name)
                if v is None:
                    continue
                out[(rename or {}).get(f.name, f.name)] = v
            out.update(obj.extra)
            return out

        body: dict[str, Any] = {"format": self.format, "version": self.version, "run": self.run}
        for key in ("created", "updated", "closed", "moescope_version"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        body["model"] = clean(self.model, {"class_name": "class"})
        # The format names these five for every layer: written even when unknown (null), the rest when set.
        body["layers"] = [{"layer": ly.layer, "module": ly.module, "n_experts": ly.n_experts, "top_k": ly.top_k,
                           "router_kind": ly.router_kind, **clean(ly)} for ly in self.layers]
        body["capture"] = clean(self.capture)
        body["counters"] = {**clean(self.counters), "rows_written": dict(self.counters.rows_written),
                            "write_errors": list(self.counters.write_errors)}
        for key in ("rank", "world_size"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.meta:
            body["meta"] = self.meta
        if self.stopped_by_alert is not None:
            body["stopped_by_alert"] = self.stopped_by_alert
        body.update(self.extra)
        return body

    def write(self, run_dir: str | os.PathLike[str] | RemotePath, rank: int = 0) -> Path | RemotePath:
        """Validate this manifest (the reader's own checks) and write it atomically; returns the file's path."""
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        path = as_path(run_dir) / manifest_name(rank)
        Manifest.from_dict(json.loads(text), path)  # never write what the reader would refuse
        atomic_write_bytes(path, text.encode())
        return path


def _json_default(o: Any) -> Any:
    """numpy / torch scalars become their Python numbers (not strings a reader would refuse); the rest str()."""
    item = getattr(o, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(o)


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise _Bad("a list")
    return v


def _count(v: Any) -> int:
    n = _int(v)
    if n < 0:
        raise _Bad("a count >= 0")
    return n


def _counts(v: Any) -> dict[str, int]:
    d = _dict(v)
    for x in d.values():
        _count(x)
    return {str(k): int(x) for k, x in d.items()}


def _ranges(v: Any) -> list[list[int]]:
    if not isinstance(v, list) or not all(isinstance(r, list) and len(r) == 2 for r in v):
        raise _Bad("a list of [first, last] step ranges")
    out = [[_int(a), _int(b)] for a, b in v]
    if any(a > b for a, b in out):
        raise _Bad("a list of [first, last] step ranges with first <= last")
    return out


def _strs(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Bad("a list of strings")
    return list(v)

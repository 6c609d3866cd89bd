"""The options of `moescope.record`, declared once: the recorder and the Lightning and HF callbacks all take them.

No torch here, so the callbacks can validate their arguments before a model exists.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

RAISE_ON: tuple[str | None, ...] = (None, "fail", "warn")
ON_FULL: tuple[str, ...] = ("block", "drop")
#: reduce="global": each flush's counts and stats summed over the process group, one rank writes them.
REDUCE: tuple[str, ...] = ("global", "none")


@dataclass(frozen=True)
class CaptureOptions:
    """What a recorder keeps and how it writes it (README: Capture)."""

    tokens: float = 0.0  # fraction of sequences also kept token by token (`routing`); 0 = counts only
    flush_every: int = 50  # steps per flush: counts stay on the device in between
    run: str | None = None  # run name stored in every row; None = the run directory's name
    seed: int = 0  # seed of the whole-sequence token sampling
    max_queue_mb: float = 256.0  # memory cap of the background writer's queue
    on_full: str = "block"  # queue full: "block" waits, "drop" discards the flush and counts it
    max_rows_per_flush: int = 2_000_000  # token rows kept per flush at most (the rest counted as dropped)
    rank: int | None = None  # torch.distributed rank; None = ask torch.distributed
    meta: Mapping[str, Any] | None = None  # anything JSON-able, stored in the manifest
    on_flush: Callable[..., None] | None = None  # fn(recorder, tables) after each flush
    sinks: Sequence[Any] = ()  # metric sinks (moescope.sinks.*): sink.write_flush(tables) after each flush
    on_alert: Callable[[Any], None] | None = None  # fn(alert) for each online alert (replaces the warning)
    raise_on: str | None = None  # "fail" / "warn": raise at the flush whose alerts reach that status
    alert_rules: Any = None  # rule settings for the online alerts (a config, a path, or a dict)
    resume: bool = True  # recording into an existing run continues it without rewriting its steps
    stats: bool = True  # router statistics (`router_stats`); False = expert counts only
    tokens_every: int = 1  # token rows (`routing`) only on steps that are multiples of this (1 = every step)
    reduce: str = "global"  # "global": counts summed over `group` at each flush, its rank 0 writes; "none": per rank
    group: Any = None  # torch.distributed process group of reduce="global" (None = the whole world)
    flight_steps: int = 0  # flight recorder: keep the last N steps' router evidence on the device (0 = off)
    flight_tokens: int = 64  # flight recorder: token rows sampled per layer and step (the first ones of the step)
    precision_check: bool = False  # at each flush, share of sampled tokens whose experts change in float32
    #: how to decode token ids (manifest model.tokenizer): an HF tokenizer's name or path, "bytes", or a tokenizer
    #: object (its name_or_path is kept); None = auto: the reference model's bytes, else config._name_or_path
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.tokens) <= 1.0:
            raise ValueError(f"tokens must be a fraction in [0, 1], got {self.tokens}")
        if int(self.flush_every) < 1:
            raise ValueError(f"flush_every must be >= 1, got {self.flush_every}")
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be 'block' or 'drop', got {self.on_full!r}")
        if self.raise_on not in RAISE_ON:
            raise ValueError(f"raise_on must be None, 'fail' or 'warn', got {self.raise_on!r}")
        # A list stays usable as a dataclass field only as a tuple (frozen, hashable options).
        object.__setattr__(self, "sinks", tuple(self.sinks or ()))
        for sink in self.sinks:
            if not callable(getattr(sink, "write_flush", None)):
                raise TypeError(f"sinks: {sink!r:.80} has no write_flush(tables) method; use moescope.sinks.WandB, "
                                "MLflow, TensorBoard, Prometheus or a subclass of moescope.sinks.MetricSink")
        object.__setattr__(self, "tokenizer", tokenizer_name(self.tokenizer))
        if int(self.flight_steps) < 0 or int(self.flight_tokens) < 1:
            raise ValueError(f"flight_steps must be >= 0 and flight_tokens >= 1, got {self.flight_steps}, "
                             f"{self.flight_tokens}")
        if float(self.max_queue_mb) <= 0:
            raise ValueError(f"max_queue_mb must be > 0, got {self.max_queue_mb}")
        if int(self.max_rows_per_flush) < 0:
            raise ValueError(f"max_rows_per_flush must be >= 0, got {self.max_rows_per_flush}")
        if int(self.tokens_every) < 1:
            raise ValueError(f"tokens_every must be >= 1, got {self.tokens_every}")
        if self.reduce not in REDUCE:
            raise ValueError(f"reduce must be 'global' or 'none', got {self.reduce!r}")
        if self.group is not None and self.reduce != "global":
            raise ValueError("group is the process group of reduce='global'; reduce='none' takes no group")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, options: CaptureOptions | None = None, **values: Any) -> CaptureOptions:
        """`options` (or the defaults) with `values` set; an unknown name is a TypeError that suggests the nearest."""
        known = cls.names()
        for name in values:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise TypeError(f"unknown capture option {name!r}{hint}; options: {', '.join(known)}")
        return replace(options or cls(), **values)


def tokenizer_name(tokenizer: Any) -> str | None:
    """What the manifest keeps of a `tokenizer=` option: the string itself, or a tokenizer object's name_or_path.

    A local directory is kept as an absolute path, so the trace decodes from wherever it is opened.
    """
    if tokenizer is None:
        return None
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    if not isinstance(name, str) or not name.strip():
        kind = "an empty string" if isinstance(tokenizer, str) else f"a {type(tokenizer).__name__} without a name_or_path"
        raise ValueError(f"tokenizer must be an HF tokenizer's name or path, 'bytes', or a tokenizer object with a "
                         f"name_or_path; got {kind}")
    if name != "bytes" and os.path.isdir(name):
        return os.path.abspath(name)
    return name


def auto_tokenizer(model: Any) -> str | None:
    """The tokenizer a model implies: "bytes" for moescope's byte-level reference model, an HF model's
    config._name_or_path when set; None when nothing says (ids are then shown as ids, never guessed)."""
    cfg = getattr(model, "config", None)
    if type(model).__module__ == "moescope.reference.model" and getattr(cfg, "vocab_size", None) == 256:
        return "bytes"
    name = getattr(cfg, "_name_or_path", None)
    return tokenizer_name(name) if isinstance(name, str) and name.strip() else None

"""The recorder: attaches hooks to every router of a live model and streams routing into a trace.

Router hooks run the hot path (`hotpath.py`: a handful of tensor ops into device buffers made at start, no
Python state read or written). Everything that reads Python state — the step, the tag, the token grid and
sequence sampling — happens in the entry hooks on the model (eager, also in a compiled model) and in
`set_step`/`tag`, which copy the buffer into the flush queue when (step, tag) changes. The device→host copy
happens once per flush, and Arrow conversion + Parquet compression run on a background writer thread.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from .. import __version__
from ..format.lock import RunLock, RunLocked
from ..format.manifest import CaptureSettings, Counters, LayerEntry, Manifest, ModelInfo, now_utc
from ..format.schema import TABLES
from ..format.storage import as_path, open_input
from ..format.writer import TraceWriter, set_aside_torn, step_ranges
from . import adapters as A
from .flight import FLIGHT_RULES, FlightRing, dump, precision_flips
from .hotpath import STAT_NAMES, Grid, HotPath, decode, in_backward
from .options import CaptureOptions, auto_tokenizer

_STAT_NAMES = STAT_NAMES
#: Forward parameters that carry token ids: a module taking one of these is where a forward's token grid is read.
_ID_PARAMS = ("input_ids", "decoder_input_ids", "idx", "tokens", "token_ids")


#: router_stats columns that only logits give (a spec reading probabilities leaves them NULL).
_LSE_STATS = [STAT_NAMES.index(n) for n in ("lse_sq_sum", "lse_sum", "lse_max")]


class RecordError(RuntimeError):
    """Recording cannot start (e.g. no router found); the message says how to fix it."""


class HookHandles:
    """Every hook the recorder attached; removing it detaches all of them (RemovableHandle style)."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> None:
        """Keep a torch hook handle for later removal."""
        self._handles.append(handle)

    def remove(self) -> None:
        """Detach every hook; safe to call twice."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass
class LayerInfo:
    """One hooked router."""

    layer: int
    module: str
    family: str
    n_experts: int
    top_k: int
    router_kind: str
    spec: A.RouterSpec
    experts_module: str | None = None
    grid_owners: tuple[str, ...] = ()  # enclosing modules, nearest first
    owner_grids: tuple[Grid, ...] = ()  # the token grids of those that are entry modules, nearest first
    unread_logits: bool = False  # some call's logits were not read (seen at a flush): its logit stats are NaN

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `layers` entry."""
        return {
            "layer": self.layer,
            "module": self.module,
            "family": self.family,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "router_kind": self.router_kind,
            "experts_module": self.experts_module,
            # a spec that reads no logits: this layer's logit statistics are NULL by design, not damaged data
            **({"extra": {"logits": False}} if A.reads_logits(self.spec) is False or self.unread_logits else
               # probabilities read in place of logits: entropy and margin are exact, but logsumexp of log p is
               # not the router's (its z-loss is unknown), so the lse columns are NULL by design
               {"extra": {"lse": False}} if self.spec.logits_are == "probs" else {}),
        }


def find_routers(model: nn.Module) -> list[LayerInfo]:
    """Every module of `model` that a router spec resolves, in module order; layer = index in that order."""
    named = dict(model.named_modules())
    found: list[LayerInfo] = []
    for name, mod in model.named_modules():
        spec = A.resolve(mod)
        if spec is None:
            continue
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = named.get(parent_name)
        n, k = A.router_shape(mod, spec, parent)
        if n is None or k is None:
            raise RecordError(
                f"router {name} ({type(mod).__name__}): cannot read n_experts/top_k "
                f"(spec fields n_experts={spec.n_experts!r}, top_k={spec.top_k!r})"
            )
        experts_path = f"{parent_name}.{spec.experts}" if parent_name else spec.experts
        has_experts = A.get_submodule(model, experts_path) is not None
        if spec.source == "experts_input" and not has_experts:
            raise RecordError(f"router {name}: spec {spec.family!r} reads the experts input but {experts_path} is missing")
        if spec.logits_from is not None and A.get_submodule(mod, spec.logits_from) is None:
            raise RecordError(f"router {name}: spec {spec.family!r} has logits_from={spec.logits_from!r} but "
                              f"{type(mod).__name__} has no such submodule")
        if spec.ids_fn is not None:
            try:
                A.resolve_fn(spec)  # a misspelt "pkg.module:function" fails here, before any forward
            except A.AdapterError as e:
                raise RecordError(f"router {name}: {e}") from None
        found.append(
            LayerInfo(len(found), name, spec.family, int(n), int(k), spec.router_kind, spec,
                      experts_path if has_experts else None)
        )
    return found


def last_recorded_step(run_dir: Path, rank: int) -> int | None:
    """Highest step this rank already wrote to `run_dir` (None for a new run), read from Parquet statistics."""
    import pyarrow.parquet as pq

    best: int | None = None
    d = run_dir / "expert_load"
    if not d.is_dir():
        return None
    for p in d.glob(f"part-{rank}-*.parquet"):
        try:
            md = pq.ParquetFile(open_input(p)).metadata
        except Exception:  # an unreadable part is reported by readers; it does not block recording
            continue
        col = md.schema.to_arrow_schema().get_field_index("step")
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(col).statistics
            if st is not None and st.has_min_max:
                best = st.max if best is None else max(best, st.max)
    return best


def no_router_message(model: nn.Module) -> str:
    """The error text for a model with no known router."""
    return (
        f"no MoE router found in {type(model).__name__}: none of the {len(A.all_specs())} router specs that apply "
        "to the installed versions (hooks/*.toml: transformers 4.x and 5 each have theirs) matches its modules. "
        "Register yours, e.g. moescope.register_router(MyRouter, source='output', logits=0, "
        "weights=1, ids=2, n_experts='num_experts', top_k='top_k') — see README 'Custom routers'."
    )


def _keep_sequence(seed: int, step: int, seq: int, fraction: float) -> bool:
    """Deterministic whole-sequence sampling from (seed, step, seq): every layer keeps the same tokens."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{seed}:{step}:{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class WrittenKeys:
    """The (step, tag) keys already flushed, as sorted disjoint step ranges per tag: a long run's steps are a few
    ranges, not a set that grows by one entry per step for the life of the run."""

    def __init__(self) -> None:
        self._ranges: dict[str, list[list[int]]] = {}  # tag -> sorted disjoint [first, last] step ranges

    def add(self, step: int, tag: str) -> None:
        """Mark (step, tag) written."""
        r = self._ranges.setdefault(tag, [])
        if r and r[-1][0] <= step <= r[-1][1] + 1:  # the usual case: the last range or the step after it
            r[-1][1] = max(r[-1][1], step)
            return
        i = bisect.bisect_right(r, step, key=lambda ab: ab[0])
        if i and r[i - 1][1] + 1 >= step:  # inside or just after the range before
            r[i - 1][1] = max(r[i - 1][1], step)
            i -= 1
        else:
            r.insert(i, [step, step])
        if i + 1 < len(r) and r[i + 1][0] <= r[i][1] + 1:  # now touches the next range: merge
            r[i][1] = max(r[i][1], r.pop(i + 1)[1])

    def __contains__(self, key: tuple[int, str]) -> bool:
        step, tag = key
        r = self._ranges.get(tag)
        if not r:
            return False
        i = bisect.bisect_right(r, step, key=lambda ab: ab[0]) - 1
        return i >= 0 and r[i][1] >= step


class Recorder:
    """Context manager that records routing of `model` into the run directory `path` (see README)."""

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        tokens: float | None = None,
        flush_every: int | None = None,
        *,
        options: CaptureOptions | None = None,
        **fields: Any,
    ) -> None:
        """`fields` are `CaptureOptions` fields (declared once there: tokens, flush_every, run, seed, on_full, …)."""
        given = {k: v for k, v in (("tokens", tokens), ("flush_every", flush_every)) if v is not None}
        opts = CaptureOptions.build(options, **given, **fields)
        self.options = opts
        # A model compiled before record() (torch.compile returns an OptimizedModule): hook the module it wraps.
        self.model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
        self.stats = bool(opts.stats)
        self.tokens_every = int(opts.tokens_every)
        self.run_dir = as_path(path)  # a directory or an object-store URL (moescope.format.storage)
        self.run = opts.run or self.run_dir.name
        self.tokens = float(opts.tokens)
        self.flush_every = int(opts.flush_every)
        self.seed = int(opts.seed)
        self.max_queue_bytes = int(opts.max_queue_mb * (1 << 20))
        self.on_full = opts.on_full
        self.max_rows_per_flush = int(opts.max_rows_per_flush)
        self.meta = dict(opts.meta or {})
        # How the trace decodes token ids (manifest model.tokenizer); never guessed: None when nothing says.
        self.tokenizer: str | None = opts.tokenizer or auto_tokenizer(self.model)
        self.on_flush = opts.on_flush
        self.sinks = tuple(opts.sinks)
        self.sink_errors: dict[str, int] = {}  # failed write_flush calls per sink name (manifest counters.extra)
        # Online alerts (moescope.capture.alerts) run at each flush on the host copy of the counts.
        self.on_alert = opts.on_alert
        self.raise_on = opts.raise_on
        self.alert_rules = opts.alert_rules
        self.alerts: list[Any] = []
        self._alerts_kept = 0  # alerts already queued for the trace's `alerts` table
        self._stopped_by_alert: dict[str, Any] | None = None  # the manifest's record of a raise_on stop
        self.resume = opts.resume
        self._resume_step: int | None = None
        self.skipped_forwards = 0
        rank = opts.rank
        if rank is None:
            rank = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank()
        self.rank = int(rank)
        self.world_size = (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 1
        )
        self.layers: list[LayerInfo] = []
        self._handles = HookHandles()
        self._writer: TraceWriter | None = None
        self._lock: RunLock | None = None
        self.torn_parts: list[str] = []  # parts of a crashed last flush set aside at resume
        self._loss_written_at = -math.inf  # when a loss last rewrote the manifest
        self._user_step: int | None = None
        self._forwards = 0
        self._tag_stack: list[str] = []
        self._depth = 0  # nesting of entry-module forwards; 0 between forwards
        self._hot: HotPath | None = None  # device buffers, made at start
        self._grids: dict[str, Grid] = {}  # token grid per entry module
        self._grid_layers: dict[str, list[int]] = {}
        self._key: tuple[int, str] | None = None  # (step, tag) the live buffer accumulates
        self._key_forwards: dict[tuple[int, str], int] = {}  # forwards seen per key since the last flush
        self._skipping = False  # the current forward repeats a resumed step
        self._acc: list[tuple[tuple[int, str], torch.Tensor]] = []  # buffer copies [L, W] waiting for a flush
        self._acc_steps: set[int] = set()  # steps among them in which a forward ran
        self._rows: list[tuple[int, str, int, dict[str, torch.Tensor]]] = []  # token rows waiting for a flush
        self._n_rows = 0
        self.silent_forwards = 0  # forwards in which no router hook fired (the watchdog)
        self.disabled_layers: list[dict[str, Any]] = []  # layers whose hook failed: {layer, module, family, error}
        self.entry_errors = 0  # entry pre-hook failures (the forward ran without a token grid)
        self._logits_hooks: dict[int, Callable[..., None]] = {}  # logits_from submodule hooks, per layer
        self._open = False
        self._created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.flushes = 0
        # reduce="global" (README "Running at scale"): each flush's counts are summed over the process group and
        # its first rank writes them; token rows stay per rank (each rank's sampled tokens are distinct tokens).
        self.reduce = opts.reduce
        self._group = opts.group
        self.group_size = 1
        self._reducing = False  # a collective at each flush: reduce="global" in a group of more than one rank
        self._writes_counts = True  # False on the ranks of a reduced group other than its first
        self.unreduced_close = False  # closed on an exception: the last window was written per rank
        self.unreduced: str | None = None  # why a reduce="global" recorder writes per-rank parts instead
        dist = torch.distributed
        if self.reduce == "global" and dist.is_available() and dist.is_initialized():
            if dist.get_rank(self._group) < 0:
                raise RecordError(f"rank {self.rank} is not in the process group given as group=")
            self.group_size = dist.get_world_size(self._group)
            self._reducing = self.group_size > 1
            self._writes_counts = dist.get_rank(self._group) == 0
        # (step, tag) keys already written: a forward in one of them again (after an explicit flush() mid-step,
        # or a step set back) splits its rows across two parts, which `check` reports; warned, counted
        self._written = WrittenKeys()
        self.split_keys: list[list[Any]] = []
        # The flight recorder (capture/flight.py): a device ring of the last steps' router evidence, dumped to
        # RUN/flight/ when an alert of FLIGHT_RULES fires or on dump_flight(); precision_check reads its last step.
        self.precision_check = bool(opts.precision_check)
        steps = int(opts.flight_steps) or (1 if self.precision_check else 0)
        self._flight: FlightRing | None = FlightRing(steps, int(opts.flight_tokens)) if steps else None
        self.flight_dumps: list[str] = []
        self._flight_warned = False  # the "no eager router call wrote the ring" warning was given
        self._precision_step: int | None = None  # the step whose flight sample the last router_precision rows hold

    # -- public knobs -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The current step: set by the user, else the number of top-level forwards so far."""
        return self._user_step if self._user_step is not None else max(self._forwards - 1, 0)

    @step.setter
    def step(self, value: int) -> None:
        self.set_step(value)

    def set_step(self, step: int) -> None:
        """Set the step of the following forwards (e.g. the optimizer step)."""
        self._user_step = int(step)
        self._sync_key()

    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        """Label the forwards inside the block with a data-slice tag (domain, dataset, eval split)."""
        self._tag_stack.append(str(name))
        self._sync_key()
        try:
            yield
        finally:
            self._tag_stack.pop()
            self._sync_key()

    @property
    def closed(self) -> bool:
        """True once the recorder has been closed (or before it started)."""
        return not self._open

    @property
    def current_tag(self) -> str:
        """The innermost active tag ('' when none)."""
        return self._tag_stack[-1] if self._tag_stack else ""

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None and self._reducing and self._open:
            # Leaving on an exception: the other ranks may never reach the collective, so the last window is
            # written per rank (its rows still sum to the global counts, as those of reduce="none" do).
            self._reducing, self._writes_counts = False, True
            self.unreduced_close = True
        self.close()

    def start(self) -> Recorder:
        """Find routers, attach hooks and write the manifest."""
        if self._open:
            return self
        self.layers = find_routers(self.model)
        if not self.layers:
            raise RecordError(no_router_message(self.model))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir, self.rank)
        try:
            lock.acquire()
        except RunLocked as e:
            raise RecordError(str(e)) from None
        self._lock = lock
        try:
            self._start_locked()
        except BaseException:
            lock.release()
            self._lock = None
            raise
        return self

    def _start_locked(self) -> None:
        if self.resume:
            torn = set_aside_torn(self.run_dir, self.rank)
            if torn:
                self.torn_parts = [str(p.relative_to(self.run_dir)) for p in torn]
                warnings.warn(f"moescope: {self.run_dir}: the last flush of rank {self.rank} was cut short (a crash "
                              f"between its tables); set aside {', '.join(self.torn_parts)} so every table resumes "
                              "from the same step", RuntimeWarning, stacklevel=4)
            self._resume_step = last_recorded_step(self.run_dir, self.rank)
            if self._reducing:  # the group resumes together after the last step its writer (or any rank) wrote
                self._resume_step = self._group_max_step(self._resume_step)
            if self._resume_step is not None:
                # Forward-counter steps continue after the last recorded one instead of restarting at 0.
                self._forwards = self._resume_step + 1
        self._writer = TraceWriter(self.run_dir, self.rank, self.max_queue_bytes, self.on_full, self._on_loss)
        self._hot = HotPath([li.n_experts for li in self.layers], _device_of(self.model), self.stats,
                            self.tokens > 0)
        try:
            forget_compiled(self.model)  # code compiled before the hooks existed would never call them
            self._attach()
            self._write_manifest(closed=False)
        except BaseException:
            self._handles.remove()
            self._writer.close()
            raise
        self._open = True
        self._key = (self.step, self.current_tag)

    def _on_loss(self, what: str) -> None:
        """A write failed or a flush was dropped: put the count in the manifest now (a crash may follow).

        At most every 5 s: dropping happens when the disk is slow, and a manifest write per drop would
        slow the training loop further; close() writes the final count in any case.
        """
        now = time.monotonic()
        if now - self._loss_written_at < 5.0:
            return
        self._loss_written_at = now
        self._write_manifest(closed=False)

    def close(self) -> None:
        """Flush everything, detach every hook, wait for the writer and finalise the manifest."""
        if not self._open:
            return
        self._open = False
        try:
            self._handles.remove()
            forget_compiled(self.model)  # compiled code with the hooks inlined would keep writing the buffers
            self.flush()
        finally:
            assert self._writer is not None
            self._keep_alerts()  # a raise_on stop closes from inside the flush, before the flush could queue them
            self._writer.close()
            st = self._writer.stats
            if st.lost_steps:  # reported before the manifest write, which a full disk may refuse as well
                lost = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in st.lost_steps)
                warnings.warn(f"moescope: {self.run_dir}: steps {lost} were not recorded ({len(st.errors)} write(s) "
                              f"failed, {st.dropped_flushes} flush(es) dropped){'; first: ' + st.errors[0] if st.errors else ''}",
                              RuntimeWarning, stacklevel=2)
            self._close_manifest()

    def _close_manifest(self) -> None:
        """Write the final manifest; on a full disk give the lock's reserve back and retry; then unlock."""
        try:
            try:
                self._write_manifest(closed=True)
            except OSError:
                if self._lock is not None:
                    self._lock.free_reserve()
                try:
                    self._write_manifest(closed=True)
                except OSError as e:
                    raise RecordError(f"{self.run_dir}: the final manifest could not be written ({e.__class__.__name__}:"
                                      f" {e}); its counters are out of date (losses were warned about above)") from None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # -- hooks --------------------------------------------------------------------------------
    def _attach(self) -> None:
        h = self._handles
        ks = sorted({li.top_k for li in self.layers})
        for name, mod in self._entry_modules().items():
            # Entry hooks read Python state (step, tag, sampling), so they run eagerly even in a compiled model:
            # a graph break at each entry module's call, outside every MoE block (README, "torch.compile").
            pre = torch.compiler.disable(lambda m, a, kw, _n=name: self._safe_enter(_n, a, kw, ks))
            h.add(mod.register_forward_pre_hook(pre, with_kwargs=True))
            h.add(mod.register_forward_hook(torch.compiler.disable(self._on_exit), always_call=True))
        for info in self.layers:
            info.owner_grids = tuple(self._grids[n] for n in info.grid_owners if n in self._grids)
            router_pre, router_hook, experts_hook = self._make_hooks(info)
            router = self.model.get_submodule(info.module)
            if router_pre is not None:
                h.add(router.register_forward_pre_hook(router_pre))
            h.add(router.register_forward_hook(router_hook))
            if info.spec.source == "experts_input":
                assert info.experts_module is not None
                experts = self.model.get_submodule(info.experts_module)
                h.add(experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
            if info.spec.logits_from is not None:  # find_routers checked that the submodule exists
                src = self.model.get_submodule(info.module).get_submodule(info.spec.logits_from)
                h.add(src.register_forward_hook(self._logits_hooks[info.layer]))

    def _entry_modules(self) -> dict[str, nn.Module]:
        """The model and every module enclosing a router that takes token ids: where a forward's grid is read.

        A Lightning module whose training_step calls `self.model(...)` never runs its own forward, and an
        encoder-decoder runs its decoder stack on other tokens than its encoder: so the model and every ancestor
        of a router whose forward takes token ids are hooked, the outermost one that fires starts the forward,
        and each router reads the token grid of its nearest ancestor that received token ids. Blocks inside the
        model (which take hidden states) are not hooked, so a compiled MoE block has no break.
        """
        mods: dict[str, nn.Module] = {"": self.model}
        for li in self.layers:
            parts = li.module.split(".")[:-1]
            chain = [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]
            li.grid_owners = tuple(chain)  # nearest first
            for name in chain:
                if name and name not in mods:
                    mod = self.model.get_submodule(name)
                    if _takes_token_ids(mod):
                        mods[name] = mod
        self._grids = {name: Grid() for name in mods}
        self._grid_layers = {
            name: [li.layer for li in self.layers if name in li.grid_owners] for name in mods
        }
        return mods

    def _disable_layer(self, info: LayerInfo, e: BaseException) -> None:
        """A hook of this layer failed: its capture stops, a warning says why and the manifest counts it."""
        cause = f"{type(e).__name__}: {e}"
        self.disabled_layers.append({"layer": info.layer, "module": info.module, "family": info.family,
                                     "error": cause})
        warnings.warn(f"moescope: capture of layer {info.layer} ({info.module}, spec {info.family!r}) stopped: "
                      f"{cause}", RuntimeWarning, stacklevel=4)
        if self._open:
            with contextlib.suppress(OSError):  # the count is in the manifest now, should the run crash later
                self._write_manifest(closed=False)

    def _safe_enter(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ks: list[int]) -> None:
        """The entry pre-hook; a failure reading the token grid never reaches the user's forward."""
        try:
            self._on_enter(name, args, kwargs, ks)
        except Exception as e:  # the forward runs on; its routers count without a token grid (no padding mask)
            for g in self._grids.values():
                g.active = False
            self.entry_errors += 1
            if self.entry_errors == 1:
                warnings.warn(f"moescope: reading the token grid at {name or type(self.model).__name__}'s input failed"
                              f" ({type(e).__name__}: {e}); routers count every token of such forwards",
                              RuntimeWarning, stacklevel=3)

    def _on_enter(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ks: list[int]) -> None:
        if in_backward():
            return  # an activation-checkpoint recompute: this forward was recorded already
        outer = self._depth == 0
        self._depth += 1
        if outer:
            self._begin_forward()
        if self._skipping:  # a resumed step being skipped
            return
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("decoder_input_ids") if name == "" and "decoder_input_ids" in kwargs else None
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            for g in self._grids.values():
                # Inner modules handed the same ids (DeepSeek-V4's hash router) add nothing and lack the mask.
                if g.active and g.token_ids is not None and g.token_ids.shape == ids.shape \
                        and g.token_ids.data_ptr() == ids.data_ptr():
                    return
            self._fill_grid(name, ids, kwargs, ks)

    def _on_exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if in_backward():
            return
        self._depth = max(0, self._depth - 1)

    def _begin_forward(self) -> None:
        self._collect_rows()
        if self._n_rows >= self.max_rows_per_flush:
            # Reduced counts flush with the group (steps); the row cap differs per rank, so it writes rows only.
            self._flush_rows() if self._reducing else self.flush(hold_current=True)
        for g in self._grids.values():
            g.active = False
        self._forwards += 1
        step = self.step
        self._skipping = self._resume_step is not None and step <= self._resume_step
        if self._skipping:
            # A run resumed from a checkpoint repeats steps the trace already holds: record them once.
            self.skipped_forwards += 1
        self._sync_key()
        if self._flight is not None and not self._skipping:
            self._flight.begin_step(step, self.current_tag)
        if self._key is not None:
            self._key_forwards[self._key] = self._key_forwards.get(self._key, 0) + 1
            if self._key in self._written and not self._skipping and list(self._key) not in self.split_keys:
                self._split(self._key)

    def _fill_grid(self, name: str, ids: torch.Tensor, kwargs: dict[str, Any], ks: list[int]) -> None:
        """Token ids, padding mask, absolute positions and the sampled sequences of one forward, on the host."""
        assert self._hot is not None and self._key is not None
        g = self._grids[name]
        step, tag = self._key
        b, s = ids.shape
        dev = ids.device
        self._hot.to(dev)
        mask = kwargs.get("attention_mask")
        pos_ids = kwargs.get("position_ids")
        cache_pos = kwargs.get("cache_position")
        has_mask = isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b
        if has_mask:
            # During cached decoding the mask covers past + new tokens; the routers see only the new ones.
            g.fill(mask[:, -s:].reshape(-1).to(torch.float32), ks)  # [B*S]
        elif g.valid is None or g.has_mask or g.valid.shape[0] != b * s or g.valid.device != dev:
            g.fill(torch.ones(b * s, dtype=torch.float32, device=dev), ks)  # kept while the shape holds
        g.has_mask = has_mask
        g.active = True
        g.token_ids = ids
        if self._flight is not None:
            self._flight.take_tokens(g, ids)
        g.step, g.tag = step, tag
        if self.tokens <= 0:
            return
        if step % self.tokens_every:  # token rows on every tokens_every-th step only; the counts cover every step
            g.keep_n = 0
            return
        if isinstance(pos_ids, torch.Tensor) and pos_ids.shape[-1] == s:
            pos = pos_ids.reshape(-1, s).expand(b, s)
        elif has_mask:
            # Position = number of real tokens before this one, as generate() numbers left-padded prompts.
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -s:]  # [B, S]
        elif isinstance(cache_pos, torch.Tensor) and cache_pos.numel() == s:
            pos = cache_pos.reshape(1, s).expand(b, s)
        else:
            pos = torch.arange(s, device=dev).reshape(1, s).expand(b, s)  # [B, S]
        seqs = [i for i in range(b) if _keep_sequence(self.seed, step, i, self.tokens)]
        g.keep_rows = None
        g.keep_n = len(seqs) * s
        flat_pos, flat_tok = pos.reshape(-1), ids.detach().reshape(-1)  # [B*S]
        assert g.valid is not None
        if len(seqs) == b:
            g.keep_seq = torch.arange(b, device=dev).repeat_interleave(s)
            g.keep_pos, g.keep_tok, g.keep_valid = flat_pos, flat_tok, g.valid
        elif seqs:
            kept = torch.tensor(seqs, dtype=torch.long)
            rows = (kept[:, None] * s + torch.arange(s)[None, :]).reshape(-1)  # [n]
            g.keep_rows = rows.to(dev, non_blocking=True)
            g.keep_seq = kept.repeat_interleave(s).to(dev, non_blocking=True)
            g.keep_pos, g.keep_tok = flat_pos[g.keep_rows], flat_tok[g.keep_rows]
            g.keep_valid = g.valid[g.keep_rows]
        # Fresh row buffers every forward (the previous ones went to the flush queue); a layer whose router
        # does not run leaves ids at -1, and the flush drops those rows.
        g.rows.clear()
        for layer in self._grid_layers[name]:
            k = self.layers[layer].top_k
            g.rows[layer] = (
                torch.full((b * s, k), -1, dtype=torch.long, device=dev),  # [T, k]
                torch.empty(b * s, k, dtype=torch.float32, device=dev),  # [T, k]
                torch.full((b * s, 4), math.nan, dtype=torch.float32, device=dev),  # [T, 4]
            )

    def _collect_rows(self) -> None:
        """Queue the token rows the last forward wrote (sampled sequences only) for the next flush."""
        for g in self._grids.values():
            if not g.rows:
                continue
            if g.active and g.keep_n:
                r = g.keep_rows
                for layer, (ids, w, st) in g.rows.items():
                    self._rows.append((g.step, g.tag, layer, {
                        "seq": g.keep_seq, "pos": g.keep_pos, "token_id": g.keep_tok, "valid": g.keep_valid,
                        "experts": ids if r is None else ids[r],
                        "weights": w if r is None else w[r],
                        "stats4": st if r is None else st[r],
                        # experts holds slot columns (1 + expert); E tells the flush which ones are no expert
                        "n_experts": torch.tensor(self.layers[layer].n_experts),
                    }))
                    self._n_rows += g.keep_n
            g.rows.clear()

    def _sync_key(self) -> None:
        """Start a new accumulation window when (step, tag) changed: the buffer's copy joins the flush queue."""
        if self._hot is None or not self._open:
            return
        key = (self.step, self.current_tag)
        if key == self._key:
            return
        self._retire()
        self._key = key
        self._maybe_flush()

    def _retire(self) -> None:
        """Queue a copy of the live buffer under the current key (unless that step is a resumed one) and reset it."""
        assert self._hot is not None
        if self._key is None:
            return
        snap = self._hot.snapshot()
        if self._resume_step is None or self._key[0] > self._resume_step:
            self._acc.append((self._key, snap))
            if self._key_forwards.get(self._key):  # a step counts towards flush_every once a forward ran in it
                self._acc_steps.add(self._key[0])

    def _make_hooks(self, info: LayerInfo) -> tuple[Callable[..., None] | None, Callable[..., None],
                                                     Callable[..., None]]:
        """The router pre-hook (None when there is nothing for it to do), the router forward hook and, for
        experts_input specs, the experts pre-hook of one layer."""
        stash: dict[str, Any] = {}
        hot = self._hot
        assert hot is not None
        layer, spec, n, k, grids = info.layer, info.spec, info.n_experts, info.top_k, info.owner_grids

        def grid() -> Grid | None:
            for g in grids:
                if g.active:
                    return g
            return None

        flight = self._flight
        failed: list[BaseException] = []
        checked: list[bool] = []  # the first eager call validated the spec's reading

        def guarded(fn: Callable[[], None]) -> None:
            """Run a hook body; in eager, an exception stops this layer's capture with a warning, never the forward."""
            if failed:  # stopped in eager: compiled code made later must not resume it (a guard on an empty list)
                return
            if torch.compiler.is_compiling():
                fn()  # traced: a failure surfaces while compiling, where no forward has run yet
                return
            try:
                fn()
            except Exception as e:  # the user's forward must not fail because of moescope
                failed.append(e)
                stash.clear()
                self._disable_layer(info, e)

        def tokens() -> tuple[int, int] | None:
            g = grid()
            return tuple(g.token_ids.shape) if g is not None and g.token_ids is not None else None  # type: ignore[return-value]

        def add(ev: A.RouterEvent) -> None:
            if not torch.compiler.is_compiling() and not checked:
                A.check_event(spec, ev, n, k, tokens())  # once, eager: never a silently wrong trace
                checked.append(True)
            x = stash.pop("x", None)  # the router input, kept by the pre-hook only when the flight ring wants it
            bs = tokens() if spec.token_layout == "seq_first" else None
            if bs is not None:
                ev = A.to_batch_first(ev, *bs)
            g = grid()
            # eager only (the pre-hook keeps x only then): the ring's slot is chosen on the host, the hot path fills it
            target = flight.prepare(layer, n, x, ev, stash.pop("raw_dtype", None), g, bs) if x is not None else None
            if target is None:  # every compiled call, and every eager call but the ring's one per layer and step
                hot.update(layer, ev, g, spec.probs)
                return
            try:
                hot.update(layer, ev, g, spec.probs, target)
            except Exception:
                flight.discard(layer)  # its input rows are in, the rest is not: keep no half-written slot
                raise

        def on_router(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if "x" in stash:  # the flight ring samples this call: the dtype the router returned its logits in
                raw = A._pick(output, spec.logits) if spec.logits_are != "none" else None
                stash["raw_dtype"] = raw.dtype if isinstance(raw, torch.Tensor) else None
            if not torch.compiler.is_compiling() and not checked:
                A.check_output(spec, output, n, k, tokens(), stash.get("logits_out"))
            ev = A.extract_router_output(spec, output, n, k, module=module, args=args,
                                         logits_out=stash.pop("logits_out", None))
            if ev is None:
                stash.pop("x", None)  # never hold an activation past its call
                return
            if spec.source == "experts_input":
                stash["logits"] = ev.logits  # completed by the experts pre-hook
                return
            add(ev)

        def on_experts(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids, w = A.extract_experts_input(spec, args, kwargs, n)
            add(A.RouterEvent(stash.pop("logits", None), ids, w))

        def router_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if in_backward():
                return  # an activation-checkpoint recompute: the forward's call was recorded already
            # What the stash holds belongs to one router call: an experts module called inside the router's own
            # forward (Doge) reads it before the router's hook runs, so leftovers of the last call go here.
            stash.pop("logits", None)
            stash.pop("raw_dtype", None)
            stash.pop("x", None)
            # the flight ring copies one call per layer and step: later calls keep nothing and look at nothing
            if flight is not None and not torch.compiler.is_compiling() and not in_backward() and not failed \
                    and flight.wants(layer) and args and isinstance(args[0], torch.Tensor):
                stash["x"] = args[0]

        def router_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if in_backward():
                return  # an activation-checkpoint recompute: recorded in the forward already
            with torch.no_grad():
                guarded(lambda: on_router(module, args, output))

        def experts_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if in_backward():
                return
            with torch.no_grad():
                guarded(lambda: on_experts(args, kwargs))

        def logits_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # logits_from: the submodule runs inside the router's forward, before the router's own hook reads this
            if in_backward():
                return
            if isinstance(output, torch.Tensor):
                stash["logits_out"] = output.detach()

        self._logits_hooks[info.layer] = logits_hook
        pre = router_pre_hook if flight is not None or spec.source == "experts_input" else None
        return pre, router_hook, experts_hook

    # -- flushing -----------------------------------------------------------------------------
    def _maybe_flush(self) -> None:
        if len(self._acc_steps - self._held_steps()) >= self.flush_every:
            self.flush(hold_current=True)

    def _held_steps(self) -> set[int]:
        """The step still in progress: an automatic flush keeps its counts so a (step, tag) is written once."""
        return {self._key[0]} if self._key is not None else set()

    def flush(self, hold_current: bool = False) -> None:
        """Copy the buffers to the host (one sync) and hand them to the writer thread.

        Called by you (or a callback at the end of a step), it writes everything: the current step is taken as
        complete. The recorder's own flushes (`hold_current`) keep the counts of the step still in progress, so
        the rows of one (rank, step, tag, layer, expert) never span two parts (tags re-entered within a step,
        gradient accumulation, the token-row cap). Under reduce="global" a flush is collective: every rank of the
        group calls it at the same step (the recorder's own flushes come at the same steps on every rank).
        """
        if self._hot is None:
            return
        self._collect_rows()
        if self._reducing and self._user_step is None:
            self._stop_reducing()
        held = self._held_steps() if hold_current else set()
        if not held and self._key is not None and (self._resume_step is None or self._key[0] > self._resume_step):
            self._acc.append((self._key, self._hot.snapshot()))
        acc = [a for a in self._acc if a[0][0] not in held]
        self._acc = [a for a in self._acc if a[0][0] in held]
        self._acc_steps &= held
        rows, self._rows = self._rows, []
        self._n_rows = 0
        forwards = {key: n for key, n in self._key_forwards.items() if key[0] not in held}
        self._key_forwards = {key: n for key, n in self._key_forwards.items() if key[0] in held}
        for step, tag in {key for key, _ in acc}:
            self._written.add(step, tag)
        if not acc and not rows and not self._reducing:  # a reduced flush is collective: every rank joins it
            return
        load_host: list[tuple[int, str, int, np.ndarray]] = []
        stats_host: list[tuple[int, str, int, np.ndarray]] = []
        merged: dict[tuple[int, str], np.ndarray] = {}
        if acc:
            flat = torch.stack([a for _, a in acc]).cpu().numpy()  # [N, L, W]: one device→host copy per flush
            for (key, _), arr in zip(acc, flat, strict=True):
                if key in merged:  # the same (step, tag) again (tags left and re-entered): sums add, maxima max
                    prev = merged[key]
                    lmax = np.maximum(prev[:, -1], arr[:, -1])
                    prev += arr
                    prev[:, -1] = lmax
                else:
                    merged[key] = arr.copy()
        if self._reducing:
            merged = self._reduce(merged)  # every rank gets the group's sums over the union of its ranks' keys
            if not merged and not rows:
                return
        for (step, tag), arr in merged.items():
            seen = False
            for li in self.layers:
                load, st = decode(arr[li.layer], li.n_experts, self.stats)
                if st[0] <= 0 and not load[:, 0].any():
                    continue  # this router did not run under this key
                li.unread_logits |= bool(self.stats and np.isnan(st[1]))  # the manifest says why (to_manifest)
                if li.spec.logits_are == "probs":
                    st[_LSE_STATS] = np.nan  # logsumexp(log p) is no router logit statistic
                seen = True
                load_host.append((step, tag, li.layer, load))
                stats_host.append((step, tag, li.layer, st))
            # layers whose capture a hook failure stopped are silent for a known reason (warned, in the manifest)
            if not seen and forwards.get((step, tag), 0) and len(self.disabled_layers) < len(self.layers):
                self._silent(forwards[(step, tag)])
        rows_host: list[tuple[int, str, int, dict[str, np.ndarray]]] = [
            (step, tag, layer, {k: v.cpu().numpy() for k, v in row.items()}) for step, tag, layer, row in rows
        ]
        # A reduced group's other ranks write their token rows only; every rank's on_flush and alerts see the sums.
        load_w, stats_w = (load_host, stats_host) if self._writes_counts else ([], [])
        nbytes = sum(a.nbytes for *_, a in load_w) + sum(
            sum(v.nbytes for v in r.values()) for *_, r in rows_host
        )
        nrows = sum(len(r["seq"]) for *_, r in rows_host)
        steps = {s for s, *_ in load_w} | {s for s, *_ in rows_host}
        self.flushes += 1
        run, rank = self.run, self.rank

        def make() -> dict[str, pa.Table]:
            return _to_tables(run, rank, load_w, stats_w, rows_host)

        assert self._writer is not None
        tables: dict[str, pa.Table] | None = None
        if self.on_flush is not None:
            tables = _to_tables(run, rank, load_host, stats_host, rows_host)
            kept = tables if self._writes_counts else {k: v for k, v in tables.items() if k == "routing"}
            if kept:
                self._writer.submit(lambda: kept, nbytes, nrows, steps)
            self.on_flush(self, tables)
        elif load_w or rows_host:
            self._writer.submit(make, nbytes, nrows, steps)
        if self.sinks and load_w:  # where the counts are written: a reduced group's sums reach the sinks once
            # Sinks read the counts only: built here from the host copy, the token rows stay on the writer thread.
            self._write_sinks(tables if tables is not None else _to_tables(run, rank, load_w, stats_w, []))
        if self._flight is not None:
            self._flight_unwritten()
        if self.precision_check:
            self._precision_rows()
        if self.on_alert is not None or self.raise_on is not None or self.alert_rules is not None \
                or self._flight is not None:
            from .alerts import RoutingCollapseError, evaluate_flush

            try:
                fired = evaluate_flush(self, load_host, stats_host)
            except RoutingCollapseError as e:
                # evaluate_flush closed the recorder (its alerts went out with the writer); the manifest says why.
                self._dump_on(e.alerts)
                hit = e.alerts[0] if e.alerts else None
                if hit is not None:
                    self._stopped_by_alert = {"step": int(hit.step_end), "step_start": int(hit.step_start),
                                              "rule": hit.rule, "layer": int(hit.layer), "status": hit.status,
                                              "raise_on": self.raise_on, "message": hit.message}
                    self._write_manifest(closed=True)
                raise
            self._dump_on(fired)
            self._keep_alerts()

    def _dump_on(self, alerts: Sequence[Any]) -> None:
        """Dump the flight ring when an alert of FLIGHT_RULES fired (once per flush; a failure only warns)."""
        hits = [a for a in alerts or () if a.rule in FLIGHT_RULES]
        if self._flight is None or not hits or not self.options.flight_steps:
            return
        try:
            self.dump_flight(reason=hits[0].rule, alerts=hits)
        except Exception as e:  # evidence is a bonus: never the reason training stops
            warnings.warn(f"moescope: flight dump failed: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)

    def dump_flight(self, reason: str = "manual", alerts: Sequence[Any] = ()) -> Path | None:
        """Write the flight ring (the last `flight_steps` steps' router evidence) to RUN/flight/; its folder, or None."""
        if self._flight is None:
            raise RecordError("dump_flight() needs the flight recorder: record(..., flight_steps=N)")
        path = dump(self._flight, self.layers, self.model, self.run_dir, self.rank, reason, alerts)
        if path is not None:
            self.flight_dumps.append(path.name)
            if self._open:
                self._write_manifest(closed=False)
        return path

    def _flight_unwritten(self) -> None:
        """Warn once when a step ran but no router call wrote the flight ring (compiled or CUDA-graph code skips it):
        its dumps and precision rows would otherwise be missing without a word."""
        ring = self._flight
        if ring is None or ring.step is None or self._flight_warned:
            return
        if not any(r.rows[ring.slot] for r in ring.layers.values()):
            self._flight_warned = True
            warnings.warn(f"moescope: step {ring.step}: no router call wrote the flight ring (it is written in eager "
                          "code only; compiled and CUDA-graph router calls skip it), so flight dumps and "
                          "precision_check rows are missing for such steps", RuntimeWarning, stacklevel=4)

    def _precision_rows(self) -> None:
        """One router_precision row per layer: the latest flight sample routed in the model's dtype and in float32."""
        ring = self._flight
        if ring is None or ring.step is None or ring.slot < 0 or self._writer is None:
            return
        if ring.step == self._precision_step:
            return  # this sample was routed at an earlier flush (a flush() within the step): one row per step
        self._precision_step = ring.step
        rows = []
        for li in self.layers:
            r = ring.layers.get(li.layer)
            n = r.rows[ring.slot] if r is not None else 0
            if not n:
                continue
            got = precision_flips(self.model.get_submodule(li.module), li.spec, r.x[ring.slot, :n],
                                  li.n_experts, li.top_k)
            if got is not None:
                rows.append({"run": self.run, "rank": self.rank, "step": ring.step, "tag": ring.tag,
                             "layer": li.layer, "sampled": int(n), "flipped": int(got[2].sum())})
        if rows:
            table = pa.Table.from_pylist(rows, schema=TABLES["router_precision"])
            self._writer.submit(lambda: {"router_precision": table}, table.nbytes)

    def _flush_rows(self) -> None:
        """Hand this rank's token rows to the writer, keeping the counts (reduce="global": the row cap was reached)."""
        self._collect_rows()
        rows, self._rows = self._rows, []
        self._n_rows = 0
        if not rows:
            return
        rows_host = [(step, tag, layer, {k: v.cpu().numpy() for k, v in row.items()}) for step, tag, layer, row in rows]
        nbytes = sum(sum(v.nbytes for v in r.values()) for *_, r in rows_host)
        nrows = sum(len(r["seq"]) for *_, r in rows_host)
        tables = _to_tables(self.run, self.rank, [], [], rows_host)
        assert self._writer is not None
        self._writer.submit(lambda: tables, nbytes, nrows, {s for s, *_ in rows_host})
        if self.on_flush is not None:
            self.on_flush(self, tables)

    def _reduce(self, merged: dict[tuple[int, str], np.ndarray]) -> dict[tuple[int, str], np.ndarray]:
        """One flush's [L, W] buffers per (step, tag) summed over the group; maxima (the last column) by MAX.

        The ranks may hold different keys (a tag one rank entered alone): the union is reduced, a key a rank
        did not see adding zeros to its sums and -inf to its maxima. Three collectives, all off the hot path:
        the keys (a few bytes each), the sums [K, L, W] and the maxima [K, L].
        """
        dist = torch.distributed
        assert self._hot is not None
        gathered: list[Any] = [None] * self.group_size
        dist.all_gather_object(gathered, sorted(merged), group=self._group)
        keys = sorted({(int(s), str(t)) for ks in gathered for s, t in ks})
        if not keys:
            return {}
        n_layers, w = self._hot.acc.shape
        buf = np.zeros((len(keys), n_layers, w), np.float64)  # [K, L, W]
        buf[:, :, -1] = -np.inf
        at = {key: i for i, key in enumerate(keys)}
        for key, arr in merged.items():
            buf[at[key]] = arr
        sums = torch.from_numpy(buf).to(self._collective_device())  # [K, L, W]
        maxima = sums[:, :, -1].clone()  # [K, L]
        sums[:, :, -1] = 0.0
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self._group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self._group)
        sums[:, :, -1] = maxima
        out = sums.cpu().numpy()
        return {key: out[i] for i, key in enumerate(keys)}

    def _group_max_step(self, step: int | None) -> int | None:
        """The highest step any rank of the reduced group recorded (a resumed group skips the same steps)."""
        dist = torch.distributed
        none = -(1 << 62)
        t = torch.tensor([none if step is None else int(step)], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        best = int(t.item())
        return None if best == none else best

    def _collective_device(self) -> torch.device:
        """Where the group's collectives run: the current GPU under NCCL, else the host (gloo)."""
        backend = str(torch.distributed.get_backend(self._group)).lower()
        return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def _stop_reducing(self) -> None:
        """reduce="global" without steps set by the loop: write per-rank parts (warned once, in the manifest).

        A flush under reduce="global" is a collective, so every rank must flush at the same steps. Steps counted
        from forwards (no `rec.step = ...`) differ between ranks as soon as one runs a forward the others do not
        (evaluation on rank 0 alone), and the others would wait in the collective until the process group's
        timeout: a monitor must never hang the run, so such a recorder keeps per-rank parts (they sum the same).
        """
        self._reducing, self._writes_counts = False, True
        self.unreduced = "steps counted from forwards (rec.step never set)"
        warnings.warn(f"moescope: rank {self.rank}: reduce='global' needs the loop to set rec.step (the Lightning and "
                      "HF callbacks do); with steps counted from forwards the ranks may flush at different times, so "
                      "this run writes per-rank parts instead (analyses sum them the same)", RuntimeWarning,
                      stacklevel=4)

    def _split(self, key: tuple[int, str]) -> None:
        """A forward in a (step, tag) already written: its rows will span two parts (warned once per key)."""
        self.split_keys.append([key[0], key[1]])
        warnings.warn(f"moescope: step {key[0]}{f' tag {key[1]!r}' if key[1] else ''} was already flushed and "
                      "records again: its rows span two parts, which `moescope check` reports as an ERROR; call "
                      "flush() only between steps and keep steps increasing", RuntimeWarning, stacklevel=4)

    def _write_sinks(self, tables: dict[str, pa.Table]) -> None:
        """Hand one flush to every metric sink; a failing sink is warned about once and counted, never raised."""
        for sink in self.sinks:
            try:
                sink.write_flush(tables)
            except Exception as e:  # a metrics backend being down must not stop training or lose the trace
                name = str(getattr(sink, "name", "") or type(sink).__name__)
                if name not in self.sink_errors:
                    warnings.warn(f"moescope: metric sink {name} failed: {type(e).__name__}: {e}; later failures "
                                  "of this sink are only counted (manifest counters.extra.sink_errors)",
                                  RuntimeWarning, stacklevel=3)
                self.sink_errors[name] = self.sink_errors.get(name, 0) + 1

    def _silent(self, n: int) -> None:
        """The watchdog: forwards ran but no router hook fired (compiled code without the hooks, a wrong model)."""
        if not self.silent_forwards:
            warnings.warn(
                f"moescope: {n} forward(s) ran but no router hook fired; if the model was compiled before "
                "record() in another way than torch.compile(model), call torch._dynamo.reset() before record()",
                stacklevel=3,
            )
        self.silent_forwards += n

    def _keep_alerts(self) -> None:
        """Queue the alerts raised since the last call as rows of the trace's `alerts` table (writer thread)."""
        new = self.alerts[self._alerts_kept :]
        if not new or self._writer is None:
            return
        self._alerts_kept = len(self.alerts)
        if not self._writes_counts:
            return  # reduce="global": the group's writer keeps the alerts of the group's sums, once
        table = alerts_table(self.run, self.rank, new)
        self._writer.submit(lambda: {"alerts": table}, table.nbytes)

    def wait(self) -> None:
        """Block until every flushed batch is on disk (tests, checkpoints)."""
        if self._writer is not None:
            self._writer.wait()

    def _write_manifest(self, closed: bool) -> None:
        stats = self._writer.stats if self._writer is not None else None
        n_params = sum(p.numel() for p in self.model.parameters())
        Manifest(
            run=self.run,
            created=self._created,
            updated=now_utc(),
            closed=closed,
            moescope_version=__version__,
            model=ModelInfo(type(self.model).__name__, int(n_params), tokenizer=self.tokenizer),
            layers=[LayerEntry(**li.to_manifest()) for li in self.layers],
            capture=CaptureSettings(
                tokens=self.tokens,
                flush_every=self.flush_every,
                seed=self.seed,
                on_full=self.on_full,
                max_queue_mb=self.max_queue_bytes / (1 << 20),
                tokens_every=self.tokens_every,
                reduce=self.reduce,
                reduce_group_size=self.group_size if self.reduce == "global" else None,
                extra={"stats": self.stats},
            ),
            counters=Counters(
                forwards=self._forwards,
                flushes=self.flushes,
                parts_written=stats.parts_written if stats else 0,
                rows_written=dict(stats.rows_written) if stats else {},
                dropped_flushes=stats.dropped_flushes if stats else 0,
                dropped_records=stats.dropped_rows if stats else 0,
                skipped_resumed_forwards=self.skipped_forwards,
                resumed_after_step=self._resume_step,
                write_errors=list(stats.errors) if stats else [],
                lost_steps=step_ranges(s for a, b in stats.lost_steps for s in range(a, b + 1)) if stats else [],
                extra={"silent_forwards": self.silent_forwards,
                       **({"disabled_layers": self.disabled_layers} if self.disabled_layers else {}),
                       **({"entry_hook_errors": self.entry_errors} if self.entry_errors else {}),
                       **({"sink_errors": dict(self.sink_errors)} if self.sink_errors else {}),
                       **({"unreduced_close": True} if self.unreduced_close else {}),
                       **({"unreduced": self.unreduced} if self.unreduced else {}),
                       **({"split_keys": self.split_keys} if self.split_keys else {}),
                       **({"flight_dumps": self.flight_dumps} if self.flight_dumps else {}),
                       **({"torn_parts_set_aside": self.torn_parts} if self.torn_parts else {})},
            ),
            rank=self.rank,
            world_size=self.world_size,
            meta=self.meta,
            stopped_by_alert=self._stopped_by_alert,
        ).write(self.run_dir, self.rank)


def _takes_token_ids(mod: nn.Module) -> bool:
    """Whether a module's forward has a token-ids parameter (blocks take hidden states and are not entry modules)."""
    try:
        params = inspect.signature(mod.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(p in params for p in _ID_PARAMS)


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's weights live (the buffers follow the model if it moves later)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forget_compiled(model: nn.Module) -> None:
    """Drop torch.compile's cached code of this model's forwards, so the next call compiles with the hooks.

    Dynamo caches code per code object and does not guard on hooks added or removed later: a model (or
    another instance of its classes) compiled and run before record() would keep running code without them.
    """
    import sys

    if "torch._dynamo" not in sys.modules:
        return
    codes = {nn.Module._call_impl.__code__, nn.Module._wrapped_call_impl.__code__}
    for mod in model.modules():
        fwd = getattr(type(mod), "forward", None)
        if fwd is not None and hasattr(fwd, "__code__"):
            codes.add(fwd.__code__)
    for code in codes:
        torch._dynamo.reset_code(code)


def _to_tables(
    run: str,
    rank: int,
    load_host: list[tuple[int, str, int, np.ndarray]],
    stats_host: list[tuple[int, str, int, np.ndarray]],
    rows_host: list[tuple[int, str, int, dict[str, np.ndarray]]],
) -> dict[str, pa.Table]:
    """Build the Arrow tables of one flush (runs on the writer thread).

    Token rows hold the hot path's slot columns (1 + expert; 0 and E + 1 for ids that are no expert): a slot
    that reached no expert is stored NULL in `experts` and `weights`, never as an expert id.
    """
    out: dict[str, pa.Table] = {}
    if load_host:
        steps, tags, layers, experts, cols = [], [], [], [], []
        for step, tag, layer, arr in load_host:  # arr [E, 3]
            e = arr.shape[0]
            steps.append(np.full(e, step, np.int64))
            tags.extend([tag] * e)
            layers.append(np.full(e, layer, np.int16))
            experts.append(np.arange(e, dtype=np.int16))
            cols.append(arr)
        mat = np.concatenate(cols)
        n = mat.shape[0]
        out["expert_load"] = pa.table(
            {
                "run": pa.array([run] * n, pa.string()),
                "rank": np.full(n, rank, np.int16),
                "step": np.concatenate(steps),
                "tag": pa.array(tags, pa.string()),
                "layer": np.concatenate(layers),
                "expert": np.concatenate(experts),
                "tokens": np.rint(mat[:, 0]).astype(np.int64),
                "prob_sum": mat[:, 1],
                "weight_sum": mat[:, 2],
            }
        )
        st = np.stack([s for *_, s in stats_host])  # [M, 8]
        m = st.shape[0]
        d: dict[str, Any] = {
            "run": pa.array([run] * m, pa.string()),
            "rank": np.full(m, rank, np.int16),
            "step": np.array([s for s, *_ in stats_host], np.int64),
            "tag": pa.array([t for _, t, *_ in stats_host], pa.string()),
            "layer": np.array([lay for _, _, lay, _ in stats_host], np.int16),
        }
        for i, name in enumerate(_STAT_NAMES):
            col = st[:, i]
            if name in ("tokens", "nonfinite", "dropped"):
                unknown = np.isnan(col)  # nonfinite under stats=False: not measured, stored NULL (never 0)
                d[name] = pa.array(np.rint(np.where(unknown, 0, col)).astype(np.int64), mask=unknown)
            elif name == "lse_max":
                d[name] = np.where(np.isfinite(col), col, np.nan)
            else:
                d[name] = col
        out["router_stats"] = pa.table(d)
    if rows_host:
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("step", "layer", "seq", "pos", "token_id", "entropy", "lse", "margin")
        }
        experts_l: list[np.ndarray] = []
        weights_l: list[np.ndarray] = []
        nulls_l: list[np.ndarray] = []  # [n, k] True where a slot reached no expert
        tags_l: list[str] = []
        for step, tag, layer, r in rows_host:
            keep = (r["valid"] > 0) & (r["experts"][:, 0] >= 0)  # real tokens of routers that ran
            n = int(keep.sum())
            parts["step"].append(np.full(n, step, np.int64))
            parts["layer"].append(np.full(n, layer, np.int16))
            parts["seq"].append(r["seq"][keep].astype(np.int32))
            parts["pos"].append(r["pos"][keep].astype(np.int32))
            parts["token_id"].append(r["token_id"][keep].astype(np.int32))
            st = r["stats4"][keep]  # [n, 4]: entropy, top-1, top-2, lse
            for name, col in (("entropy", st[:, 0]), ("lse", st[:, 3]), ("margin", st[:, 1] - st[:, 2])):
                parts[name].append(col.astype(np.float16))
            slot = r["experts"][keep]  # [n, k] slot columns
            experts_l.append((slot - 1).astype(np.int16))
            weights_l.append(r["weights"][keep].astype(np.float16))
            nulls_l.append((slot < 1) | (slot > int(r["n_experts"])))
            tags_l.extend([tag] * n)
        cols = {k: np.concatenate(v) for k, v in parts.items()}
        # Sorting by (step, layer, seq, pos) gives long runs that Parquet's RLE/dictionary encodings compress.
        order = np.lexsort((cols["pos"], cols["seq"], cols["layer"], cols["step"]))
        n = len(order)
        nulls = np.concatenate(nulls_l) if nulls_l else np.zeros((0, 1), bool)
        ex = _fixed_list(np.concatenate(experts_l) if experts_l else np.zeros((0, 1), np.int16), pa.int16(), order,
                         nulls)
        wt = _fixed_list(np.concatenate(weights_l) if weights_l else np.zeros((0, 1), np.float16), pa.float16(),
                         order, nulls)
        tags_arr = np.array(tags_l, dtype=object)[order] if n else np.array([], dtype=object)
        out["routing"] = pa.table(
            {
                "run": pa.array([run] * n, pa.string()),
                "rank": np.full(n, rank, np.int16),
                "step": cols["step"][order],
                "tag": pa.array(tags_arr, pa.string()),
                "layer": cols["layer"][order],
                "seq": cols["seq"][order],
                "pos": cols["pos"][order],
                "token_id": cols["token_id"][order],
                "experts": ex,
                "weights": wt,
                "entropy": cols["entropy"][order],
                "lse": cols["lse"][order],
                "margin": cols["margin"][order],
            }
        )
    return out


def _fixed_list(mat: np.ndarray, typ: pa.DataType, order: np.ndarray, nulls: np.ndarray | None = None) -> pa.Array:
    """A [n, k] matrix as an Arrow list column (k values per row, NULL where `nulls`) without a Python loop."""
    mat = np.ascontiguousarray(mat[order])
    n, k = mat.shape if mat.ndim == 2 else (len(mat), 1)
    offsets = np.arange(0, n * k + 1, k, dtype=np.int32)
    mask = np.ascontiguousarray(nulls[order]).reshape(-1) if nulls is not None and nulls.any() else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(mat.reshape(-1), typ, mask=mask))


def alerts_table(run: str, rank: int, alerts: list[Any]) -> pa.Table:
    """Rows of the trace's `alerts` table from capture.alerts.Alert objects (schema.ALERTS)."""
    return pa.table(
        {
            "run": pa.array([a.run or run for a in alerts], pa.string()),
            "rank": pa.array([int(a.rank) if a.rank is not None else rank for a in alerts], pa.int16()),
            "step": pa.array([int(a.step_end) for a in alerts], pa.int64()),
            "step_start": pa.array([int(a.step_start) for a in alerts], pa.int64()),
            "layer": pa.array([int(a.layer) for a in alerts], pa.int16()),
            "rule": pa.array([a.rule for a in alerts], pa.string()),
            "status": pa.array([a.status for a in alerts], pa.string()),
            "value": pa.array([float(a.value) for a in alerts], pa.float64()),
            "threshold": pa.array([float(a.threshold) for a in alerts], pa.float64()),
            "experts": pa.array([[int(e) for e in a.experts] for a in alerts], pa.list_(pa.int16())),
            "message": pa.array([a.message for a in alerts], pa.string()),
        }
    )

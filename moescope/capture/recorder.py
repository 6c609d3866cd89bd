"""The recorder: attaches hooks to every router of a live model and streams routing into a trace.

Hook bodies only copy and accumulate on the model's device (no host synchronisation per call); the
device→host copy happens once per flush, and Arrow conversion + Parquet compression run on a background
writer thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from .. import __version__
from ..format.writer import TraceWriter, write_manifest
from . import adapters as A

#: Router stats accumulated per layer, in this order (see schema.ROUTER_STATS).
_STAT_NAMES = ("tokens", "entropy_sum", "lse_sq_sum", "lse_sum", "lse_max", "margin_sum", "nonfinite", "dropped")


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
            md = pq.ParquetFile(p).metadata
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
        f"no MoE router found in {type(model).__name__}: moescope knows {len(A.all_specs())} router specs "
        "(hooks/*.toml). Register yours, e.g. moescope.register_router(MyRouter, source='output', logits=0, "
        "weights=1, ids=2, n_experts='num_experts', top_k='top_k') — see README 'Custom models'."
    )


def _keep_sequence(seed: int, step: int, seq: int, fraction: float) -> bool:
    """Deterministic whole-sequence sampling from (seed, step, seq): every layer keeps the same tokens."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    h = hashlib.blake2b(f"{seed}:{step}:{seq}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


@dataclass
class _Forward:
    """What the top-level forward pre-hook saw: the token grid the routers will see flattened."""

    step: int
    tag: str
    token_ids: torch.Tensor | None  # [B, S]
    valid: torch.Tensor | None  # [B*S] float, 0 for padding
    pos: torch.Tensor | None  # [B, S] absolute positions
    keep_rows: torch.Tensor | None  # [n] flat token indices of the sampled sequences
    keep_seq: torch.Tensor | None  # [n]
    batch: int = 0
    seqlen: int = 0
    keep_all: bool = False  # every sequence sampled: rows need no gather
    keep_pos: torch.Tensor | None = None  # [n]
    keep_tok: torch.Tensor | None = None  # [n]


@dataclass
class _Acc:
    """Device-side accumulators of one (step, tag): per layer the summed layer_stats vector and max logsumexp."""

    vec: dict[int, torch.Tensor] = field(default_factory=dict)
    lse_max: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)


#: Layout of the summable per-layer vector after the three [E] blocks (counts, prob_sum, weight_sum).
_VEC_TAIL = ("tokens", "nonfinite", "dropped", "entropy_sum", "lse_sq_sum", "lse_sum", "margin_sum")


def layer_stats(
    logits: torch.Tensor | None,
    ids: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor,
    n_experts: int,
    probs: str = "softmax",
    dropped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """One router call as a summable float64 vector [3E + 7], its max logsumexp, and per-token (H, lse, margin).

    This runs inside the forward of every MoE layer, and on small tensors each kernel costs its launch, not its
    arithmetic: so everything is folded into as few kernels as possible (one index_add, one matmul).
    """
    t, k = ids.shape
    e = n_experts
    dev = ids.device
    flat_ids = ids.reshape(-1).clamp(0, e - 1)  # [T*k]
    vk = valid.repeat_interleave(k) if k > 1 else valid  # [T*k]
    src = torch.cat([vk, weights.reshape(-1).float() * vk])  # [2*T*k]: assignments, then gate weights
    counts = torch.zeros(2 * e, device=dev).index_add_(0, torch.cat([flat_ids, flat_ids + e]), src)  # [2E]
    if logits is None:
        flags = dropped.reshape(-1).float() if dropped is not None else torch.zeros(t, device=dev)  # [T]
        tail = torch.stack([valid.sum(), valid.new_zeros(()), valid @ flags]).double()  # [3]
        vec = torch.cat([counts[:e].double(), torch.zeros(e, dtype=torch.float64, device=dev),
                         counts[e:].double(), tail, torch.zeros(4, dtype=torch.float64, device=dev)])
        return vec, torch.full((), -math.inf, dtype=torch.float64, device=dev), None
    lg = logits  # [T, E] float32
    mx = lg.amax(-1, keepdim=True)  # [T, 1]
    if probs == "softmax":
        z = lg - mx  # [T, E]
        ez = z.exp()
        sz = ez.sum(-1, keepdim=True)  # [T, 1]
        p = pn = ez / sz  # [T, E]
        log_s = sz.log()  # [T, 1]
        lse = mx + log_s  # [T, 1]
        ent = log_s - (p * z.clamp_min(-1e4)).sum(-1, keepdim=True)  # [T, 1]: H = log Σe^z − Σ p·z
    else:  # sigmoid routers: prob_sum of the sigmoid scores; entropy and margin of the normalised scores
        p = torch.sigmoid(lg)  # [T, E]
        lse = torch.logsumexp(lg, -1, keepdim=True)  # [T, 1]
        pn = p / p.sum(-1, keepdim=True).clamp_min(1e-20)  # [T, E]
        ent = -(pn * pn.clamp_min(1e-20).log()).sum(-1, keepdim=True)  # [T, 1]
    top2 = pn.topk(2, -1).values if e > 1 else torch.cat([pn, torch.zeros_like(pn)], -1)  # [T, 2]
    margin = top2[:, :1] - top2[:, 1:]  # [T, 1]
    # NaN or +Inf anywhere in a row makes its logsumexp non-finite (a lone -Inf is a masked expert, not an error).
    nonfinite = (lse.abs() == math.inf) | lse.isnan()  # [T, 1]
    cols = [p, ent, lse * lse, lse, margin, torch.ones_like(lse), nonfinite.float()]
    if dropped is not None:
        cols.append(dropped.reshape(-1, 1).float())
    x = torch.cat(cols, 1).nan_to_num(0.0, 0.0, 0.0)  # [T, E + 6 (+1)]
    vf = valid * ~nonfinite.squeeze(-1)  # [T]: tokens whose probabilities count
    sums = torch.stack([vf, valid]) @ x  # [2, E + 6 (+1)]: row 0 over finite tokens, row 1 over all tokens
    tail = sums[1, e + 4 :] if dropped is not None else torch.cat([sums[1, e + 4 :], sums.new_zeros(1)])
    vec = torch.cat([counts[:e], sums[0, :e], counts[e:], tail, sums[0, e : e + 4]]).double()  # [3E + 7]
    lse_max = torch.where(vf > 0, lse.squeeze(-1), -math.inf).amax().double() if t else vec.new_tensor(-math.inf)
    return vec, lse_max, (ent.squeeze(-1), lse.squeeze(-1), margin.squeeze(-1))


def _split(vec: np.ndarray, lse_max: float, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Host side of layer_stats: load [E, 3] and stats [8] in _STAT_NAMES order."""
    load = np.stack([vec[:e], vec[e : 2 * e], vec[2 * e : 3 * e]], 1)
    tail = dict(zip(_VEC_TAIL, vec[3 * e :]))
    tail["lse_max"] = lse_max
    return load, np.array([tail[n] for n in _STAT_NAMES], np.float64)


class Recorder:
    """Context manager that records routing of `model` into the run directory `path` (see README)."""

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        tokens: float = 0.0,
        flush_every: int = 50,
        *,
        run: str | None = None,
        seed: int = 0,
        max_queue_mb: float = 256.0,
        on_full: str = "block",
        max_rows_per_flush: int = 2_000_000,
        rank: int | None = None,
        meta: dict[str, Any] | None = None,
        on_flush: Callable[[Recorder, dict[str, pa.Table]], None] | None = None,
        on_alert: Callable[[Any], None] | None = None,
        raise_on: str | None = None,
        alert_rules: Any = None,
        resume: bool = True,
    ) -> None:
        if not 0.0 <= float(tokens) <= 1.0:
            raise ValueError(f"tokens must be a fraction in [0, 1], got {tokens}")
        if int(flush_every) < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        self.model = model
        self.run_dir = Path(path)
        self.run = run or self.run_dir.name
        self.tokens = float(tokens)
        self.flush_every = int(flush_every)
        self.seed = int(seed)
        self.max_queue_bytes = int(max_queue_mb * (1 << 20))
        self.on_full = on_full
        self.max_rows_per_flush = int(max_rows_per_flush)
        self.meta = dict(meta or {})
        self.on_flush = on_flush
        # Online alerts (moescope.capture.alerts) run at each flush on the host copy of the counts.
        self.on_alert = on_alert
        if raise_on not in (None, "fail", "warn"):
            raise ValueError(f"raise_on must be None, 'fail' or 'warn', got {raise_on!r}")
        self.raise_on = raise_on
        self.alert_rules = alert_rules
        self.alerts: list[Any] = []
        self._alerts_kept = 0  # alerts already queued for the trace's `alerts` table
        self._stopped_by_alert: dict[str, Any] | None = None  # the manifest's record of a raise_on stop
        self.resume = resume
        self._resume_step: int | None = None
        self.skipped_forwards = 0
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
        self._user_step: int | None = None
        self._forwards = 0
        self._tag_stack: list[str] = []
        self._cur: _Forward | None = None
        self._depth = 0  # nesting of entry-module forwards; 0 between forwards
        self._grids: dict[str, _Forward] = {}  # token grid per entry module that received token ids
        self._pending: dict[tuple[int, str], _Acc] = {}
        self._pending_rows = 0
        self._last_step: int | None = None
        self._open = False
        self._created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.flushes = 0

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

    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        """Label the forwards inside the block with a data-slice tag (domain, dataset, eval split)."""
        self._tag_stack.append(str(name))
        try:
            yield
        finally:
            self._tag_stack.pop()

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
        self.close()

    def start(self) -> Recorder:
        """Find routers, attach hooks and write the manifest."""
        if self._open:
            return self
        self.layers = find_routers(self.model)
        if not self.layers:
            raise RecordError(no_router_message(self.model))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._resume_step = last_recorded_step(self.run_dir, self.rank)
            if self._resume_step is not None:
                # Forward-counter steps continue after the last recorded one instead of restarting at 0.
                self._forwards = self._resume_step + 1
        self._writer = TraceWriter(self.run_dir, self.rank, self.max_queue_bytes, self.on_full)
        try:
            self._attach()
            self._write_manifest(closed=False)
        except BaseException:
            self._handles.remove()
            self._writer.close()
            raise
        self._open = True
        return self

    def close(self) -> None:
        """Flush everything, detach every hook, wait for the writer and finalise the manifest."""
        if not self._open:
            return
        self._open = False
        try:
            self._handles.remove()
            self.flush()
        finally:
            assert self._writer is not None
            self._keep_alerts()  # a raise_on stop closes from inside the flush, before the flush could queue them
            self._writer.close()
            self._write_manifest(closed=True)
            errors = self._writer.stats.errors
            if errors:
                warnings.warn(f"moescope: {len(errors)} trace write(s) failed; first: {errors[0]}", stacklevel=2)

    # -- hooks --------------------------------------------------------------------------------
    def _attach(self) -> None:
        h = self._handles
        for name, mod in self._entry_modules().items():
            h.add(mod.register_forward_pre_hook(
                lambda m, a, kw, _n=name: self._on_enter(_n, a, kw), with_kwargs=True))
            h.add(mod.register_forward_hook(self._on_exit, always_call=True))
        for info in self.layers:
            router_hook, experts_hook = self._make_hooks(info)
            h.add(self.model.get_submodule(info.module).register_forward_hook(router_hook))
            if info.spec.source == "experts_input":
                assert info.experts_module is not None
                experts = self.model.get_submodule(info.experts_module)
                h.add(experts.register_forward_pre_hook(experts_hook, with_kwargs=True))

    def _entry_modules(self) -> dict[str, nn.Module]:
        """The model and every module enclosing a router: where a forward's token grid can be read.

        A Lightning module whose training_step calls `self.model(...)` never runs its own forward, and an
        encoder-decoder runs its decoder stack on other tokens than its encoder: so every ancestor of a router
        is hooked, the outermost one that fires starts the forward, and each router reads the token grid of its
        nearest ancestor that received token ids.
        """
        mods: dict[str, nn.Module] = {"": self.model}
        for li in self.layers:
            parts = li.module.split(".")[:-1]
            chain = [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [""]
            li.grid_owners = tuple(chain)  # nearest first
            for name in chain:
                if name and name not in mods:
                    mods[name] = self.model.get_submodule(name)
        return mods

    def _on_enter(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        outer = self._depth == 0
        self._depth += 1
        if outer:
            self._begin_forward()
        if self._cur is None:  # a resumed step being skipped
            return
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("decoder_input_ids") if name == "" and "decoder_input_ids" in kwargs else None
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            for g in self._grids.values():
                # Inner modules handed the same ids (DeepSeek-V4's hash router) add nothing and lack the mask.
                if g.token_ids is not None and g.token_ids.shape == ids.shape and g.token_ids.data_ptr() == ids.data_ptr():
                    return
            self._grids[name] = self._token_grid(ids, kwargs)

    def _on_exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _begin_forward(self) -> None:
        self._forwards += 1
        step = self.step
        if self._resume_step is not None and step <= self._resume_step:
            # A run resumed from a checkpoint repeats steps the trace already holds: record them once.
            self.skipped_forwards += 1
            self._cur = None
            return
        if self._last_step is not None and step != self._last_step:
            self._maybe_flush()
        self._last_step = step
        self._cur = _Forward(step, self.current_tag, None, None, None, None, None)
        self._grids = {}

    def _token_grid(self, ids: torch.Tensor, kwargs: dict[str, Any]) -> _Forward:
        """Token ids, padding mask, absolute positions and the sampled sequences of one forward."""
        assert self._cur is not None
        step, tag = self._cur.step, self._cur.tag
        b, s = ids.shape
        dev = ids.device
        mask = kwargs.get("attention_mask")
        pos_ids = kwargs.get("position_ids")
        cache_pos = kwargs.get("cache_position")
        valid = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b:
            # During cached decoding the mask covers past + new tokens; the routers see only the new ones.
            valid = mask[:, -s:].reshape(-1).to(torch.float32)  # [B*S]
        if isinstance(pos_ids, torch.Tensor) and pos_ids.shape[-1] == s:
            pos = pos_ids.reshape(-1, s).expand(b, s)
        elif valid is not None:
            # Position = number of real tokens before this one, as generate() numbers left-padded prompts.
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -s:]  # [B, S]
        elif isinstance(cache_pos, torch.Tensor) and cache_pos.numel() == s:
            pos = cache_pos.reshape(1, s).expand(b, s)
        else:
            pos = torch.arange(s, device=dev).reshape(1, s).expand(b, s)  # [B, S]
        keep_rows = keep_seq = keep_pos = keep_tok = None
        keep_all = False
        if self.tokens > 0:
            seqs = [i for i in range(b) if _keep_sequence(self.seed, step, i, self.tokens)]
            if seqs:
                keep_all = len(seqs) == b
                kept = torch.tensor(seqs, dtype=torch.long)
                rows = (kept[:, None] * s + torch.arange(s)[None, :]).reshape(-1)  # [n]
                keep_rows = rows.to(dev, non_blocking=True)
                keep_seq = kept.repeat_interleave(s).to(dev, non_blocking=True)
                flat_pos, flat_tok = pos.reshape(-1), ids.detach().reshape(-1)  # [B*S]
                keep_pos = flat_pos if keep_all else flat_pos[keep_rows]
                keep_tok = flat_tok if keep_all else flat_tok[keep_rows]
        return _Forward(step, tag, ids.detach(), valid, pos, keep_rows, keep_seq, b, s, keep_all, keep_pos, keep_tok)

    def _make_hooks(self, info: LayerInfo) -> tuple[Callable[..., None], Callable[..., None]]:
        """The router forward hook and, for experts_input specs, the experts pre-hook of one layer."""
        stash: dict[str, Any] = {}

        def router_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            with torch.no_grad():
                ev = A.extract_router_output(info.spec, output, info.n_experts, info.top_k)
                if ev is None:
                    return
                if info.spec.source == "experts_input":
                    stash["logits"] = ev.logits  # completed by the experts pre-hook
                    return
                self._accumulate(info, ev)

        def experts_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            with torch.no_grad():
                ids, w = A.extract_experts_input(info.spec, args, kwargs, info.n_experts)
                self._accumulate(info, A.RouterEvent(stash.pop("logits", None), ids, w))

        return router_hook, experts_hook

    def _accumulate(self, info: LayerInfo, ev: A.RouterEvent) -> None:
        """Fold one router call into the device-side accumulators (no host sync)."""
        cur = self._cur
        if self._depth == 0:
            # A router called outside any entry module (user code calling a block directly): no token grid.
            if self._resume_step is not None and self.step <= self._resume_step:
                return
            cur = _Forward(self.step, self.current_tag, None, None, None, None, None)
        elif cur is None:
            return  # a resumed step being skipped
        else:
            for owner in info.grid_owners:
                grid = self._grids.get(owner)
                if grid is not None:
                    cur = grid
                    break
        ids, w = ev.ids, ev.weights  # [T, k]
        t = ids.shape[0]
        valid = cur.valid if cur.valid is not None and cur.valid.numel() == t else None
        vt = valid if valid is not None else torch.ones(t, device=ids.device)  # [T]
        logits = ev.logits if ev.logits is not None and ev.logits.shape[0] == t else None
        vec, lse_max, per_token = layer_stats(logits, ids, w, vt, info.n_experts, info.spec.probs, ev.dropped)
        ent, lse, margin = per_token if per_token is not None else (None, None, None)
        key = (cur.step, cur.tag)
        acc = self._pending.get(key)
        if acc is None:
            acc = self._pending[key] = _Acc()
        if info.layer in acc.vec:
            acc.vec[info.layer] = acc.vec[info.layer] + vec
            acc.lse_max[info.layer] = torch.maximum(acc.lse_max[info.layer], lse_max)
        else:
            acc.vec[info.layer] = vec
            acc.lse_max[info.layer] = lse_max
        if cur.keep_rows is not None and cur.batch * cur.seqlen == t:
            r = cur.keep_rows  # [n]

            def take(x: torch.Tensor) -> torch.Tensor:
                return x if cur.keep_all else x[r]

            # pos/token_id/seq were gathered once per forward; the rest is one gather per tensor kind.
            row: dict[str, torch.Tensor] = {
                "seq": cur.keep_seq,
                "pos": cur.keep_pos,
                "token_id": cur.keep_tok,
                "experts": take(ids),
                "weights": take(w),
            }
            if valid is not None:
                row["valid"] = take(valid)
            if ent is not None:
                row["stats3"] = take(torch.stack([ent, lse, margin], 1))  # [n, 3]
            acc.rows.append((info.layer, row))
            self._pending_rows += int(r.shape[0])
            if self._pending_rows >= self.max_rows_per_flush:
                self.flush()

    # -- flushing -----------------------------------------------------------------------------
    def _maybe_flush(self) -> None:
        steps = {s for s, _ in self._pending}
        if len(steps) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Copy the accumulators to the host (one sync) and hand them to the writer thread."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._pending_rows = 0
        keys = list(pending)
        # One host copy per tensor kind for the whole flush.
        load_host: list[tuple[int, str, int, np.ndarray]] = []
        stats_host: list[tuple[int, str, int, np.ndarray]] = []
        vecs, maxes, meta = [], [], []
        for step, tag in keys:
            acc = pending[(step, tag)]
            for layer in sorted(acc.vec):
                vecs.append(acc.vec[layer])
                maxes.append(acc.lse_max[layer])
                meta.append((step, tag, layer))
        if vecs:
            sizes = [v.shape[0] for v in vecs]
            flat = torch.cat(vecs).cpu().numpy()  # one device→host copy for every layer and step
            mx = torch.stack(maxes).cpu().numpy()
            starts = np.cumsum([0] + sizes)
            n_exp = {li.layer: li.n_experts for li in self.layers}
            for i, (step, tag, layer) in enumerate(meta):
                load, st = _split(flat[starts[i] : starts[i + 1]], float(mx[i]), n_exp[layer])
                load_host.append((step, tag, layer, load))
                stats_host.append((step, tag, layer, st))
        rows_host: list[tuple[int, str, int, dict[str, np.ndarray]]] = []
        for step, tag in keys:
            for layer, row in pending[(step, tag)].rows:
                rows_host.append((step, tag, layer, {k: v.cpu().numpy() for k, v in row.items()}))
        nbytes = sum(a.nbytes for *_, a in load_host) + sum(
            sum(v.nbytes for v in r.values()) for *_, r in rows_host
        )
        nrows = sum(len(r["seq"]) for *_, r in rows_host)
        self.flushes += 1
        run, rank = self.run, self.rank

        def make() -> dict[str, pa.Table]:
            return _to_tables(run, rank, load_host, stats_host, rows_host)

        assert self._writer is not None
        if self.on_flush is not None:
            tables = make()
            self._writer.submit(lambda: tables, nbytes, nrows)
            self.on_flush(self, tables)
        else:
            self._writer.submit(make, nbytes, nrows)
        if self.on_alert is not None or self.raise_on is not None or self.alert_rules is not None:
            from .alerts import RoutingCollapseError, evaluate_flush

            try:
                evaluate_flush(self, load_host, stats_host)
            except RoutingCollapseError as e:
                # evaluate_flush closed the recorder (its alerts went out with the writer); the manifest says why.
                hit = e.alerts[0] if e.alerts else None
                if hit is not None:
                    self._stopped_by_alert = {"step": int(hit.step_end), "step_start": int(hit.step_start),
                                              "rule": hit.rule, "layer": int(hit.layer), "status": hit.status,
                                              "raise_on": self.raise_on, "message": hit.message}
                    self._write_manifest(closed=True)
                raise
            self._keep_alerts()

    def _keep_alerts(self) -> None:
        """Queue the alerts raised since the last call as rows of the trace's `alerts` table (writer thread)."""
        new = self.alerts[self._alerts_kept :]
        if not new or self._writer is None:
            return
        self._alerts_kept = len(self.alerts)
        table = alerts_table(self.run, self.rank, new)
        self._writer.submit(lambda: {"alerts": table}, table.nbytes)

    def wait(self) -> None:
        """Block until every flushed batch is on disk (tests, checkpoints)."""
        if self._writer is not None:
            self._writer.wait()

    def _write_manifest(self, closed: bool) -> None:
        stats = self._writer.stats if self._writer is not None else None
        n_params = sum(p.numel() for p in self.model.parameters())
        body: dict[str, Any] = {
            "run": self.run,
            "created": self._created,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "closed": closed,
            "moescope_version": __version__,
            "model": {"class": type(self.model).__name__, "n_params": int(n_params)},
            "layers": [li.to_manifest() for li in self.layers],
            "capture": {
                "tokens": self.tokens,
                "flush_every": self.flush_every,
                "seed": self.seed,
                "on_full": self.on_full,
                "max_queue_mb": self.max_queue_bytes / (1 << 20),
            },
            "rank": self.rank,
            "world_size": self.world_size,
            "counters": {
                "forwards": self._forwards,
                "flushes": self.flushes,
                "parts_written": stats.parts_written if stats else 0,
                "rows_written": dict(stats.rows_written) if stats else {},
                "dropped_flushes": stats.dropped_flushes if stats else 0,
                "dropped_records": stats.dropped_rows if stats else 0,
                "skipped_resumed_forwards": self.skipped_forwards,
                "resumed_after_step": self._resume_step,
                "write_errors": list(stats.errors) if stats else [],
            },
            "meta": self.meta,
        }
        if self._stopped_by_alert is not None:
            body["stopped_by_alert"] = self._stopped_by_alert
        write_manifest(self.run_dir, body, self.rank)


def _to_tables(
    run: str,
    rank: int,
    load_host: list[tuple[int, str, int, np.ndarray]],
    stats_host: list[tuple[int, str, int, np.ndarray]],
    rows_host: list[tuple[int, str, int, dict[str, np.ndarray]]],
) -> dict[str, pa.Table]:
    """Build the Arrow tables of one flush (runs on the writer thread)."""
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
                d[name] = np.rint(col).astype(np.int64)
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
        tags_l: list[str] = []
        for step, tag, layer, r in rows_host:
            keep = r["valid"] > 0 if "valid" in r else np.ones(len(r["seq"]), bool)
            n = int(keep.sum())
            parts["step"].append(np.full(n, step, np.int64))
            parts["layer"].append(np.full(n, layer, np.int16))
            parts["seq"].append(r["seq"][keep].astype(np.int32))
            parts["pos"].append(r["pos"][keep].astype(np.int32))
            parts["token_id"].append(r["token_id"][keep].astype(np.int32))
            for j, name in enumerate(("entropy", "lse", "margin")):
                col = r["stats3"][keep, j] if "stats3" in r else np.full(n, np.nan)
                parts[name].append(col.astype(np.float16))
            experts_l.append(r["experts"][keep].astype(np.int16))
            weights_l.append(r["weights"][keep].astype(np.float16))
            tags_l.extend([tag] * n)
        cols = {k: np.concatenate(v) for k, v in parts.items()}
        # Sorting by (step, layer, seq, pos) gives long runs that Parquet's RLE/dictionary encodings compress.
        order = np.lexsort((cols["pos"], cols["seq"], cols["layer"], cols["step"]))
        n = len(order)
        ex = _fixed_list(np.concatenate(experts_l) if experts_l else np.zeros((0, 1), np.int16), pa.int16(), order)
        wt = _fixed_list(np.concatenate(weights_l) if weights_l else np.zeros((0, 1), np.float16), pa.float16(), order)
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


def _fixed_list(mat: np.ndarray, typ: pa.DataType, order: np.ndarray) -> pa.Array:
    """A [n, k] matrix as an Arrow list column (k values per row) without a Python loop."""
    mat = np.ascontiguousarray(mat[order])
    n, k = mat.shape if mat.ndim == 2 else (len(mat), 1)
    offsets = np.arange(0, n * k + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(mat.reshape(-1), typ))


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

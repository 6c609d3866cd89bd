"""The capture hot path: what a router hook does, as a handful of tensor ops into buffers preallocated at start.

A router hook reads no Python state that changes between steps and writes none: it adds one router call into
the device buffer `HotPath.acc` [L, W] (float64) through views made once at start, and copies token rows
into the row buffers of the current forward's `Grid`. Step, tag and sequence sampling are decided on the host,
outside the traced path: the recorder snapshots the buffer when the (step, tag) key changes (`set_step`, `tag`,
or the model's entry) and reads every snapshot on the host at flush. So the same code runs eager, under
`torch.compile` (no Python-state guards, hence no recompiles when the step changes) and inside CUDA graphs
(replays add into the same static buffer).

Per layer, a row of `acc` holds, for E experts (W = 3·E_max + 14):

    [0, E+2)      assignments (valid tokens only) by slot column: 0 = id < 0, 1 + e = expert e, E+1 = id >= E
    [E+2, 2E+4)   gate weight sums, same columns
    [2E+4, 3E+10) feature sums over valid finite tokens: prob (E), entropy, top-1 prob, top-2 prob, lse, finite, lse²
                  (one `addmm_` of the validity row and the float64 feature matrix [T, E+7])
    3E+10         valid tokens (the feature matrix's last column, the validity mask itself: v·v = v)
    W-3           valid tokens of calls whose logits were not read: the logit statistics are unknown, not zero
    W-2           tokens the model dropped (one-hot dispatch with an empty row)
    W-1           max logsumexp (max over valid finite tokens: one `scatter_reduce_` "amax" into the cell)

The flight recorder (capture/flight.py) samples one call per layer and step: on that call `update` appends the
ids, weights and logits to the feature matrix's columns and copies its first S rows into the ring's slot with one
`index_select`, so the ring costs three ops on the calls that write it (that copy, the input rows' copy and a view
of the summed columns) and none on the others. The slot's columns (`ring_width`):

    [0, E+7)          the feature matrix: probabilities, entropy, top-1, top-2, lse, finite, lse², valid
    [E+7, E+7+k)      ids (float64: exact for any integer id below 2^53)
    [E+7+k, E+7+2k)   gate weights
    [E+7+2k, 2E+7+2k) logits as the router returned them (in float64: exact for every float dtype)

An id outside [0, E) (a sentinel such as DeepSpeed's -1 for a route dropped over capacity, an empty slot of a
routing map, or a wrong id) is never an expert: `torch.bucketize` maps it to a column of its own with no
data-dependent branch, so `expert_load` never counts it, `dropped` does, and the token rows keep the slot
column (the flush stores NULL for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .adapters import RouterEvent

if TYPE_CHECKING:  # pragma: no cover
    from .flight import FlightTarget

#: Router stats per layer, in the order of schema.ROUTER_STATS.
STAT_NAMES = ("tokens", "entropy_sum", "lse_sq_sum", "lse_sum", "lse_max", "margin_sum", "nonfinite", "dropped")
#: Per-token columns of the feature matrix after the E probabilities (their valid sums land in the buffer).
_FEATURES = ("entropy", "top1", "top2", "lse", "finite", "lse_sq")
_NF = len(_FEATURES)
#: Columns a token row keeps from the feature matrix: entropy, top1, top2, lse (margin = top1 − top2 on the host).
_ROW_STATS = 4


def width(n_experts: Sequence[int]) -> int:
    """Columns of one buffer row for layers of these expert counts."""
    return 3 * max(n_experts) + _NF + 8


def feature_width(e: int) -> int:
    """Columns of a layer's feature matrix (the E probabilities, the _FEATURES and the validity mask)."""
    return e + _NF + 1


def ring_width(e: int, k: int) -> int:
    """Columns of a flight ring row: the feature matrix, then ids [k], weights [k] and logits [E]."""
    return feature_width(e) + 2 * k + e


def ring_columns(e: int, k: int) -> dict[str, slice]:
    """Where each part of a flight ring row sits (the layout `update` writes: the module docstring's table)."""
    f = feature_width(e)
    return {"features": slice(0, f), "valid": slice(f - 1, f), "ids": slice(f, f + k),
            "weights": slice(f + k, f + 2 * k), "logits": slice(f + 2 * k, f + 2 * k + e)}


def in_backward() -> bool:
    """True while autograd runs a backward: an activation-checkpoint recompute, whose routing is already recorded."""
    if torch.compiler.is_compiling():
        return False  # compiled recompute lives inside the backward graph, where no hook runs
    return torch._C._current_graph_task_id() != -1


@dataclass
class Grid:
    """The token grid one entry module received in the current forward (built on the host at the model's entry).

    Tensors are replaced every forward; the objects holding them are created once, so a compiled hook that
    reads them guards on their shapes only.
    """

    active: bool = False
    has_mask: bool = False
    keep_n: int = 0  # rows kept from this forward (0: none sampled)
    valid: torch.Tensor | None = None  # [T] float32, 0 for padding
    vcol: torch.Tensor | None = None  # [T, 1] float64 valid, broadcast over the k slots of each token
    v2d: torch.Tensor | None = None  # [1, T] float64 (a view of vcol, for one addmm into the buffer)
    ntok: torch.Tensor | None = None  # [] float64 valid tokens
    negpad: torch.Tensor | None = None  # [T] float64: 0 for real tokens, -inf for padding
    zidx: torch.Tensor | None = None  # [T] long zeros: every token reduces into the one lse_max cell
    rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    token_ids: torch.Tensor | None = None  # [B, S]
    # host-side, for the rows of this forward
    step: int = 0
    tag: str = ""
    keep_rows: torch.Tensor | None = None  # [n] flat token indices of the sampled sequences (None: all)
    keep_seq: torch.Tensor | None = None  # [n]
    keep_pos: torch.Tensor | None = None  # [n]
    keep_tok: torch.Tensor | None = None  # [n]
    keep_valid: torch.Tensor | None = None  # [n]

    def fill(self, valid: torch.Tensor, ks: Sequence[int] = ()) -> None:
        """Set the per-token weights of a forward from its validity mask valid [T] (float32); `ks` is unused."""
        self.valid = valid
        v64 = valid.double()
        self.vcol = v64.reshape(-1, 1)  # [T, 1]
        self.v2d = v64.reshape(1, -1)  # [1, T]
        self.ntok = v64.sum()
        self.negpad = torch.where(valid > 0, 0.0, -math.inf).to(torch.float64)  # [T]
        if self.zidx is None or self.zidx.shape[0] != valid.shape[0] or self.zidx.device != valid.device:
            self.zidx = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)  # [T], never written
        self.active = True


class HotPath:
    """Device buffers of one recording and the update a router hook runs per call."""

    def __init__(self, n_experts: Sequence[int], device: torch.device, stats: bool = True, rows: bool = False) -> None:
        self.n_experts = list(n_experts)
        self.stats = stats
        self.rows = rows
        self.w = width(self.n_experts)
        self._alloc(device)

    def _alloc(self, device: torch.device) -> None:
        """The buffer and its per-layer views (made once: a hook indexes nothing, it adds into its slices)."""
        n = len(self.n_experts)
        self.acc = torch.zeros(n, self.w, dtype=torch.float64, device=device)  # [L, W]
        self.acc[:, -1] = -math.inf
        # [E+2]: slot column 0 (id < 0), 1 + e (expert e), E+1 (id >= E); see the module docstring
        self.cnt = [self.acc[i, : e + 2] for i, e in enumerate(self.n_experts)]
        self.wsum = [self.acc[i, e + 2 : 2 * e + 4] for i, e in enumerate(self.n_experts)]  # [E+2]
        # [1, E+7]: the feature sums and, last, the valid tokens
        self.fsum = [self.acc[i : i + 1, 2 * e + 4 : 3 * e + _NF + 5] for i, e in enumerate(self.n_experts)]
        self.tok = [self.acc[i, 3 * e + _NF + 4] for i, e in enumerate(self.n_experts)]  # []
        self.drop = [self.acc[i, -2] for i in range(n)]  # []
        self.nolog = [self.acc[i, -3] for i in range(n)]  # []: valid tokens of calls without logits
        self.lmax = [self.acc[i, -1:] for i in range(n)]  # [1]: a scatter_reduce target
        self.fin = [self.acc[i, 3 * e + 8] for i, e in enumerate(self.n_experts)]  # []: finite valid tokens
        # bucketize boundaries [E+1] = -1, 0, …, E-1: id i in [0, E) → column i + 1, below → 0, above → E + 1
        self.bounds = [torch.arange(-1, e, device=device) for e in self.n_experts]
        # Static addresses: compiled graphs (and reduce-overhead's CUDA graphs) may mutate them in place.
        for t in [self.acc, *self.cnt, *self.wsum, *self.fsum, *self.tok, *self.drop, *self.nolog, *self.lmax,
                  *self.fin]:
            torch._dynamo.mark_static_address(t)

    def to(self, device: torch.device) -> None:
        """Move the buffer to the model's device (a model moved after record() started), keeping its contents."""
        if self.acc.device != device:
            old = self.acc
            self._alloc(device)
            self.acc.copy_(old)

    def snapshot(self) -> torch.Tensor:
        """A copy of the buffer [L, W], and reset it (no host sync)."""
        snap = self.acc.clone()
        self.acc.zero_()
        self.acc[:, -1] = -math.inf
        return snap

    def update(self, layer: int, ev: RouterEvent, grid: Grid | None, probs: str = "softmax",
               flight: FlightTarget | None = None) -> None:
        """Add one router call into layer `layer`'s slices (its token rows into `grid`, its sample into `flight`)."""
        ids, w = ev.ids, ev.weights  # [T, k]
        t, k = ids.shape
        e = self.n_experts[layer]
        logits = ev.logits if ev.logits is not None and ev.logits.shape[0] == t else None  # [T, E]
        if grid is not None and grid.valid is not None and grid.valid.shape[0] == t and grid.vcol is not None:
            vcol, v2d, ntok, negpad, zidx = grid.vcol, grid.v2d, grid.ntok, grid.negpad, grid.zidx
        else:  # no token grid for this call (a block called directly, other tokens than the entry's)
            grid = None
            vcol = torch.ones(t, 1, dtype=torch.float64, device=ids.device)  # [T, 1]
            v2d, ntok, negpad = vcol.reshape(1, t), t, None
            zidx = torch.zeros(t, dtype=torch.long, device=ids.device)  # [T]
        # one op maps every id to its slot column, out-of-range ids to the two dropped columns (no host branch)
        slot = torch.bucketize(ids, self.bounds[layer])  # [T, k] in [0, E+1]
        self.cnt[layer].index_put_((slot,), vcol, accumulate=True)
        self.wsum[layer].index_put_((slot,), w * vcol, accumulate=True)
        if ev.dropped is not None:
            self.drop[layer].add_(v2d.reshape(-1) @ ev.dropped.to(v2d.dtype))
        feats, lse = None, None
        if self.stats or self.rows:
            # [T, E+7] float64 (the valid column promotes it), with ids, weights, logits appended for the ring
            feats, lse = _features(logits, e, probs, vcol, (ids, w, logits) if flight is not None else ())
        if flight is not None:  # before nan_to_num_: the ring keeps the logits as they were
            if feats is not None:
                torch.index_select(feats, 0, flight.idx, out=flight.full)
                feats = feats[:, : feature_width(e)]  # [T, E+7] the summed columns
            elif logits is not None:
                torch.index_select(torch.column_stack([vcol, ids, w, logits]), 0, flight.idx, out=flight.tail)
            else:
                torch.index_select(torch.column_stack([vcol, ids, w]), 0, flight.idx, out=flight.nolog)
        rows = grid.rows.get(layer) if (self.rows and grid is not None) else None
        if rows is not None and rows[0].shape == ids.shape:
            rows[0].copy_(slot)  # slot columns: the flush stores expert = slot - 1, NULL outside [1, E]
            rows[1].copy_(w)
            if feats is not None:
                rows[2].copy_(feats[:, e : e + _ROW_STATS])
        if not self.stats or feats is None or lse is None:
            self.tok[layer].add_(ntok)
            if self.stats:
                self.nolog[layer].add_(ntok)  # no logits read: prob_sum, entropy, lse are unknown for this window
        else:
            feats.nan_to_num_(0.0, 0.0, 0.0)  # non-finite tokens add nothing; `finite` counts the others
            self.fsum[layer].addmm_(v2d, feats)  # [1, E+7] += [1, T] @ [T, E+7]
            masked = lse + negpad if negpad is not None else lse.double()  # [T] float64: padding → -inf
            masked.nan_to_num_(-math.inf, -math.inf, -math.inf)
            self.lmax[layer].scatter_reduce_(0, zidx, masked, "amax")  # max(lse_max, max over valid finite tokens)


def _features(
    logits: torch.Tensor | None, e: int, probs: str, vcol: torch.Tensor, extra: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-token features [T, E+7] float64 (probabilities, entropy, top-2 probabilities, lse, finite, lse², valid),
    then the `extra` columns, and lse [T]; vcol [T, 1] is the float64 validity mask."""
    if logits is None:
        return None, None
    lse = torch.logsumexp(logits, -1)  # [T]
    if probs == "softmax":
        p = pn = torch.softmax(logits, -1)  # [T, E]
    else:  # sigmoid routers: prob_sum of the sigmoid scores; entropy and margin of the normalised scores
        p = torch.sigmoid(logits)  # [T, E]
        pn = p / p.sum(-1, keepdim=True).clamp_min(1e-20)  # [T, E]
    ent = torch.special.entr(pn).sum(-1)  # [T]; entr(0) = 0, so a masked (−inf) expert adds nothing
    top2 = pn.topk(2, -1).values if e > 1 else torch.cat([pn, torch.zeros_like(pn)], -1)  # [T, 2]
    # NaN or +Inf anywhere in a row makes its logsumexp non-finite (a lone −Inf is a masked expert, not an error)
    # the validity column is last: summed against itself (v·v = v) it counts the valid tokens; being float64 it
    # promotes the whole matrix, so the sums accumulate in float64 with no conversion op
    feats = torch.column_stack([p, ent, top2, lse, lse.isfinite(), lse.square(), vcol, *extra])  # [T, E+7(+…)]
    return feats, lse


def decode(row: np.ndarray, e: int, stats: bool) -> tuple[np.ndarray, np.ndarray]:
    """Host side of one layer's buffer row [W]: load [E, 3] (tokens, prob_sum, weight_sum) and stats [8].

    `dropped` = tokens the model dropped (one-hot) + assignments whose id was no expert (the two slot columns).
    Where a call's logits were not read (stats off, or a spec that reads none), the logit statistics are NaN.
    """
    f = row[2 * e + 4 : 3 * e + _NF + 4]
    tokens = row[3 * e + _NF + 4]
    stats = stats and not row[-3] > 0  # some call of this window had no logits: its sums would be partial
    prob = f[:e] if stats else np.full(e, np.nan)
    load = np.stack([row[1 : e + 1], prob, row[e + 3 : 2 * e + 3]], 1)
    ent, top1, top2, lse, finite, lse_sq = f[e:]
    dropped, lse_max = row[-2] + row[0] + row[e + 1], row[-1]
    if not stats:  # logits were not read: nothing is known of them, not even that they were finite
        ent = top1 = top2 = lse = lse_sq = lse_max = finite = np.nan
    vals = {
        "tokens": tokens,
        "entropy_sum": ent,
        "lse_sq_sum": lse_sq,
        "lse_sum": lse,
        "lse_max": lse_max,
        "margin_sum": top1 - top2,
        "nonfinite": tokens - finite,
        "dropped": dropped,
    }
    return load, np.array([vals[n] for n in STAT_NAMES], np.float64)




def ops_per_call(hook: Callable[..., Any], module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> int:
    """Top-level aten ops one call of a router hook dispatches (torch.profiler, CPU): the hot path's budget.

    Ops an aten op runs inside itself (a CPU kernel's helpers) are not counted: on a GPU each top-level op is
    one launch, whatever it does inside.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hook(module, args, output)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def ops_in_forwards(router: torch.nn.Module, run: Callable[[], Any]) -> list[int]:
    """Top-level aten ops of each call of moescope's hook on `router` while `run()` runs forwards (ops_per_call
    applied inside real forwards: the token grid, the step and the flight ring are as a training loop has them).

    A router's first call also checks the spec's reading once (a few dozen host-side ops): warm up before.
    """
    hooks = router._forward_hooks
    key = next(k for k, h in hooks.items() if getattr(h, "__name__", "") == "router_hook")
    hook, counts = hooks[key], []

    def profiled(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        counts.append(ops_per_call(hook, module, args, output))

    hooks[key] = profiled
    try:
        run()
    finally:
        hooks[key] = hook
    return counts


__all__ = ["STAT_NAMES", "Grid", "HotPath", "decode", "feature_width", "in_backward", "ops_in_forwards", "ops_per_call",
           "ring_columns", "ring_width", "width"]

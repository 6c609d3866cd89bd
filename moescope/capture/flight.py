"""The flight recorder: the last `flight_steps` steps' router evidence per layer, kept on the device.

Each router call of a step (the first call per layer and step) copies a bounded sample of its tokens — the
router's input rows, the logits it produced, the ids and weights it dispatched, and the token ids — into a
ring of device buffers made at the first call. Nothing leaves the device until a dump: when an online alert
of FLIGHT_RULES fires at a flush, or on `rec.dump_flight()`, the ring is copied to the host and written as
`RUN/flight/<name>/evidence.safetensors` + `meta.json`, atomically (a temporary folder renamed into place),
with the router's parameters, its numeric settings (temperature, scaling), the dtypes in use and, per
sampled token, the experts the router picks when it runs in float32 instead of the model's dtype.

`moescope explain` (moescope/analysis/explain.py) reads a dump without torch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..format.schema import FLIGHT_DIR
from . import adapters as A
from .hotpath import ring_columns, ring_width

#: Online rules whose alert dumps the ring (a router that went non-finite, collapsed, or left an expert dead).
FLIGHT_RULES = ("nonfinite", "collapse", "dead_expert")
#: Numeric router attributes worth keeping with the evidence: they scale logits before the top-k.
SETTINGS = ("temperature", "router_temperature", "routed_scaling_factor", "scaling_factor", "scale",
            "logit_scale", "jitter_noise", "router_jitter_noise", "norm_topk_prob", "bias_update_speed")


@dataclass
class FlightTarget:
    """Where the hot path writes one router call's sample: views of the current slot and the rows to keep."""

    idx: torch.Tensor  # [S] long: the call's rows (batch-first) to keep; the last row repeats when T < S
    full: torch.Tensor  # [S, C] float64 view of the slot: features, ids, weights, logits (hotpath.ring_width)
    tail: torch.Tensor  # [S, 1 + 2k + E] view from the valid column on (a capture without statistics)
    nolog: torch.Tensor  # [S, 1 + 2k] view: valid, ids, weights (a router whose logits are not read)


@dataclass
class _LayerRing:
    """One layer's device buffers [slots, S, …] and, on the host, what each slot holds."""

    x: torch.Tensor  # [slots, S, H] router input rows, in their own dtype
    f: torch.Tensor  # [slots, S, C] float64: features, ids [k], weights [k], logits [E] (hotpath.ring_width)
    e: int
    k: int
    x_dtype: torch.dtype
    logits_dtype: torch.dtype
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # per slot: x, full, tail, nolog
    rows: list[int] = field(default_factory=list)  # per slot
    seq_len: list[int] = field(default_factory=list)  # per slot: the entry's sequence length (0 = unknown)
    has_logits: list[bool] = field(default_factory=list)  # per slot
    tokens: list[torch.Tensor | None] = field(default_factory=list)  # per slot: token ids [≤S] (None = unknown)

    def column(self, name: str, slot: int) -> torch.Tensor:
        """One part of a slot's filled rows: "ids" [r, k] long, "weights" [r, k] or "logits" [r, E] float32."""
        r = self.rows[slot]
        if name == "logits" and not self.has_logits[slot]:
            return torch.full((r, self.e), float("nan"))
        t = self.f[slot, :r, ring_columns(self.e, self.k)[name]].cpu()
        return t.long() if name == "ids" else t.float()


class FlightRing:
    """Device-side ring of the last `steps` steps' router evidence per layer (a sample of `tokens` rows each)."""

    def __init__(self, steps: int, tokens: int) -> None:
        self.steps, self.tokens = int(steps), int(tokens)
        self.slot = -1
        self.slot_steps: list[int | None] = [None] * self.steps  # the step each slot holds
        self.layers: dict[int, _LayerRing] = {}
        self._written: dict[int, int] = {}  # layer -> step its slot was last written in
        self._idx: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # row indices per call shape
        self._tok: dict[int, tuple[int, torch.Tensor]] = {}  # id(grid) -> (step, its first S token ids)
        self.step: int | None = None
        self.tag = ""  # the tag of the current step's first forward (the one each layer's slot sampled)

    def begin_step(self, step: int, tag: str = "") -> None:
        """Move to the next slot when the step changes (host only); `tag`: the tag of the step's first forward."""
        if step == self.step:
            return
        self.step, self.tag = step, tag
        self.slot = (self.slot + 1) % self.steps
        self.slot_steps[self.slot] = step
        for ring in self.layers.values():
            ring.rows[self.slot] = 0

    def wants(self, layer: int) -> bool:
        """Whether this layer's slot of the current step is still to be written (a host check, no tensor op)."""
        return self.step is not None and self._written.get(layer) != self.step

    def take_tokens(self, grid: Any, ids: torch.Tensor) -> None:
        """At a forward's entry: copy the first S token ids [B, S] once per step (every layer's token column).

        A copy, not a reference: an input buffer reused for the next batch must not rewrite the evidence.
        """
        if self.step is None:
            return
        held = self._tok.get(id(grid))
        if held is None or held[0] != self.step:
            self._tok[id(grid)] = (self.step, ids.detach().reshape(-1)[: self.tokens].clone())

    def prepare(self, layer: int, e: int, x: torch.Tensor | None, ev: A.RouterEvent,
                raw_logits_dtype: torch.dtype | None, grid: Any, bs: tuple[int, int] | None) -> FlightTarget | None:
        """Claim this layer's slot of the step for one router call (eager, once per layer and step): copy its input
        rows x [.., H] (one op) and return where the hot path writes the rest; None when nothing is kept.

        e: the layer's experts; ev's rows are in batch-first order; bs = (B, S) when the router's rows (and x)
        are sequence-first.
        """
        if not self.wants(layer) or x is None or x.dim() < 2:
            return None
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # a CUDA graph would replay this slot choice forever: the ring is eager-only
        t, k = ev.ids.shape
        if x.numel() != t * x.shape[-1]:
            return None  # the input rows are not the routed tokens (a router fed something else): keep nothing
        if ev.logits is not None and ev.logits.shape[-1] != e:
            return None  # the slot's columns are laid out for E logits: never write another width into them
        ring = self.layers.get(layer)
        if ring is None:
            ring = self._alloc(layer, x, e, k, raw_logits_dtype)
        if ring.k != k:
            return None
        self._written[layer] = self.step  # type: ignore[assignment]
        idx, xidx = self._rows(t, bs, x.device)
        s = self.slot
        xs = x if x.dim() == 2 else x.reshape(t, -1)  # [T, H] in the router's row order
        xv, full, tail, nolog = ring.views[s]
        if xs.dtype == ring.x_dtype:
            torch.index_select(xs, 0, xidx, out=xv)
        else:  # the input's dtype changed since the ring was made (autocast toggled): convert, off the fast path
            xv.copy_(xs.index_select(0, xidx))
        r = min(t, self.tokens)
        ring.rows[s] = r
        ring.has_logits[s] = ev.logits is not None and ev.logits.shape[0] == t
        held = self._tok.get(id(grid)) if grid is not None else None
        tok_ok = held is not None and held[0] == self.step and grid.token_ids is not None \
            and grid.token_ids.numel() == t
        ring.tokens[s] = held[1] if tok_ok else None  # type: ignore[index]
        ring.seq_len[s] = int(grid.token_ids.shape[-1]) if tok_ok else 0
        return FlightTarget(idx, full, tail, nolog)

    def discard(self, layer: int) -> None:
        """Empty this layer's slot of the step (the call that claimed it failed before filling it)."""
        ring = self.layers.get(layer)
        if ring is not None and self.slot >= 0:
            ring.rows[self.slot] = 0

    def _rows(self, t: int, bs: tuple[int, int] | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices [S] of a call of T rows, made once per shape: ev's (batch-first) rows and x's rows."""
        key = (t, bs, str(device))
        got = self._idx.get(key)
        if got is None:
            idx = torch.arange(self.tokens, device=device).clamp_max(t - 1)  # [S]
            # row j of the batch-first order is row xidx[j] of a sequence-first input
            xidx = idx if bs is None else A.batch_first_rows(torch.arange(t, device=device), *bs)[idx]  # type: ignore[index]
            got = self._idx[key] = (idx, xidx)
        return got

    def _alloc(self, layer: int, x: torch.Tensor, e: int, k: int, raw: torch.dtype | None) -> _LayerRing:
        n, s = self.steps, self.tokens
        dev = x.device
        xb = torch.zeros(n, s, x.shape[-1], dtype=x.dtype, device=dev)  # [slots, S, H]
        f = torch.full((n, s, ring_width(e, k)), math.nan, dtype=torch.float64, device=dev)  # [slots, S, C]
        col = ring_columns(e, k)
        tail = slice(col["valid"].start, None)  # valid, ids, weights, logits
        nolog = slice(col["valid"].start, col["weights"].stop)  # valid, ids, weights
        # views made once: the hook indexes nothing, it writes into them
        views = [(xb[i], f[i], f[i, :, tail], f[i, :, nolog]) for i in range(n)]
        ring = _LayerRing(x=xb, f=f, e=e, k=k, x_dtype=x.dtype, logits_dtype=raw or torch.float32, views=views,
                          rows=[0] * n, seq_len=[0] * n, has_logits=[False] * n, tokens=[None] * n)
        self.layers[layer] = ring
        return ring

    def nbytes(self) -> int:
        """Device memory the ring holds."""
        return sum(t.numel() * t.element_size() for r in self.layers.values() for t in (r.x, r.f))


def _number(v: Any) -> float | None:
    """A setting's value as a float: bools, ints, floats and one-element tensors; None for anything else."""
    if isinstance(v, (bool, int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach().float().item())
    return None


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def router_settings(module: nn.Module, named: Sequence[str] = (), parent: nn.Module | None = None) -> dict[str, float]:
    """The router's numeric settings: the SETTINGS names it (or, as "parent.<name>", its block) has, and the
    spec's `settings` paths (from the router, or from the block with a "parent." prefix)."""
    out: dict[str, float] = {}
    owners = [("", module)] + ([("parent.", parent)] if parent is not None else [])
    for prefix, owner in owners:
        for name in SETTINGS:
            v = _number(getattr(owner, name, None))
            if v is not None:
                out[prefix + name] = v
    for path in named:
        owner, rest = (parent, path[len("parent."):]) if path.startswith("parent.") else (module, path)
        v = _number(_attr(owner, rest)) if owner is not None else None
        if v is not None:
            out[path] = v
    return out


def _topk_sets(module: nn.Module, spec: A.RouterSpec, x: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The ids [R, k] (sorted per row) the router module dispatches for input rows x [R, H]; None if unreadable."""
    with torch.no_grad():
        try:
            out = module(x)
            ev = A.extract_router_output(spec, out, n, k)
        except Exception:  # a router that needs more than its input rows (masks, positions): no recompute
            return None
    if ev is None or ev.ids.numel() == 0 or ev.ids.shape[0] != x.shape[0]:
        return None
    return ev.ids.sort(-1).values


def _unhooked(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with every forward hook of it and its submodules removed."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        for name in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            d = getattr(m, name, None)
            if d is not None:
                d.clear()
    return twin


def precision_flips(module: nn.Module, spec: A.RouterSpec, x: torch.Tensor, n: int, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For input rows x [R, H]: (ids in the model's dtype [R, k], ids in float32 [R, k], flipped [R] bool).

    The router runs twice on the same rows with the same (current) weights: once as it is, once as a float32
    copy. A token flips when its set of experts differs: the share of flips is how much the dtype decides.
    """
    dtype = next((p.dtype for p in module.parameters()), x.dtype)
    # A copy without hooks: calling the live router would run moescope's own hooks and count these rows as routing.
    twin = _unhooked(module)
    native = _topk_sets(twin, spec, x.to(dtype), n, k)
    fp32 = _topk_sets(twin.float(), spec, x.float(), n, k)
    if native is None or fp32 is None:
        return None
    return native, fp32, (native != fp32).any(-1)


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    """The block holding the router at `path` (None for a router that is the model itself)."""
    if not path:
        return None
    head = path.rsplit(".", 1)[0] if "." in path else ""
    with contextlib.suppress(AttributeError):
        return model.get_submodule(head)
    return None


def _tokens(r: _LayerRing, slot: int) -> torch.Tensor:
    """The token ids [rows] of one slot, -1 where unknown."""
    n, tok = r.rows[slot], r.tokens[slot]
    return tok[:n].cpu().long() if tok is not None and tok.numel() >= n else torch.full((n,), -1, dtype=torch.long)


def dump(ring: FlightRing, layers: Sequence[Any], model: nn.Module, run_dir: Path, rank: int, reason: str,
         alerts: Sequence[Any] = (), step: int | None = None) -> Path | None:
    """Write the ring to RUN/flight/<name>/ (safetensors + JSON, atomically); None when it holds nothing."""
    from safetensors.torch import save_file

    slots = [i for i in range(ring.steps) if ring.slot_steps[i] is not None]
    if not slots or not ring.layers:
        return None
    order = sorted(slots, key=lambda i: ring.slot_steps[i])  # oldest step first
    tensors: dict[str, torch.Tensor] = {}
    meta_layers: list[dict[str, Any]] = []
    for li in layers:
        r = ring.layers.get(li.layer)
        if r is None:
            continue
        rows = [r.rows[i] for i in order]
        keep = [i for i, n in zip(order, rows) if n > 0]
        if not keep:
            continue
        # [R, …]: the filled rows of the kept slots, oldest step first
        x = torch.cat([r.x[i, : r.rows[i]] for i in keep])
        logits, ids, w = (torch.cat([r.column(name, i) for i in keep]) for name in ("logits", "ids", "weights"))
        tok = torch.cat([_tokens(r, i) for i in keep])
        p = f"layer{li.layer}."
        tensors.update({p + "x": x.float().cpu(), p + "logits": logits.cpu(), p + "ids": ids.cpu(),
                        p + "weights": w.cpu(), p + "token_ids": tok.cpu(),
                        p + "step": torch.tensor([ring.slot_steps[i] for i in keep for _ in range(r.rows[i])]),
                        # the row's index among the step's tokens (batch-major) and that step's sequence length
                        p + "row": torch.cat([torch.arange(r.rows[i]) for i in keep]),
                        p + "seq_len": torch.tensor([r.seq_len[i] for i in keep for _ in range(r.rows[i])])})
        module = model.get_submodule(li.module)
        params: list[str] = []
        with contextlib.suppress(Exception):
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                if t.is_floating_point() and t.numel() <= 1 << 24:
                    tensors[p + "param." + name] = t.detach().float().cpu().contiguous()
                    params.append(name)
        flips = precision_flips(module, li.spec, x, li.n_experts, li.top_k)
        if flips is not None:
            tensors[p + "ids_native"], tensors[p + "ids_fp32"] = flips[0].cpu(), flips[1].cpu()
        pdtype = next((str(t.dtype) for t in module.parameters()), None)
        meta_layers.append({"layer": li.layer, "module": li.module, "family": li.family,
                            "n_experts": li.n_experts, "top_k": li.top_k, "probs": li.spec.probs,
                            "x_dtype": str(r.x_dtype), "logits_dtype": str(r.logits_dtype), "param_dtype": pdtype,
                            "params": params, "rows": int(x.shape[0]),
                            "settings": router_settings(module, li.spec.settings, _parent(model, li.module)),
                            "steps": [ring.slot_steps[i] for i in keep], "recomputed": flips is not None})
    if not meta_layers:
        return None
    last = max(ring.slot_steps[i] for i in slots)
    at = step if step is not None else last
    name = f"rank{rank}-step{at:08d}-{reason}"
    folder = run_dir / FLIGHT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    n = 1
    while final.exists():
        n += 1
        final = folder / f"{name}-{n}"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "evidence.safetensors"))
        meta = {"format": "moescope-flight", "version": 1, "reason": reason, "step": at, "rank": rank,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "flight_tokens": ring.tokens,
                "alerts": [{"rule": a.rule, "status": a.status, "layer": a.layer, "value": a.value,
                            "threshold": a.threshold, "message": a.message} for a in alerts],
                "layers": meta_layers}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


__all__ = ["FLIGHT_DIR", "FLIGHT_RULES", "FlightRing", "FlightTarget", "dump", "precision_flips", "router_settings"]

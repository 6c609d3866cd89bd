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

#: Online rules whose alert dumps the ring (a router that went non-finite, collapsed, or left an expert dead).
FLIGHT_RULES = ("nonfinite", "collapse", "dead_expert")
#: Numeric router attributes worth keeping with the evidence: they scale logits before the top-k.
SETTINGS = ("temperature", "router_temperature", "routed_scaling_factor", "scaling_factor", "scale",
            "logit_scale", "jitter_noise", "router_jitter_noise", "norm_topk_prob", "bias_update_speed")


@dataclass
class _LayerRing:
    """One layer's device buffers [slots, S, …] and, on the host, how many rows each slot holds."""

    x: torch.Tensor  # [slots, S, H] router input rows, in their own dtype
    logits: torch.Tensor  # [slots, S, E] float32 logits as the router returned them (NaN where absent)
    ids: torch.Tensor  # [slots, S, k] long
    weights: torch.Tensor  # [slots, S, k] float32
    token_ids: torch.Tensor  # [slots, S] long, -1 where unknown
    x_dtype: torch.dtype
    logits_dtype: torch.dtype
    rows: list[int] = field(default_factory=list)  # per slot
    seq_len: list[int] = field(default_factory=list)  # per slot: the entry's sequence length (0 = unknown)


class FlightRing:
    """Device-side ring of the last `steps` steps' router evidence per layer (a sample of `tokens` rows each)."""

    def __init__(self, steps: int, tokens: int) -> None:
        self.steps, self.tokens = int(steps), int(tokens)
        self.slot = -1
        self.slot_steps: list[int | None] = [None] * self.steps  # the step each slot holds
        self.layers: dict[int, _LayerRing] = {}
        self._written: dict[int, int] = {}  # layer -> step its slot was last written in
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

    def write(self, layer: int, x: torch.Tensor | None, ev: A.RouterEvent, raw_logits_dtype: torch.dtype | None,
              token_ids: torch.Tensor | None) -> None:
        """Copy the first S tokens of one router call (input rows x [T, H]) into the current slot (once per layer
        and step; eager)."""
        if not self.wants(layer) or x is None:
            return
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph would replay this slot choice forever: the ring is eager-only
        ids, w = ev.ids, ev.weights  # [T, k]
        t = ids.shape[0]
        xs = x  # [T, H] in ev's row order (the recorder reshapes and reorders; hooks run under no_grad)
        if xs.shape[0] != t:
            return  # the input rows are not the routed tokens (a router fed something else): keep nothing
        ring = self.layers.get(layer)
        if ring is None:
            ring = self._alloc(layer, xs, ev, raw_logits_dtype)
        self._written[layer] = self.step
        r = min(t, self.tokens)
        s = self.slot
        ring.x[s, :r].copy_(xs[:r])
        if ev.logits is not None and ev.logits.shape[0] == t:
            ring.logits[s, :r].copy_(ev.logits[:r])
        else:
            ring.logits[s].fill_(float("nan"))
        ring.ids[s, :r].copy_(ids[:r])
        ring.weights[s, :r].copy_(w[:r])
        tok = token_ids.reshape(-1) if token_ids is not None and token_ids.numel() == t else None  # [T]
        if tok is not None:
            ring.token_ids[s, :r].copy_(tok[:r])
        else:
            ring.token_ids[s].fill_(-1)
        ring.rows[s] = r
        ring.seq_len[s] = int(token_ids.shape[-1]) if tok is not None else 0

    def _alloc(self, layer: int, xs: torch.Tensor, ev: A.RouterEvent, raw: torch.dtype | None) -> _LayerRing:
        n, s = self.steps, self.tokens
        e = ev.logits.shape[-1] if ev.logits is not None else 1
        k = ev.ids.shape[-1]
        dev = xs.device
        ring = _LayerRing(
            x=torch.zeros(n, s, xs.shape[-1], dtype=xs.dtype, device=dev),
            logits=torch.full((n, s, e), float("nan"), dtype=torch.float32, device=dev),
            ids=torch.zeros(n, s, k, dtype=torch.long, device=dev),
            weights=torch.zeros(n, s, k, dtype=torch.float32, device=dev),
            token_ids=torch.full((n, s), -1, dtype=torch.long, device=dev),
            x_dtype=xs.dtype, logits_dtype=raw or torch.float32, rows=[0] * n, seq_len=[0] * n)
        self.layers[layer] = ring
        return ring

    def nbytes(self) -> int:
        """Device memory the ring holds."""
        return sum(t.numel() * t.element_size() for r in self.layers.values()
                   for t in (r.x, r.logits, r.ids, r.weights, r.token_ids))


def router_settings(module: nn.Module) -> dict[str, float]:
    """The router's numeric settings among SETTINGS (temperature, scaling, …) that it has."""
    out: dict[str, float] = {}
    for name in SETTINGS:
        v = getattr(module, name, None)
        if isinstance(v, (bool, int, float)):
            out[name] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[name] = float(v.detach().float().item())
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
        x, logits, ids, w, tok = (torch.cat([t[i, : r.rows[i]] for i in keep])
                                  for t in (r.x, r.logits, r.ids, r.weights, r.token_ids))
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
                            "params": params, "settings": router_settings(module), "rows": int(x.shape[0]),
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


__all__ = ["FLIGHT_DIR", "FLIGHT_RULES", "FlightRing", "dump", "precision_flips", "router_settings"]

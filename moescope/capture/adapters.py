"""Router adapters: declarative specs (hooks/*.toml, see specs.py) resolved by module class through the MRO.

A spec says where a router's decisions come from. Three sources:

- ``output``: the router module's forward output holds logits, gate weights and expert ids (transformers v5
  ``*TopKRouter``, the bundled reference model). ``logits``/``weights``/``ids`` are indices into the output tuple.
- ``experts_input``: ids and weights are read from the experts module's inputs (a forward pre-hook on the sibling
  ``experts`` module), as the experts received them; logits still come from the router output (DBRX, v4 blocks).
- ``logits``: the router returns logits only and ids/weights follow a named ``selection`` rule.

The experts actually selected are always stored; top-k is recomputed from logits only where a spec says the
family selects that way (``source = "logits"``).

Output layouts that differ from ``(logits, weights [T, k], ids [T, k])`` are named by ``ids_layout``
(``sorted_by_expert``: JetMoE's gating returns token slots sorted by expert plus per-expert sizes), ``onehot``
(Switch's dispatch mask after capacity), ``logits_are = "probs"`` (Gemma 4 returns softmax probabilities where
others return logits) and ``skip_expert`` (Zaya's extra no-compute class, reported by its router as id 0, weight 0).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import specs as _specs

# The spec schema, loading and matching live in moescope/capture/specs.py (no torch); re-exported here.
from .specs import (  # noqa: F401
    IDS_LAYOUTS,
    LOGITS_ARE,
    PROBS,
    SELECTIONS,
    SOURCES,
    TOKEN_LAYOUTS,
    AdapterError,
    RouterSpec,
)


@dataclass
class RouterEvent:
    """One router call, normalised: every tensor is flattened to T = batch × seq tokens."""

    logits: torch.Tensor | None  # [T, E] float32
    ids: torch.Tensor  # [T, k] int64, slot order as the router returned them
    weights: torch.Tensor  # [T, k] float32
    dropped: torch.Tensor | None = None  # [T] bool, tokens the model dropped over capacity


def load_spec_files() -> list[RouterSpec]:
    """Read every hooks/*.toml spec shipped with moescope (moescope.capture.specs)."""
    return _specs.load_spec_files()


def register_router(cls: type | str, **spec: Any) -> RouterSpec:
    """Register a user router class with the fields of a hooks/*.toml spec; later registrations win."""
    return _specs.REGISTRY.register(cls, **spec)


def unregister_router(cls: type | str) -> int:
    """Forget a registered router class (or qualified name, or family name); returns how many specs went."""
    return _specs.REGISTRY.unregister(cls)


def all_specs() -> list[RouterSpec]:
    """Every known spec, highest priority first."""
    return _specs.REGISTRY.all()


def resolve(module: nn.Module) -> RouterSpec | None:
    """The spec for a module, matched by module path and class name through its MRO (exact class first)."""
    spec = _specs.REGISTRY.resolve(type(module), stop=(nn.Module, object))
    return None if spec is None else spec.bind(module)  # per-module fields (selection_norm) read off the module


_spec_from_mapping = _specs.spec_from_mapping


def _attr(obj: Any, spec_value: Any) -> int | None:
    if spec_value is None:
        return None
    if isinstance(spec_value, int):
        return spec_value
    names: Sequence[str] = [spec_value] if isinstance(spec_value, str) else spec_value
    for n in names:
        cur = obj
        for part in n.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if isinstance(cur, int):
            return cur
    return None


def router_shape(module: nn.Module, spec: RouterSpec, parent: nn.Module | None) -> tuple[int | None, int | None]:
    """(n_experts, top_k) read from the router module (or its parent block)."""
    n = _attr(module, spec.n_experts)
    k = _attr(module, spec.top_k)
    if parent is not None:
        n = n if n is not None else _attr(parent, spec.parent_n_experts or spec.n_experts)
        k = k if k is not None else _attr(parent, spec.parent_top_k or spec.top_k)
    if n is None:
        cfg = getattr(module, "config", None) or getattr(parent, "config", None)
        n = _attr(cfg, ["num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"]) if cfg else None
    if k is None:
        cfg = getattr(module, "config", None) or getattr(parent, "config", None)
        k = _attr(cfg, ["num_experts_per_tok", "top_k", "moe_top_k"]) if cfg else None
    return n, k


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """A submodule by dotted path, or None."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _pick(out: Any, index: int | None) -> torch.Tensor | None:
    if index is None:
        return out if isinstance(out, torch.Tensor) else None
    if isinstance(out, torch.Tensor):
        return out if index == 0 else None
    if isinstance(out, (tuple, list)):
        return out[index] if -len(out) <= index < len(out) else None
    if isinstance(out, dict):
        vals = list(out.values())
        return vals[index] if -len(vals) <= index < len(vals) else None
    return None


def router_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Router probabilities [T, E] from logits [T, E] by the spec's `probs` kind."""
    return torch.sigmoid(logits) if kind == "sigmoid" else torch.softmax(logits, dim=-1)


_probs = router_probs


def select(logits: torch.Tensor, k: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a named selection rule to logits [T, E] → (ids [T, k], weights [T, k])."""
    if rule not in SELECTIONS:
        raise AdapterError(f"unknown selection rule {rule!r}; known: {SELECTIONS}")
    if rule.startswith("sigmoid"):
        scores = torch.sigmoid(logits)
    elif rule == "topk_softmax":
        top, ids = torch.topk(logits, k, dim=-1)  # [T, k]
        return ids, torch.softmax(top, dim=-1)
    elif rule == "topk_sigmoid":
        # Llama 4: top-k of the raw logits, each selected expert gated by the sigmoid of its own logit
        top, ids = torch.topk(logits, k, dim=-1)  # [T, k]
        return ids, torch.sigmoid(top)
    else:
        scores = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(scores, k, dim=-1)  # [T, k]
    if rule.endswith("_norm"):
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    return ids, w


def _as_logits(spec: RouterSpec, raw: torch.Tensor | None) -> torch.Tensor | None:
    """What the spec reads as logits, as [T, E] float32 logits whose `probs` transform gives the router's scores."""
    if raw is None:
        return None
    logits = _rows(raw, raw.shape[-1], torch.float32)  # [T, E]
    if spec.logits_are == "probs":
        tiny = torch.finfo(torch.float32).tiny
        if spec.probs == "sigmoid":
            # logit(p): sigmoid gives back p exactly where softmax(log p) would renormalise the scores
            p = logits.clamp(tiny, 1.0 - torch.finfo(torch.float32).eps / 2)
            return p.log() - (-p).log1p()
        # log p is a logits vector of the same softmax: entropy, margin and prob_sum stay exact (lse = 0)
        return logits.clamp_min(tiny).log()
    return logits


def resolve_fn(spec: RouterSpec) -> Any:
    """The spec's ids_fn as a callable ("pkg.module:function" is imported once)."""
    fn = spec.ids_fn
    if callable(fn):
        return fn
    if fn in _FNS:
        return _FNS[fn]
    import importlib

    mod_name, _, attr = str(fn).partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise AdapterError(f"{spec.family}: ids_fn {fn!r} cannot be imported ({e})") from None
    if not callable(obj):
        raise AdapterError(f"{spec.family}: ids_fn {fn!r} is not callable")
    _FNS[str(fn)] = obj
    return obj


_FNS: dict[str, Any] = {}


def _from_fn(spec: RouterSpec, module: Any, args: tuple[Any, ...], out: Any, top_k: int) -> RouterEvent:
    """The ids_fn escape hatch: fn(module, args, output) -> (logits [T, E] | None, ids [T, k], weights [T, k] | None)."""
    res = resolve_fn(spec)(module, args, out)
    if not (isinstance(res, tuple) and len(res) == 3):
        raise AdapterError(f"{spec.family}: ids_fn must return (logits or None, ids [T, k], weights or None), "
                           f"got {type(res).__name__}")
    raw_logits, ids, w = res
    if not isinstance(ids, torch.Tensor):
        raise AdapterError(f"{spec.family}: ids_fn returned ids of type {type(ids).__name__}, not a tensor")
    ids = _rows(ids, ids.shape[-1], torch.long)  # [T, k]; -1 (or any id outside [0, E)) = no expert
    w = torch.ones_like(ids, dtype=torch.float32) if w is None else _rows(w, ids.shape[-1], torch.float32)
    return RouterEvent(_as_logits(spec, raw_logits), ids, w)


def _from_mask(
    spec: RouterSpec, out: Any, raw: torch.Tensor, logits: torch.Tensor | None, n_experts: int, top_k: int
) -> RouterEvent:
    """routing_map [T, E] / dispatch [..., E, C] masks → ids [T, k] (-1 where a token has fewer experts)."""
    raw_w = _pick(out, spec.weights) if spec.weights is not None and spec.weights_from == "output" else None
    if spec.ids_layout == "dispatch":
        c = raw.shape[-1]
        mask = raw.reshape(-1, n_experts, c).ne(0).any(-1)  # [T, E]: the token went to the expert in some slot
        dense = None if raw_w is None else raw_w.detach().reshape(-1, n_experts, c).float().sum(-1)  # [T, E]
    else:
        mask = raw.reshape(-1, n_experts).ne(0)  # [T, E]
        dense = None if raw_w is None else raw_w.detach().reshape(-1, n_experts).float()  # [T, E]
    if dense is None and spec.weights_from == "probs" and logits is not None:
        dense = router_probs(logits, spec.probs)  # [T, E]
    # slot order: by gate weight (first choice first) where weights exist, else by expert id
    order = dense if dense is not None else -torch.arange(n_experts, device=mask.device, dtype=torch.float32)
    key = torch.where(mask, order.nan_to_num(0.0).expand_as(mask), -math.inf)  # [T, E]
    picked = key.topk(min(top_k, n_experts), -1).indices  # [T, k]
    sel = mask.gather(-1, picked)  # [T, k]: the slot holds a selected expert
    ids = torch.where(sel, picked, -1)  # [T, k]
    w = dense.gather(-1, picked) if dense is not None else torch.ones_like(picked, dtype=torch.float32)
    return RouterEvent(logits, ids, torch.where(sel, w, 0.0))


def extract_router_output(
    spec: RouterSpec, out: Any, n_experts: int, top_k: int, *, module: Any = None, args: tuple[Any, ...] = (),
    logits_out: torch.Tensor | None = None,
) -> RouterEvent | None:
    """Normalise a router's forward output into a RouterEvent (ids/weights may be filled later, experts_input).

    `module` and `args` are the router and its inputs (for ids_fn); `logits_out` the output of the submodule
    named by `logits_from`.
    """
    if spec.ids_fn is not None:
        ev = _from_fn(spec, module, args, out, top_k)
        return ev if spec.logits_from is None else RouterEvent(_as_logits(spec, logits_out), ev.ids, ev.weights)
    if spec.logits_from is not None:
        logits = _as_logits(spec, logits_out)
    else:
        logits = _as_logits(spec, None if spec.logits_are == "none" else _pick(out, spec.logits))
    if spec.source == "logits":
        if logits is None:
            raise AdapterError(f"{spec.family}: router output has no logits at index {spec.logits}")
        ids, w = select(logits, top_k, spec.selection)
        return RouterEvent(logits, ids, w.float())
    if spec.source == "experts_input":
        # ids and weights arrive with the experts' pre-hook; keep the logits until then.
        empty = torch.empty(0, top_k, dtype=torch.long)
        return RouterEvent(logits, empty, empty.float())
    raw_ids = _pick(out, spec.ids)
    if raw_ids is None:
        raise AdapterError(f"{spec.family}: router output has no ids at index {spec.ids}")
    raw_ids = raw_ids if _no_grad() else raw_ids.detach()
    if spec.ids_layout == "sorted_by_expert":
        return _sorted_by_expert(spec, out, raw_ids, logits, n_experts, top_k)
    if spec.ids_layout in ("routing_map", "dispatch"):
        return _from_mask(spec, out, raw_ids, logits, n_experts, top_k)
    dropped = None
    if spec.ids_layout == "k_first":
        ids = raw_ids.reshape(raw_ids.shape[0], -1).t().long().contiguous()  # [k, T] -> [T, k]
    elif spec.onehot:
        mask = raw_ids.reshape(-1, raw_ids.shape[-1])  # [T, E] one-hot dispatch (zeros: dropped)
        dropped = mask.sum(-1) == 0
        ids = mask.float().argmax(-1, keepdim=True)  # [T, 1]
        if logits is not None:
            # A dropped token's row is empty: keep the expert it chose (its full expert), not a fake expert 0.
            ids = torch.where(dropped[:, None], logits.argmax(-1, keepdim=True), ids)
    else:
        ids = _rows(raw_ids, raw_ids.shape[-1], torch.long)  # [T, k]
    if spec.weights_from == "probs" and logits is not None:
        w = _probs(logits, spec.probs).gather(-1, _in_range(ids, n_experts))
    elif spec.weights_from == "ones" or spec.weights is None:
        w = torch.ones_like(ids, dtype=torch.float32)
    else:
        raw_w = _pick(out, spec.weights)
        if raw_w is None:
            raise AdapterError(f"{spec.family}: router output has no weights at index {spec.weights}")
        if raw_w.shape[-1] == n_experts and ids.shape[-1] != n_experts:
            # Dense [T, E] score matrix (zeros off the selection): read each selected expert's weight.
            w = _rows(raw_w, n_experts, torch.float32).gather(-1, _in_range(ids, n_experts))
        elif spec.ids_layout == "k_first" and raw_w.dim() >= 2 and raw_w.shape[0] == ids.shape[1]:
            w = raw_w.detach().reshape(ids.shape[1], -1).t().float()  # [k, T] -> [T, k]
        else:
            w = _rows(raw_w, ids.shape[-1], torch.float32) if raw_w.shape[-1] == ids.shape[-1] \
                else raw_w.detach().float().reshape(ids.shape[0], -1)
    if spec.skip_expert:
        # Zaya masks a chosen skip class to (id 0, weight 0.0); a real expert 0 always has a positive softmax weight.
        ids = torch.where((ids == 0) & (w == 0), torch.full_like(ids, n_experts - 1), ids)
    return RouterEvent(logits, ids, w, dropped)


def _fail(spec: RouterSpec, msg: str) -> AdapterError:
    return AdapterError(f"spec {spec.family!r}: {msg}")


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _max_per_token(mask: torch.Tensor) -> int:
    """The most experts one token of a [T, E] mask selects."""
    return int(mask.sum(-1).max()) if mask.numel() else 0


def check_output(
    spec: RouterSpec, out: Any, n_experts: int, top_k: int, bs: tuple[int, int] | None,
    logits_out: torch.Tensor | None = None,
) -> None:
    """Validate a router's raw output against its spec on the first call: shapes, dtypes, k and E.

    Runs eagerly once per router (it syncs with the device); a mismatch is an AdapterError that names the spec
    field to change, so a wrong spec never becomes a silently wrong trace. `bs` is the model input's (B, S).
    """
    n, k = n_experts, top_k
    t = bs[0] * bs[1] if bs is not None else None
    if spec.logits_from is not None:
        if logits_out is None:
            raise _fail(spec, f"logits_from={spec.logits_from!r} returned no tensor before the router's output; set "
                        "logits_from to the submodule whose output is the logits [T, E]")
        raw_l, at = logits_out, f"the output of {spec.logits_from!r}"
    elif spec.ids_fn is None and spec.logits_are != "none" and spec.source != "experts_input" or spec.source == "logits":
        raw_l, at = _pick(out, spec.logits), f"output[{spec.logits}]"
    else:
        raw_l, at = None, ""
    if raw_l is not None:
        raw_l = raw_l.detach()  # the checks read values: never through autograd
        if raw_l.shape[-1] != n or not raw_l.is_floating_point():
            raise _fail(spec, f"logits ({at}) has shape {_shape(raw_l)} and dtype {raw_l.dtype} but n_experts={n}: "
                        "set `logits` (or logits_from) to the router's [T, E] float scores, or logits_are = \"none\"")
        if spec.logits_are != "none" and raw_l.numel():
            lo, hi = float(raw_l.min()), float(raw_l.max())
            rows = raw_l.float().reshape(-1, n).sum(-1)  # [T]
            sums_to_one = bool(((rows - 1.0).abs() < 1e-3).all())
            if spec.logits_are == "probs" and (lo < 0.0 or hi > 1.0):
                raise _fail(spec, f"logits_are=\"probs\" but {at} holds values in [{lo:.3g}, {hi:.3g}], outside "
                            "[0, 1]: set logits_are = \"logits\"")
            if spec.logits_are == "probs" and spec.probs == "softmax" and not sums_to_one:
                raise _fail(spec, f"logits_are=\"probs\" with probs=\"softmax\" but the rows of {at} sum to "
                            f"{float(rows.min()):.3g}..{float(rows.max()):.3g}, not 1: independent (sigmoid) "
                            "scores? set probs = \"sigmoid\"")
            if spec.logits_are == "logits" and lo >= 0.0 and hi <= 1.0 and sums_to_one and n > 1:
                raise _fail(spec, f"{at} holds probabilities (every row in [0, 1], summing to 1), not logits: set "
                            "logits_are = \"probs\"")
    elif spec.source == "logits":
        raise _fail(spec, f"source=\"logits\" but the router output has no tensor at logits={spec.logits}; set `logits`")
    if spec.source != "output" or spec.ids_fn is not None:
        return
    raw = _pick(out, spec.ids)
    if not isinstance(raw, torch.Tensor):
        raise _fail(spec, f"the router output ({_describe_out(out)}) has no tensor at ids={spec.ids}; set `ids`")
    shape, layout = _shape(raw), spec.ids_layout
    rows: int | None = None
    if layout in ("topk", "k_first") and not spec.onehot:
        looks_map = raw.dim() >= 2 and raw.shape[-1] == n and n != k
        if raw.dtype == torch.bool or (looks_map and raw.is_floating_point()):
            raise _fail(spec, f"ids has shape {shape} and dtype {raw.dtype}: looks like a [T, E] routing map (E="
                        f"{n}); set ids_layout = \"routing_map\"")
        if raw.is_floating_point():
            raise _fail(spec, f"ids (output[{spec.ids}]) holds {raw.dtype} values, not expert ids: set `ids` to the "
                        "index of the selected expert ids")
        if raw.dim() >= 3 and raw.shape[-2] == n and raw.shape[-1] != k:
            raise _fail(spec, f"ids has shape {shape}: looks like a dispatch mask [..., E={n}, C]; set "
                        "ids_layout = \"dispatch\"")
        if layout == "topk" and raw.shape[-1] != k:
            if raw.dim() >= 2 and raw.shape[0] == k:
                raise _fail(spec, f"ids has shape {shape} but top_k={k}, T={t if t is not None else '?'}: looks like "
                            "[k, T]; set ids_layout = \"k_first\"")
            raise _fail(spec, f"ids has shape {shape} but top_k={k}: the last axis must hold the k selected experts;"
                        " set top_k (or ids)")
        if layout == "k_first" and (raw.dim() < 2 or raw.shape[0] != k):
            # one axis: not ids at all (DeepSpeed's dense gate output puts per-expert counts [E] there)
            hint = ("`ids` to the output index of the selected expert ids (this output is "
                    f"{'per-expert counts [E]' if raw.numel() == n else 'one value per token'})" if raw.dim() < 2
                    else "ids_layout = \"topk\"" if raw.shape[-1] == k else "top_k")
            raise _fail(spec, f"ids has shape {shape} but ids_layout=\"k_first\" needs [k={k}, T]; set {hint}")
        rows = raw.numel() // max(k, 1)
    elif layout in ("routing_map", "dispatch"):
        if layout == "routing_map" and raw.shape[-1] != n:
            raise _fail(spec, f"ids has shape {shape} but ids_layout=\"routing_map\" needs [T, E={n}]; set n_experts"
                        " (or ids)")
        if layout == "dispatch" and (raw.dim() < 3 or raw.shape[-2] != n):
            raise _fail(spec, f"ids has shape {shape} but ids_layout=\"dispatch\" needs [..., E={n}, C]; set "
                        "n_experts (or ids)")
        # 1 within float rounding: a straight-through mask (st-moe: dispatch + combine - combine.detach()) is 1 ± ulp
        if raw.dtype != torch.bool and raw.numel() and bool(((raw != 0) & ((raw - 1).abs() > 1e-3)).any()):
            raise _fail(spec, f"ids (output[{spec.ids}]) is a {layout} mask with values other than 0 and 1 (gate "
                        "weights?): set `ids` to the 0/1 mask and `weights` to the weights")
        c = raw.shape[-1] if layout == "dispatch" else 1
        mask = raw.reshape(-1, n, c).ne(0).any(-1)  # [T, E]
        most = _max_per_token(mask)
        if most > k:
            raise _fail(spec, f"the {layout} mask sends a token to {most} experts but top_k={k}: set top_k = {most} "
                        f"(n_experts={n} when a token may go to any number)")
        rows = mask.shape[0]
        if spec.weights is not None and spec.weights_from == "output":
            raw_w = _pick(out, spec.weights)
            if not isinstance(raw_w, torch.Tensor) or raw_w.numel() != raw.numel():
                got = _shape(raw_w) if isinstance(raw_w, torch.Tensor) else "nothing"
                raise _fail(spec, f"weights=output[{spec.weights}] is {got} but the {layout} mask is {shape}: set "
                            "`weights` to the dense gate weights of the same shape, or weights = None")
    if rows is not None and t is not None and rows != t:
        warnings.warn(f"moescope: spec {spec.family!r}: the router saw {rows} tokens but the model's input has "
                      f"{bs[0]}×{bs[1]} = {t} (a subset of tokens?): its tokens count without the padding mask",  # type: ignore[index]
                      RuntimeWarning, stacklevel=4)


def check_event(spec: RouterSpec, ev: RouterEvent, n_experts: int, top_k: int, bs: tuple[int, int] | None) -> None:
    """Validate a normalised router call on its first call: ids [T, k] integer within [0, E) or the sentinel."""
    n, k = n_experts, top_k
    ids = ev.ids
    src = "ids_fn" if spec.ids_fn is not None else "ids"
    if ids.dim() != 2 or ids.is_floating_point():
        raise _fail(spec, f"{src} gave {ids.dtype} ids of shape {_shape(ids)}, not integer ids [T, k]")
    if ids.shape[1] != k:
        raise _fail(spec, f"{src} gave ids of shape {_shape(ids)} but top_k={k}: set top_k")
    if ev.weights.shape != ids.shape:
        raise _fail(spec, f"weights have shape {_shape(ev.weights)} but ids {_shape(ids)}: set `weights` (or "
                    "weights_from)")
    if ev.logits is not None and (ev.logits.shape[0] != ids.shape[0] or ev.logits.shape[-1] != n):
        raise _fail(spec, f"logits have shape {_shape(ev.logits)} but ids {_shape(ids)} and n_experts={n}: set "
                    "`logits` (or logits_from)")
    if spec.sentinel is not None and 0 <= spec.sentinel < n:
        raise _fail(spec, f"sentinel={spec.sentinel} is a real expert id (n_experts={n}): set sentinel to the id "
                    "that means 'no expert'")
    bad = (ids < 0) | (ids >= n)
    if spec.ids_fn is not None or spec.ids_layout in ("routing_map", "dispatch"):
        bad &= ids != -1  # -1: a slot with no expert, by the ids_fn contract and the mask layouts' reading
    if spec.sentinel is not None:
        bad &= ids != spec.sentinel
    if ids.numel() and bool(bad.any()):
        v = int(ids[bad][0])
        raise _fail(spec, f"{src} holds id {v}, outside [0, {n}) (n_experts={n}): if {v} means 'no expert' set "
                    f"sentinel = {v}; otherwise set `ids` (or n_experts)")


def _describe_out(out: Any) -> str:
    """A short account of a router output's structure, for error messages."""
    if isinstance(out, torch.Tensor):
        return f"a tensor {_shape(out)}"
    if isinstance(out, (tuple, list)):
        parts = [_shape(o) if isinstance(o, torch.Tensor) else type(o).__name__ for o in out]
        return f"{type(out).__name__} of {len(out)}: " + ", ".join(f"[{i}] {p}" for i, p in enumerate(parts))
    return type(out).__name__


def _in_range(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """ids [T, k] clamped into [0, E) for a gather: a sentinel id reads column 0, and its slot counts as dropped."""
    return ids.clamp(0, n_experts - 1)


def batch_first_rows(t: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
    """Rows [S*B, ...] in seq-first order as [B*S, ...] in the model input's order (other shapes unchanged)."""
    if t is None or t.shape[0] != b * s:
        return t
    return t.reshape(s, b, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def to_batch_first(ev: RouterEvent, b: int, s: int) -> RouterEvent:
    """A seq-first router call's rows ([S, B] order, Megatron) reordered to the model input's [B, S] order."""
    return RouterEvent(*(batch_first_rows(t, b, s) for t in (ev.logits, ev.ids, ev.weights, ev.dropped)))  # type: ignore[arg-type]


def _no_grad() -> bool:
    return not torch.is_grad_enabled()


def _rows(t: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """t as a [T, width] tensor of `dtype`, dispatching no op where it already is one (the hot path counts ops)."""
    if t.dim() != 2:
        t = t.reshape(-1, width)
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if _no_grad() else t.detach()


def _sorted_by_expert(
    spec: RouterSpec, out: Any, order: torch.Tensor, logits: torch.Tensor | None, n_experts: int, top_k: int
) -> RouterEvent:
    """JetMoE: undo the router's sort of the T*k slots by expert, giving ids/weights [T, k] in slot order."""
    gates = _pick(out, spec.weights)
    sizes = out[spec.expert_sizes] if isinstance(out, (tuple, list)) else None
    if gates is None or sizes is None:
        raise AdapterError(
            f"{spec.family}: router output lacks gates/expert sizes at {spec.weights}/{spec.expert_sizes}"
        )
    order = order.reshape(-1).long()  # [T*k]: slot index (t*k + s) of each sorted position
    sizes_t = torch.as_tensor(sizes, device=order.device, dtype=torch.long)  # [E]
    # the sorted positions hold expert 0's slots first, then expert 1's, ...: their expert is known by position
    # output_size: known on the host, so no device sync to size the result
    experts = torch.arange(len(sizes_t), device=order.device)
    sorted_expert = torch.repeat_interleave(experts, sizes_t, output_size=order.numel())  # [T*k]
    ids = torch.empty_like(order)
    ids[order] = sorted_expert
    w = torch.empty(order.shape, dtype=torch.float32, device=order.device)
    w[order] = gates.detach().reshape(-1).float()
    return RouterEvent(logits, ids.reshape(-1, top_k), w.reshape(-1, top_k))


def extract_experts_input(
    spec: RouterSpec, args: tuple[Any, ...], kwargs: dict[str, Any], n_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, k], weights [T, k]) as the experts module received them."""

    def arg(key: Any) -> Any:
        if isinstance(key, int):
            return args[key] if key < len(args) else None
        return kwargs.get(key)

    ids = arg(spec.experts_ids)
    w = arg(spec.experts_weights)
    if not isinstance(ids, torch.Tensor):
        raise AdapterError(f"{spec.family}: experts input has no ids tensor at {spec.experts_ids!r}")
    ids = ids.detach().reshape(-1, ids.shape[-1]).long()
    if isinstance(w, torch.Tensor):
        w = w.detach().float()
        if w.shape[-1] == n_experts and ids.shape[-1] != n_experts:
            w = w.reshape(-1, n_experts).gather(-1, _in_range(ids, n_experts))
        else:
            w = w.reshape(ids.shape[0], -1)
    else:
        w = torch.ones_like(ids, dtype=torch.float32)
    return ids, w


def reads_logits(spec: RouterSpec) -> bool | None:
    """Whether a router of this spec has its logits (or probabilities) read; None: its ids_fn decides per call."""
    if spec.ids_fn is not None and spec.logits_from is None:
        return None
    return spec.logits_from is not None or spec.source == "logits" or spec.logits_are != "none"


def describe(spec: RouterSpec) -> str:
    """One line saying how a router of this spec is hooked (every non-default field of the reading is named)."""
    if spec.ids_fn is not None:
        fn = spec.ids_fn if isinstance(spec.ids_fn, str) else getattr(spec.ids_fn, "__qualname__", repr(spec.ids_fn))
        how = f"forward hook: ids_fn={fn}"
    elif spec.source == "output":
        layout = {"k_first": " [k, T]", "routing_map": " ([T, E] routing map)",
                  "dispatch": " ([..., E, C] dispatch mask)", "sorted_by_expert": " (sorted by expert)"}
        how = f"forward hook: ids=output[{spec.ids}]" + (" (one-hot dispatch)" if spec.onehot else "")
        how += layout.get(spec.ids_layout, "")
        how += f", weights=output[{spec.weights}]" if spec.weights is not None else f", weights={spec.weights_from}"
    elif spec.source == "experts_input":
        how = f"pre-hook on '{spec.experts}' for ids/weights"
        how = how if spec.logits_are == "none" and spec.logits_from is None else "forward hook for logits + " + how
    else:
        how = f"forward hook on logits, ids/weights by {spec.selection}"
    if spec.logits_from is not None:
        how += f", logits=output of '{spec.logits_from}'"
    elif spec.logits is not None and spec.logits_are != "none" and spec.ids_fn is None:
        how += f", logits=output[{spec.logits}]"
    how += " (probabilities)" if spec.logits_are == "probs" else ""
    how += ", sigmoid scores" if spec.probs == "sigmoid" else ""
    how += f", sentinel={spec.sentinel}" if spec.sentinel is not None else ""
    return how + (", seq-first tokens" if spec.token_layout == "seq_first" else "")


__all__ = [
    "router_probs",
    "AdapterError",
    "RouterEvent",
    "RouterSpec",
    "all_specs",
    "check_event",
    "check_output",
    "describe",
    "extract_experts_input",
    "extract_router_output",
    "get_submodule",
    "reads_logits",
    "register_router",
    "resolve",
    "unregister_router",
    "router_shape",
    "select",
    "to_batch_first",
]

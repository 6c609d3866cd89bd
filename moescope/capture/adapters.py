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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import specs as _specs

# The spec schema, loading and matching live in moescope/capture/specs.py (no torch); re-exported here.
from .specs import IDS_LAYOUTS, LOGITS_ARE, PROBS, SELECTIONS, SOURCES, AdapterError, RouterSpec  # noqa: F401


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


def all_specs() -> list[RouterSpec]:
    """Every known spec, highest priority first."""
    return _specs.REGISTRY.all()


def resolve(module: nn.Module) -> RouterSpec | None:
    """The spec for a module, matched by module path and class name through its MRO (exact class first)."""
    return _specs.REGISTRY.resolve(type(module), stop=(nn.Module, object))


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


def extract_router_output(spec: RouterSpec, out: Any, n_experts: int, top_k: int) -> RouterEvent | None:
    """Normalise a router's forward output into a RouterEvent (ids/weights may be filled later, experts_input)."""
    logits = None if spec.logits_are == "none" else _pick(out, spec.logits)
    if logits is not None:
        logits = _rows(logits, logits.shape[-1], torch.float32)  # [T, E]
        if spec.logits_are == "probs":
            # log p is a logits vector of the same softmax: entropy, margin and prob_sum stay exact (lse = 0)
            logits = logits.clamp_min(torch.finfo(torch.float32).tiny).log()
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
    dropped = None
    if spec.onehot:
        mask = raw_ids.reshape(-1, raw_ids.shape[-1])  # [T, E] one-hot dispatch (zeros: dropped)
        dropped = mask.sum(-1) == 0
        ids = mask.float().argmax(-1, keepdim=True)  # [T, 1]
        if logits is not None:
            # A dropped token's row is empty: keep the expert it chose (its full expert), not a fake expert 0.
            ids = torch.where(dropped[:, None], logits.argmax(-1, keepdim=True), ids)
    else:
        ids = _rows(raw_ids, raw_ids.shape[-1], torch.long)  # [T, k]
    if spec.weights_from == "probs" and logits is not None:
        w = _probs(logits, spec.probs).gather(-1, ids)
    elif spec.weights_from == "ones" or spec.weights is None:
        w = torch.ones_like(ids, dtype=torch.float32)
    else:
        raw_w = _pick(out, spec.weights)
        if raw_w is None:
            raise AdapterError(f"{spec.family}: router output has no weights at index {spec.weights}")
        if raw_w.shape[-1] == n_experts and ids.shape[-1] != n_experts:
            # Dense [T, E] score matrix (zeros off the selection): read each selected expert's weight.
            w = _rows(raw_w, n_experts, torch.float32).gather(-1, ids)
        else:
            w = _rows(raw_w, ids.shape[-1], torch.float32) if raw_w.shape[-1] == ids.shape[-1] \
                else raw_w.detach().float().reshape(ids.shape[0], -1)
    if spec.skip_expert:
        # Zaya masks a chosen skip class to (id 0, weight 0.0); a real expert 0 always has a positive softmax weight.
        ids = torch.where((ids == 0) & (w == 0), torch.full_like(ids, n_experts - 1), ids)
    return RouterEvent(logits, ids, w, dropped)


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
            w = w.reshape(-1, n_experts).gather(-1, ids)
        else:
            w = w.reshape(ids.shape[0], -1)
    else:
        w = torch.ones_like(ids, dtype=torch.float32)
    return ids, w


def describe(spec: RouterSpec) -> str:
    """One line saying how a router of this spec is hooked."""
    if spec.source == "output":
        how = f"forward hook: ids=output[{spec.ids}]" + (" (one-hot dispatch)" if spec.onehot else "")
        how += " (sorted by expert)" if spec.ids_layout == "sorted_by_expert" else ""
        how += f", weights=output[{spec.weights}]" if spec.weights is not None else f", weights={spec.weights_from}"
    elif spec.source == "experts_input":
        how = f"pre-hook on '{spec.experts}' for ids/weights"
        how = how if spec.logits_are == "none" else "forward hook for logits + " + how
    else:
        how = f"forward hook on logits, ids/weights by {spec.selection}"
    how += f", logits=output[{spec.logits}]" if spec.logits is not None and spec.logits_are != "none" else ""
    return how + (" (probabilities)" if spec.logits_are == "probs" else "")


__all__ = [
    "router_probs",
    "AdapterError",
    "RouterEvent",
    "RouterSpec",
    "all_specs",
    "describe",
    "extract_experts_input",
    "extract_router_output",
    "get_submodule",
    "register_router",
    "resolve",
    "router_shape",
    "select",
]

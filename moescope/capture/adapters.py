"""Router adapters: declarative specs (hooks/*.toml) resolved by module class through the MRO.

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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tomllib
import torch
from torch import nn

from .._paths import content_dir

SOURCES = ("output", "experts_input", "logits")
SELECTIONS = (
    "softmax_topk",
    "softmax_topk_norm",
    "sigmoid_topk",
    "sigmoid_topk_norm",
    "topk_softmax",
    "topk_sigmoid",
)
PROBS = ("softmax", "sigmoid")
IDS_LAYOUTS = ("topk", "sorted_by_expert")
LOGITS_ARE = ("logits", "probs", "none")


class AdapterError(ValueError):
    """A router spec is invalid or a router output does not match its spec."""


@dataclass(frozen=True)
class RouterSpec:
    """How to read one router family's decisions. Field names are those of hooks/*.toml."""

    family: str
    classes: tuple[str, ...]
    source: str = "output"
    logits: int | None = 0  # index of the logits in the router output; None: the output is the logits tensor
    weights: int | None = None  # index of the gate weights in the router output
    ids: int | None = None  # index of the selected expert ids (or, with onehot, the dispatch mask)
    # ids are a one-hot dispatch mask [..., E]; all-zero rows are tokens dropped over capacity, stored with the
    # expert they chose (argmax of the logits, the router's own choice before the capacity cut) and counted in `dropped`
    onehot: bool = False
    ids_layout: str = "topk"  # "topk": ids [T, k]; "sorted_by_expert": JetMoE (slot order, gates, sizes by expert)
    expert_sizes: int | None = None  # sorted_by_expert: index of the per-expert slot counts in the output
    # "probs": the output holds softmax probabilities (their log is stored as logits); "none": no per-expert logits
    logits_are: str = "logits"
    skip_expert: bool = False  # last logits column is a skip class the router masks to (id 0, weight 0)
    weights_from: str = "output"  # "output", "probs" (probability of each selected expert), "ones"
    selection: str = "softmax_topk"  # for source="logits", and to fill missing weights
    probs: str = "softmax"  # how router probabilities follow from logits (for prob_sum and entropy)
    n_experts: Any = "num_experts"  # attribute name(s) on the router module, or an int
    top_k: Any = "top_k"
    experts: str = "experts"  # path of the experts module, relative to the router's parent
    experts_ids: Any = 1  # positional index or keyword of the ids in the experts forward (experts_input)
    experts_weights: Any = 2
    router_kind: str = "softmax_topk"
    parent_n_experts: Any = None  # attribute names looked up on the parent block when the router lacks them
    parent_top_k: Any = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise AdapterError(f"router spec {self.family!r}: source must be one of {SOURCES}, got {self.source!r}")
        if self.probs not in PROBS:
            raise AdapterError(f"router spec {self.family!r}: probs must be one of {PROBS}, got {self.probs!r}")
        if self.selection not in SELECTIONS:
            raise AdapterError(
                f"router spec {self.family!r}: selection must be one of {SELECTIONS}, got {self.selection!r}"
            )
        if self.source == "output" and self.ids is None:
            raise AdapterError(f"router spec {self.family!r}: source='output' needs `ids` (index in the output)")
        if self.ids_layout not in IDS_LAYOUTS:
            raise AdapterError(
                f"router spec {self.family!r}: ids_layout must be one of {IDS_LAYOUTS}, got {self.ids_layout!r}"
            )
        if self.ids_layout == "sorted_by_expert" and (self.expert_sizes is None or self.weights is None):
            raise AdapterError(
                f"router spec {self.family!r}: ids_layout='sorted_by_expert' needs `expert_sizes` and `weights`"
            )
        if self.logits_are not in LOGITS_ARE:
            raise AdapterError(
                f"router spec {self.family!r}: logits_are must be one of {LOGITS_ARE}, got {self.logits_are!r}"
            )


@dataclass
class RouterEvent:
    """One router call, normalised: every tensor is flattened to T = batch × seq tokens."""

    logits: torch.Tensor | None  # [T, E] float32
    ids: torch.Tensor  # [T, k] int64, slot order as the router returned them
    weights: torch.Tensor  # [T, k] float32
    dropped: torch.Tensor | None = None  # [T] bool, tokens the model dropped over capacity


_SPECS: list[tuple[RouterSpec, int]] = []  # (spec, priority): user registrations win over files
_FILES_LOADED = False
_FIELDS = {f.name for f in dataclasses.fields(RouterSpec)}


def _spec_from_mapping(d: dict[str, Any], origin: str) -> RouterSpec:
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise AdapterError(f"{origin}: unknown router spec field(s) {unknown}; valid fields: {sorted(_FIELDS)}")
    d = dict(d)
    classes = d.get("classes")
    if isinstance(classes, str):
        classes = [classes]
    if not classes:
        raise AdapterError(f"{origin}: router spec needs `classes`")
    d["classes"] = tuple(classes)
    d.setdefault("family", d["classes"][0])
    return RouterSpec(**d)


def load_spec_files() -> list[RouterSpec]:
    """Read every hooks/*.toml spec shipped with moescope."""
    specs: list[RouterSpec] = []
    for path in sorted(content_dir("hooks").glob("*.toml")):
        with open(path, "rb") as fh:
            try:
                doc = tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise AdapterError(f"{path}: invalid TOML ({e})") from None
        for i, entry in enumerate(doc.get("router", [])):
            specs.append(_spec_from_mapping(entry, f"{path.name}[router {i}]"))
    return specs


def _ensure_loaded() -> None:
    global _FILES_LOADED
    if not _FILES_LOADED:
        _SPECS.extend((s, 0) for s in load_spec_files())
        _FILES_LOADED = True


def register_router(cls: type | str, **spec: Any) -> RouterSpec:
    """Register a user router class with the fields of a hooks/*.toml spec; later registrations win."""
    _ensure_loaded()
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    spec.setdefault("family", name.rsplit(".", 1)[-1])
    s = _spec_from_mapping({"classes": [name], **spec}, f"register_router({name})")
    _SPECS.append((s, 1 + len(_SPECS)))
    return s


def all_specs() -> list[RouterSpec]:
    """Every known spec, highest priority first."""
    _ensure_loaded()
    return [s for s, _ in sorted(_SPECS, key=lambda sp: -sp[1])]


def resolve(module: nn.Module) -> RouterSpec | None:
    """The spec for a module, matched by class through its MRO (exact class first, then bases)."""
    _ensure_loaded()
    specs = sorted(_SPECS, key=lambda sp: -sp[1])
    for klass in type(module).__mro__:
        if klass in (nn.Module, object):
            break
        names = (f"{klass.__module__}.{klass.__qualname__}", klass.__qualname__, klass.__name__)
        for s, _ in specs:
            if any(c in names for c in s.classes):
                return s
    return None


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

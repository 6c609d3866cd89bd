"""Megatron-Core routing: RouterReplay's recorded top-k indices and TopKRouter's (probs, routing_map) output.

Producer code followed (megatron-core 0.16, megatron/core/transformer/moe/):
- `router_replay.py`: `RouterReplay.get_recorded_data()` -> one `[num_tokens, topk]` int tensor per MoE layer,
  in router instantiation order (what `moe_enable_routing_replay=True` records; docs/api-guide/router_replay.md
  persists it with `torch.save`);
- `inference/contexts/routing_metadata.py`: `RoutingMetadata.get_routing_indices()` -> the same stacked as
  `[num_tokens, num_moe_layers, topk]`;
- `router.py`: `TopKRouter.forward` -> `(probs, routing_map)`, both `[num_tokens, num_experts]`, the routing map
  after token dropping (what was dispatched), probs the gate weights (zero off the map).

Token order is Megatron's: hidden states are `[seq, batch, hidden]` flattened, so token t is position t // B of
sequence t % B for micro-batch size B (--micro-batch-size); without it every token is one sequence, in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CLIError
from ..format.manifest import TraceError
from ._base import Importer, ImportOptions, Progress, Tables, as_array, load_torch, steps_from_names


def _entries(obj: Any, where: str) -> list[tuple[int, Any]]:
    """(layer, entry) pairs of one file: a list per layer, a {layer: entry} dict, or a [T, L, k] tensor."""
    if isinstance(obj, (list, tuple)):
        if len(obj) == 2 and _is_router_output(obj):  # one layer's TopKRouter output saved alone
            return [(0, obj)]
        return [(i, e) for i, e in enumerate(obj)]
    if isinstance(obj, dict):
        out = []
        for k, e in obj.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise TraceError(f"{where}: layer key {k!r} is not a layer number")
            out.append((k, e))
        return sorted(out, key=lambda kv: kv[0])
    arr = as_array(obj, where)
    if arr.ndim == 3:  # RoutingMetadata.get_routing_indices(): [T, L, k]
        return [(layer, arr[:, layer, :]) for layer in range(arr.shape[1])]
    if arr.ndim == 2:  # one layer's recorded indices or routing map saved alone
        return [(0, arr)]
    raise TraceError(f"{where}: expected a list of per-layer tensors or a [tokens, layers, k] tensor, "
                     f"got shape {list(arr.shape)}")


def _is_router_output(obj: Any) -> bool:
    """(probs [T, E] float, routing_map [T, E] bool): TopKRouter.forward's output."""
    try:
        p, m = (as_array(x, "") for x in obj)
    except TraceError:
        return False
    return p.ndim == 2 and m.ndim == 2 and p.shape == m.shape and m.dtype == np.bool_ and p.dtype.kind == "f"


def _read_entry(entry: Any, where: str, opts: ImportOptions) -> tuple[np.ndarray, np.ndarray | None, int, int | None]:
    """One layer's entry as (ids [T, k] with -1 for no route, weights or None, N experts, top-k or None)."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and _is_router_output(entry):
        probs, rmap = (as_array(x, where) for x in entry)
        return _from_map(rmap, probs, where, opts)
    arr = as_array(entry, where)
    if arr.ndim != 2:
        raise TraceError(f"{where}: expected [tokens, k] indices or a [tokens, experts] routing map, "
                         f"got shape {list(arr.shape)}")
    if arr.dtype == np.bool_:
        return _from_map(arr, None, where, opts)
    if arr.dtype.kind not in "iu":
        raise TraceError(f"{where}: expected integer top-k indices or a boolean routing map, got {arr.dtype}")
    if opts.num_experts is None:
        raise CLIError("megatron top-k indices do not say how many experts a layer has: pass --num-experts N")
    if arr.size and arr.min() < 0:
        raise TraceError(f"{where}: expert index {int(arr.min())} is negative")
    return arr.astype(np.int64), None, opts.num_experts, arr.shape[1]


def _from_map(rmap: np.ndarray, probs: np.ndarray | None, where: str,
              opts: ImportOptions) -> tuple[np.ndarray, np.ndarray | None, int, int | None]:
    """A [T, E] routing map (and probs) as ids [T, kmax] in expert order, -1 where a token has fewer routes."""
    t, e = rmap.shape
    if opts.num_experts is not None and opts.num_experts != e:
        raise CLIError(f"{where}: the routing map has {e} experts, --num-experts says {opts.num_experts}")
    rmap = rmap.astype(bool)
    per_tok = rmap.sum(axis=1)  # [T]; below k where the router dropped routes over capacity
    kmax = int(per_tok.max()) if t else 0
    ids = np.full((t, max(kmax, 1)), -1, np.int64)
    rows, cols = np.nonzero(rmap)  # row-major: each token's experts in increasing id order
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(per_tok) - per_tok, per_tok)
    ids[rows, slot] = cols
    weights = None
    if probs is not None:
        weights = np.zeros(ids.shape, np.float64)
        weights[rows, slot] = probs[rows, cols]
    return ids, weights, e, opts.top_k


def read(files: list[Path], opts: ImportOptions, notes: list[str], progress: Progress) -> Iterator[tuple[int, Tables]]:
    """One batch per file; each file is one step (the number in its name, else its order)."""
    steps, how = steps_from_names(files)
    if len(files) > 1:
        notes.append(f"steps from {how}")
    b = opts.micro_batch_size
    for path, step in zip(files, steps):
        progress.file(path)
        obj = load_torch(path)
        batch = Tables(opts.tag, opts.layers)
        for layer, entry in _entries(obj, str(path)):
            if entry is None:  # RouterReplay of a layer that recorded nothing in this pass
                continue
            where = f"{path} (layer {layer})"
            ids, weights, n_exp, top_k = _read_entry(entry, where, opts)
            t = ids.shape[0]
            tok = np.arange(t)
            if b is not None and t % b:
                raise CLIError(f"{where}: {t} tokens are not a multiple of --micro-batch-size {b}")
            seq, pos = (tok % b, tok // b) if b is not None else (np.zeros(t, np.int64), tok)
            batch.add_routes(step, layer, ids, n_exp, where, seq=seq, pos=pos, weights=weights, top_k=top_k)
        yield 0, batch


IMPORTER = Importer(
    name="megatron",
    producer="Megatron-Core",
    reads="torch.save files of Megatron-Core routing, one file per step (the last number in the file name): "
    "RouterReplay.get_recorded_data() (a list of [tokens, k] top-k indices per MoE layer; needs --num-experts), "
    "RoutingMetadata.get_routing_indices() ([tokens, layers, k]), or per layer TopKRouter's "
    "(probs, routing_map) output or routing_map alone ([tokens, experts]: dispatched routes, gate weights). "
    "Token t is position t // B of sequence t % B with --micro-batch-size B (Megatron is sequence-first).",
    read=read,
    options=("num_experts", "top_k", "micro_batch_size"),
    patterns=("*.pt", "*.pth"),
)

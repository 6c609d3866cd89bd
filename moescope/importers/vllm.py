"""vLLM: routed experts returned per request, and the EPLB expert-load state.

Producer code followed (vllm-project/vllm):
- `vllm/model_executor/layers/fused_moe/routed_experts_capturer.py` (`RoutedExpertsCapturer.capture`,
  `RoutedExpertsReader.get_routed_experts`) and `vllm/outputs.py` (`CompletionOutput.routed_experts`): with
  `enable_return_routed_experts`, each request returns a `[num_tokens - 1, num_hidden_layers, num_experts_per_tok]`
  uint16 (int32 past 65,535 experts) array; the capture buffer starts zeroed, so rows of layers without a router
  (dense layers) stay all 0. Users save it with `np.save` (one .npy per request, or several arrays in one .npz).
  The ids are logical: `fused_moe/router/base_router.py` (`BaseRouter.select_experts`) calls the capture with
  `topk_ids` before `_apply_eplb_mapping` turns them into physical slots.
- `vllm/distributed/eplb/eplb_state.py` (`EplbModelState`): `expert_load_window` [window, moe layers, physical
  experts] (a ring written at `EplbState.expert_load_window_step`), `expert_load_pass` [moe layers, physical],
  `physical_to_logical_map` [moe layers, physical]. vLLM writes no file of its own: these are the fields a user
  saves with `torch.save({...})`; `EplbState.rearrange` sums physical loads onto logical experts with
  `scatter_add_` over `physical_to_logical_map`, and so does this importer.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CLIError
from ..format.manifest import TraceError
from ._base import (
    BATCH_ROWS,
    Importer,
    ImportOptions,
    Progress,
    Tables,
    as_array,
    check_map,
    load_map,
    load_torch,
    logical_counts,
    logical_ids,
    ranges_text,
)


def _arrays(path: Path) -> list[tuple[str, np.ndarray]]:
    """The request arrays of one .npy or .npz file."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return [(f"{path}[{k}]", z[k]) for k in z.files]
        return [(str(path), np.load(path, allow_pickle=False))]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise TraceError(f"{path}: not a readable numpy file ({' '.join(str(e).split())[:160]})") from None


def read_routed(files: list[Path], opts: ImportOptions, notes: list[str],
                progress: Progress) -> Iterator[tuple[int, Tables]]:
    """Every request is one sequence of step 0 (requests are concurrent: there is no training step)."""
    if opts.num_experts is None:
        raise CLIError("vLLM's routed_experts arrays do not say how many experts a layer has: pass --num-experts N")
    p2l = load_map(opts.physical_to_logical) if opts.physical_to_logical is not None else None
    unwritten: dict[int, int] = {}
    rows_per_layer: dict[int, int] = {}
    zero_only: dict[int, bool] = {}
    batch = Tables(opts.tag, opts.layers)
    seq = 0
    for path in files:
        progress.file(path)
        for where, arr in _arrays(path):
            if arr.ndim != 3:
                raise TraceError(f"{where}: routed_experts should be [tokens, layers, top_k], got {list(arr.shape)}")
            if arr.dtype.kind not in "iu":
                raise TraceError(f"{where}: routed_experts should hold integer expert ids, got {arr.dtype}")
            t, n_layers, k = arr.shape
            if p2l is not None:
                p2l_checked, n = check_map(p2l, n_layers, f"{opts.physical_to_logical}", opts.num_experts)
            else:
                p2l_checked, n = None, opts.num_experts
            pos = np.arange(t)
            for layer in range(n_layers):
                ids = arr[:, layer, :].astype(np.int64)  # [T, k]
                if k >= 2:
                    # Top-k picks k distinct experts: a row repeating an id was never written (zero-filled).
                    srt = np.sort(ids, axis=1)
                    blank = (srt[:, 1:] == srt[:, :-1]).any(axis=1)  # [T]
                    unwritten[layer] = unwritten.get(layer, 0) + int(blank.sum())
                    ids[blank] = -1
                rows_per_layer[layer] = rows_per_layer.get(layer, 0) + t
                if k == 1:
                    zero_only[layer] = zero_only.get(layer, True) and not ids.any()
                if p2l_checked is not None:
                    ids = logical_ids(ids, p2l_checked[layer if p2l_checked.shape[0] > 1 else 0], where)
                batch.add_routes(0, layer, ids, n, f"{where} layer {layer}", seq=np.full(t, seq), pos=pos,
                                 top_k=opts.top_k if opts.top_k is not None else k)
            seq += 1
            progress.tick(f"{where}: request {seq}")
            if batch.rows >= BATCH_ROWS:
                yield 0, batch.take_routes()  # the loads of step 0 stay, summed over every request
    yield 0, batch
    kept = [ly for ly in rows_per_layer if batch.wants(ly)]
    dense = [ly for ly in kept if unwritten.get(ly) and unwritten[ly] == rows_per_layer[ly]]
    partly = {ly: unwritten[ly] for ly in kept if 0 < unwritten.get(ly, 0) < rows_per_layer[ly]}
    notes.append(f"{seq} request(s) as sequences of step 0")
    if dense:
        notes.append(f"layers {ranges_text(dense)}: every row zero-filled by vLLM (no router: dense layers), "
                     "left out")
    for ly, c in sorted(partly.items()):
        notes.append(f"layer {ly}: {c} token row(s) repeat an expert id (never written by vLLM), not counted")
    suspicious = [ly for ly, z in zero_only.items() if z and batch.wants(ly)]
    if suspicious:
        notes.append(f"layers {ranges_text(suspicious)}: every token on expert 0 with top-1 routing; vLLM also "
                     "leaves dense layers at 0: pass --layers with the MoE layers if these are dense")


def _eplb_steps(obj: dict[str, Any], where: str) -> tuple[list[np.ndarray], str]:
    """The per-pass physical loads [L, P] of one saved EplbModelState, oldest first, and how they were ordered."""
    out: list[np.ndarray] = []
    how = ""
    if "expert_load_window" in obj:
        win = as_array(obj["expert_load_window"], f"{where}: expert_load_window")  # [W, L, P]
        if win.ndim != 3:
            raise TraceError(f"{where}: expert_load_window should be [window, layers, physical experts], "
                             f"got {list(win.shape)}")
        ws = obj.get("expert_load_window_step")
        if ws is not None:
            ws = int(ws) % win.shape[0]
            order = list(range(ws, win.shape[0])) + list(range(ws))  # the ring's oldest slot is the next written
            how = "window rows oldest first (expert_load_window_step)"
        else:
            order = list(range(win.shape[0]))
            how = "window rows in slot order (no expert_load_window_step saved: a wrapped ring is not in time order)"
        out += [win[i] for i in order]
    if "expert_load_pass" in obj:
        out.append(as_array(obj["expert_load_pass"], f"{where}: expert_load_pass"))  # [L, P], the pass in progress
    if not out:
        raise TraceError(f"{where}: no expert_load_window or expert_load_pass (not a saved vLLM EPLB state)")
    return out, how


def read_eplb(files: list[Path], opts: ImportOptions, notes: list[str],
              progress: Progress) -> Iterator[tuple[int, Tables]]:
    """Each non-empty pass is one step, numbered across files in file order."""
    step = 0
    empty = 0
    hows: set[str] = set()
    mapped = False
    for path in files:
        progress.file(path)
        obj = load_torch(path)
        if not isinstance(obj, dict):
            raise TraceError(f"{path}: expected a dict of EplbModelState fields, got {type(obj).__name__}")
        passes, how = _eplb_steps(obj, str(path))
        if how:
            hows.add(how)
        n_layers, n_phys = passes[0].shape if passes[0].ndim == 2 else (0, 0)
        if "physical_to_logical_map" in obj:
            raw = np.atleast_2d(as_array(obj["physical_to_logical_map"], f"{path}: physical_to_logical_map"))
            p2l, n = check_map(raw, n_layers, str(path), opts.num_experts)
            mapped |= p2l.shape[1] != n
        elif opts.physical_to_logical is not None:
            p2l, n = check_map(load_map(opts.physical_to_logical), n_layers, str(opts.physical_to_logical),
                               opts.num_experts)
            mapped |= p2l.shape[1] != n
        else:
            if opts.num_experts is not None and opts.num_experts != n_phys:
                raise CLIError(f"{path}: {n_phys} physical experts and no physical_to_logical_map: pass "
                               f"--physical-to-logical FILE to sum replicas onto {opts.num_experts} experts")
            p2l, n = np.arange(n_phys)[None, :], n_phys
        batch = Tables(opts.tag, opts.layers)
        for i, load in enumerate(passes):
            where = f"{path} (pass {i})"
            if load.ndim != 2 or load.shape != (n_layers, n_phys):
                raise TraceError(f"{where}: load of shape {list(load.shape)}, expected [{n_layers}, {n_phys}]")
            added = [batch.add_counts(step, layer, logical_counts(load[layer], p2l[layer if p2l.shape[0] > 1 else 0],
                                                                 n, where), where, opts.top_k)
                     for layer in range(n_layers)]
            if any(added):
                step += 1
            else:
                empty += 1
            if batch.rows >= BATCH_ROWS:
                yield 0, batch
                batch = Tables(opts.tag, opts.layers)
        yield 0, batch
    notes.append("steps: the EPLB passes in order, numbered from 0" + (f" ({'; '.join(sorted(hows))})" if hows else ""))
    if empty:
        notes.append(f"{empty} pass(es) with no load (unused window slots) left out")
    if mapped:
        notes.append("physical expert slots (EPLB redundant experts) summed onto logical experts")


ROUTED = Importer(
    name="vllm-routed",
    producer="vLLM",
    reads="vLLM routed experts: CompletionOutput.routed_experts arrays ([tokens, layers, top_k], "
    "enable_return_routed_experts) saved with np.save, one .npy per request or several in one .npz; each "
    "request is one sequence of step 0. Needs --num-experts. Rows vLLM never wrote (zero-filled: dense layers) "
    "are not counted; --physical-to-logical maps physical slot ids to logical experts.",
    read=read_routed,
    options=("num_experts", "top_k", "physical_to_logical"),
    patterns=("*.npy", "*.npz"),
)

EPLB = Importer(
    name="vllm-eplb",
    producer="vLLM EPLB",
    reads="vLLM EPLB expert load: torch.save of EplbModelState fields {expert_load_window [window, layers, "
    "physical], expert_load_window_step, expert_load_pass [layers, physical], physical_to_logical_map "
    "[layers, physical]}; each pass is a step, physical slots (redundant experts) summed onto logical experts.",
    read=read_eplb,
    options=("num_experts", "top_k", "physical_to_logical"),
    patterns=("*.pt", "*.pth"),
)

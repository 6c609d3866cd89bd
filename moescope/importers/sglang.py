"""SGLang's expert-distribution recorder dumps (`--expert-distribution-recorder-mode stat | per_pass | per_token`).

Producer code followed: sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py (formerly
srt/managers/expert_distribution.py); `_dump_to_file` writes `torch.save(output)` into
SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR as `expert_distribution_recorder_{time}[_{rank}].pt`:

- `_StatAccumulator.dump` (modes stat, stat_approx): `{"rank", "logical_count": [passes, layers, logical experts],
  "average_utilization_rate_over_window"}`, already logical (`_convert_global_physical_count_to_logical_count`)
  and all-reduced over ranks; rows are the buffered forward passes (a circular buffer when
  expert_distribution_recorder_buffer_size > 0: unused slots are zero, and a wrapped buffer is not in time order);
- `_DetailAccumulator.dump` (modes per_pass, per_token): `{"records": [...], "last_physical_to_logical_map":
  [layers, physical slots]}`, one file per rank; per_pass records hold `global_physical_count` [layers, physical]
  (from `_SelectExpertsSinglePassGatherer`), per_token records `topk_ids_of_layer` [layers, tokens, 8] physical
  slot ids padded with -1, plus `input_ids`, `positions`, `extend_seq_lens` (`_DetailSinglePassGatherer`).

Physical slots (EPLB redundant experts) are summed onto their logical expert through the dump's map. Layers are
SGLang's layer numbers; layers where no token was routed (dense layers) are left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..format.manifest import TraceError
from ._base import (
    BATCH_ROWS,
    Importer,
    ImportOptions,
    Progress,
    Tables,
    as_array,
    check_map,
    load_torch,
    logical_counts,
    logical_ids,
)


def _stat(path: Path, obj: dict[str, Any], opts: ImportOptions, step0: int, progress: Progress,
          empty: list[int]) -> Iterator[Tables]:
    """A stat dump: one step per buffered pass, in batches; passes with no assignments are counted in `empty`."""
    counts = as_array(obj["logical_count"], f"{path}: logical_count")  # [S, L, E]
    if counts.ndim != 3:
        raise TraceError(f"{path}: logical_count should be [passes, layers, experts], got {list(counts.shape)}")
    if opts.num_experts is not None and counts.shape[2] != opts.num_experts:
        raise TraceError(f"{path}: logical_count has {counts.shape[2]} experts, --num-experts says "
                         f"{opts.num_experts}")
    batch = Tables(opts.tag, opts.layers)
    for s in range(counts.shape[0]):
        added = [batch.add_counts(step0 + s, layer, counts[s, layer], f"{path} (pass {s})", opts.top_k)
                 for layer in range(counts.shape[1])]
        empty[0] += not any(added)
        progress.tick(f"{path}: pass {s + 1}/{counts.shape[0]}")
        if batch.rows >= BATCH_ROWS:
            yield batch
            batch = Tables(opts.tag, opts.layers)
    yield batch


def _per_token(rec: dict[str, Any], step: int, p2l: np.ndarray, n: int, where: str, batch: Tables) -> None:
    """A per_token record: every layer's [T, 8] physical ids mapped to logical experts, one routing row a token."""
    ids = as_array(rec["topk_ids_of_layer"], where)  # [L, T, 8]
    if ids.ndim != 3:
        raise TraceError(f"{where}: topk_ids_of_layer should be [layers, tokens, k], got {list(ids.shape)}")
    t = ids.shape[1]
    input_ids = rec.get("input_ids")
    positions = rec.get("positions")
    token_id = np.asarray(input_ids, np.int64) if input_ids is not None and len(input_ids) == t else None
    pos = np.asarray(positions, np.int64) if positions is not None and len(positions) == t else np.arange(t)
    lens = rec.get("extend_seq_lens")
    if lens is not None and sum(int(x) for x in lens) == t:
        seq = np.repeat(np.arange(len(lens)), [int(x) for x in lens])  # prefill: tokens grouped by request
    else:
        seq = np.arange(t)  # decode: one token per request
    for layer in range(ids.shape[0]):
        row = p2l[layer if p2l.shape[0] > 1 else 0]
        lid = logical_ids(ids[layer], row, f"{where} layer {layer}")
        batch.add_routes(step, layer, lid, n, f"{where} layer {layer}", seq=seq, pos=pos, token_id=token_id)


def _fingerprint(rec: dict[str, Any], where: str) -> bytes:
    """A digest of one per_token record's tokens and routed ids: equal on two ranks that routed the same tokens."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(as_array(rec["topk_ids_of_layer"], where)).tobytes())
    h.update(np.asarray(rec.get("input_ids") or [], np.int64).tobytes())
    h.update(np.asarray(rec.get("positions") or [], np.int64).tobytes())
    return h.digest()


def read(files: list[Path], opts: ImportOptions, notes: list[str], progress: Progress) -> Iterator[tuple[int, Tables]]:
    """stat dumps: steps follow the files' order (names carry the dump time); detail dumps: forward_pass_id."""
    step0 = 0
    empty = [0]  # passes with no assignments (unused buffer slots), counted by _stat
    modes: set[str] = set()
    mapped = False
    # per_token records by (forward pass, fingerprint) -> the first rank holding it; replicas[(rank, first)] = count.
    # With tensor parallelism (no DP attention) every rank routes the same tokens: the loads count them once per
    # rank. That is said, not undone: identical requests served on data-parallel ranks look the same.
    first_rank: dict[tuple[int, bytes], int] = {}
    replicas: dict[tuple[int, int], int] = {}
    for path in files:
        progress.file(path)
        obj = load_torch(path)
        if not isinstance(obj, dict):
            raise TraceError(f"{path}: not an SGLang expert-distribution dump (expected a dict, got "
                             f"{type(obj).__name__})")
        if "logical_count" in obj:
            modes.add("stat")
            rank = int(obj.get("rank", 0) or 0)
            for batch in _stat(path, obj, opts, step0, progress, empty):
                yield rank, batch
            step0 += len(obj["logical_count"])
            continue
        if "records" not in obj or "last_physical_to_logical_map" not in obj:
            raise TraceError(f"{path}: not an SGLang expert-distribution dump (no 'logical_count' or "
                             f"'records' + 'last_physical_to_logical_map')")
        raw_map = as_array(obj["last_physical_to_logical_map"], f"{path}: last_physical_to_logical_map")
        records = obj["records"]
        if not isinstance(records, list):
            raise TraceError(f"{path}: 'records' should be a list, got {type(records).__name__}")
        p2l, n = check_map(np.atleast_2d(raw_map), np.atleast_2d(raw_map).shape[0], str(path), opts.num_experts)
        mapped |= p2l.shape[1] != n or any(not np.array_equal(r, np.arange(p2l.shape[1])) for r in p2l)
        batches: dict[int, Tables] = {}
        for i, rec in enumerate(records):
            where = f"{path} record {i}"
            if not isinstance(rec, dict) or "forward_pass_id" not in rec:
                raise TraceError(f"{where}: not a recorder record (no forward_pass_id)")
            rank, step = int(rec.get("rank", 0)), int(rec["forward_pass_id"])
            batch = batches.setdefault(rank, Tables(opts.tag, opts.layers))
            if "global_physical_count" in rec:
                modes.add("per_pass")
                phys = as_array(rec["global_physical_count"], where)  # [L, P]
                if phys.ndim != 2 or phys.shape[0] != p2l.shape[0] and p2l.shape[0] != 1:
                    raise TraceError(f"{where}: global_physical_count of shape {list(phys.shape)} does not fit "
                                     f"the map {list(p2l.shape)}")
                for layer in range(phys.shape[0]):
                    row = p2l[layer if p2l.shape[0] > 1 else 0]
                    batch.add_counts(step, layer, logical_counts(phys[layer], row, n, where), where, opts.top_k)
            elif "topk_ids_of_layer" in rec:
                modes.add("per_token")
                _per_token(rec, step, p2l, n, where, batch)
                held = first_rank.setdefault((step, _fingerprint(rec, where)), rank)
                if held != rank:
                    replicas[(rank, held)] = replicas.get((rank, held), 0) + 1
            else:
                raise TraceError(f"{where}: neither global_physical_count nor topk_ids_of_layer")
            progress.tick(f"{path}: record {i + 1}/{len(records)}")
            if batch.rows >= BATCH_ROWS:
                yield rank, batch
                batches[rank] = Tables(opts.tag, opts.layers)
        yield from batches.items()
    notes.append(f"SGLang recorder mode: {', '.join(sorted(modes))}")
    if "stat" in modes:
        notes.append("stat dumps: steps are the buffered passes in file order (a wrapped circular buffer is not "
                     "in time order); tokens per pass are not in the dump, only assignments")
    if empty[0]:
        notes.append(f"{empty[0]} buffered pass(es) with no assignments (unused buffer slots) left out")
    for (rank, held), count in sorted(replicas.items()):
        notes.append(f"rank {rank} routed the same tokens to the same experts as rank {held} in {count} forward "
                     f"pass(es): with tensor parallelism (no DP attention) every rank routes the same tokens, and "
                     f"the loads count them once per rank; import one rank's file to count each token once")
    if mapped:
        notes.append("physical expert slots summed onto logical experts with the dump's last "
                     "physical-to-logical map (a rebalance during recording is not in the dump)")


IMPORTER = Importer(
    name="sglang",
    producer="SGLang",
    reads="SGLang expert-distribution recorder dumps (expert_distribution_recorder_*.pt from "
    "/dump_expert_distribution_record): mode stat (logical_count [passes, layers, experts]: loads only), "
    "per_pass (records of global_physical_count, one file per rank) and per_token (records of "
    "topk_ids_of_layer with input_ids and positions: loads and per-token routing). Physical slots are summed "
    "onto logical experts through last_physical_to_logical_map; steps are forward_pass_id (stat: buffer rows).",
    read=read,
    options=("num_experts", "top_k"),
    patterns=("*.pt",),
)

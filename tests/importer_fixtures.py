"""Source files for `moescope import` tests, written the way each producer writes them.

- Megatron-Core runs here (CPU): `megatron_steps` builds a real `TopKRouter` per MoE layer with
  `moe_enable_routing_replay=True`, records with `RouterReplay`, and saves what the producer hands out. Two CPU
  shims, and only these: `torch.cuda.current_device` (TopKRouter.gating moves its weight to the current CUDA
  device) returns "cpu", and `moe_utils.te_general_gemm` is set to None (megatron-core 0.16 reads that
  Transformer-Engine name without defining it when TE is absent).
- SGLang and vLLM need CUDA: their dumps are built here from the producer's source, field by field; each builder
  names the file and function it follows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

# -- Megatron-Core (its own code, on CPU) -------------------------------------------------------------------------


@contextmanager
def megatron_cpu() -> Iterator[Any]:
    """Megatron-Core's router modules with the two CPU shims above, undone on exit."""
    import pytest

    pytest.importorskip("megatron.core")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        import megatron.core.transformer.moe.moe_utils as mu
        from megatron.core.transformer.moe import router as router_mod
        from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
        from megatron.core.transformer.transformer_config import TransformerConfig
    saved_dev = torch.cuda.current_device
    had_te = hasattr(mu, "te_general_gemm")
    saved_te = getattr(mu, "te_general_gemm", None)
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    mu.te_general_gemm = None
    try:
        yield SimpleNamespace(TopKRouter=router_mod.TopKRouter, RouterReplay=RouterReplay,
                              Action=RouterReplayAction, TransformerConfig=TransformerConfig)
    finally:
        torch.cuda.current_device = saved_dev  # type: ignore[assignment]
        if had_te:
            mu.te_general_gemm = saved_te
        else:
            del mu.te_general_gemm
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        RouterReplay.clear_global_router_replay_instances()


def megatron_steps(out: Path, *, steps: int = 3, layers: int = 2, seq: int = 6, batch: int = 2, hidden: int = 16,
                   experts: int = 8, topk: int = 2, capacity_factor: float | None = None, seed: int = 0,
                   save: str = "replay") -> list[list[dict[str, torch.Tensor]]]:
    """Run Megatron's TopKRouter for `steps` × `layers` and save one torch.save file per step into `out`.

    save="replay": RouterReplay.get_recorded_data() (list of [T, k] indices per layer);
    save="stacked": torch.stack(..., dim=1) as RoutingMetadata.get_routing_indices() returns ([T, L, k]);
    save="router": per layer TopKRouter.forward's (probs, routing_map).
    Returns per step, per layer what the router itself dispatched: {"routing_map", "probs", "indices"}.
    """
    out.mkdir(parents=True, exist_ok=True)
    truth: list[list[dict[str, torch.Tensor]]] = []
    with megatron_cpu() as mc:
        torch.manual_seed(seed)
        cfg = mc.TransformerConfig(
            num_layers=layers, hidden_size=hidden, num_attention_heads=2, num_moe_experts=experts,
            moe_router_topk=topk, moe_enable_routing_replay=True, moe_router_load_balancing_type="none",
            use_cpu_initialization=True, add_bias_linear=False, moe_expert_capacity_factor=capacity_factor,
            moe_token_drop_policy="probs")
        pg = SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)  # no parallel groups on one CPU
        routers = [mc.TopKRouter(cfg, pg_collection=pg) for _ in range(layers)]
        mc.RouterReplay.set_global_router_replay_action(mc.Action.RECORD)
        for step in range(steps):
            per_layer = []
            outputs = []
            for r in routers:
                x = torch.randn(seq, batch, hidden)  # Megatron is sequence-first: [S, B, H]
                with torch.no_grad():
                    probs, rmap = r(x)  # [S*B, E] each
                outputs.append((probs.clone(), rmap.clone()))
                per_layer.append({"probs": probs.clone(), "routing_map": rmap.clone()})
            recorded = mc.RouterReplay.get_recorded_data()  # list of [S*B, k]
            for d, idx in zip(per_layer, recorded):
                d["indices"] = idx.clone()
            if save == "replay":
                obj: Any = recorded
            elif save == "stacked":
                obj = torch.stack(recorded, dim=1)
            elif save == "router":
                obj = outputs
            else:
                raise ValueError(save)
            torch.save(obj, out / f"routing_step_{(step + 1) * 10:04d}.pt")
            truth.append(per_layer)
    return truth


# -- SGLang (built from python/sglang/srt/eplb/expert_distribution.py) ---------------------------------------------


def sglang_stat(path: Path, logical_count: np.ndarray, rank: int = 0) -> Path:
    """`_StatAccumulator.dump(output_mode="file")`: {rank, logical_count [S, L, E], average_utilization...}."""
    torch.save({"rank": rank, "logical_count": torch.as_tensor(logical_count, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, path)
    return path


def sglang_detail(path: Path, records: list[dict[str, Any]], physical_to_logical_map: np.ndarray) -> Path:
    """`_DetailAccumulator.dump`: {records: [...], last_physical_to_logical_map [L, P]}."""
    torch.save({"records": records,
                "last_physical_to_logical_map": torch.as_tensor(physical_to_logical_map, dtype=torch.int64)}, path)
    return path


def sglang_per_pass_record(forward_pass_id: int, rank: int, global_physical_count: np.ndarray) -> dict[str, Any]:
    """`_DetailAccumulator.append` of a `_SelectExpertsSinglePassGatherer.collect()` (mode per_pass)."""
    return {"forward_pass_id": forward_pass_id, "rank": rank, "gatherer_key": "primary",
            "global_physical_count": torch.as_tensor(global_physical_count, dtype=torch.int32)}


def sglang_per_token_record(forward_pass_id: int, rank: int, topk_ids: np.ndarray, input_ids: list[int],
                            positions: list[int], extend_seq_lens: list[int] | None) -> dict[str, Any]:
    """`_DetailAccumulator.append` of `_DetailSinglePassGatherer.collect()` (mode per_token).

    `topk_ids` [L, T, k] physical slot ids; the gatherer's buffer is [L, T, _TOP_K_NUM=8] reset to -1, and
    `on_select_experts` writes the first k columns, so columns k..7 stay -1 (and so do layers without a router).
    """
    num_layers, t, k = topk_ids.shape
    buf = torch.full((num_layers, t, 8), -1, dtype=torch.int32)
    buf[:, :, :k] = torch.as_tensor(topk_ids, dtype=torch.int32)
    return {"forward_pass_id": forward_pass_id, "rank": rank, "gatherer_key": "primary",
            "input_ids": list(input_ids), "positions": list(positions), "extend_seq_lens": extend_seq_lens,
            "forward_mode": 1, "topk_ids_of_layer": buf, "misc_objects": []}


# -- vLLM (built from vllm/outputs.py, fused_moe/routed_experts_capturer.py, distributed/eplb/eplb_state.py) -------


def vllm_routed(path: Path, routed_experts: np.ndarray) -> Path:
    """`CompletionOutput.routed_experts` [tokens, num_hidden_layers, top_k] uint16 (`_select_buffer_dtype`),
    saved with np.save; rows of layers without a router keep the capture buffer's zeros."""
    np.save(path, np.asarray(routed_experts, dtype=np.uint16))
    return path


def vllm_eplb(path: Path, expert_load_window: np.ndarray, physical_to_logical_map: np.ndarray,
              expert_load_window_step: int | None = None, expert_load_pass: np.ndarray | None = None) -> Path:
    """The `EplbModelState` fields a user saves: window [W, L, P] int32, map [L, P] (and the ring position)."""
    obj: dict[str, Any] = {"expert_load_window": torch.as_tensor(expert_load_window, dtype=torch.int32),
                           "physical_to_logical_map": torch.as_tensor(physical_to_logical_map, dtype=torch.int64)}
    if expert_load_window_step is not None:
        obj["expert_load_window_step"] = expert_load_window_step
    if expert_load_pass is not None:
        obj["expert_load_pass"] = torch.as_tensor(expert_load_pass, dtype=torch.int32)
    torch.save(obj, path)
    return path

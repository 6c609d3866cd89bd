"""A tiny transformers Mixtral and a planted collapse, shared by the alert and integration tests."""

from __future__ import annotations

from typing import Any

import pytest

from moescope.capture.specs import requirement_met

#: transformers 5 is installed: the v5 router modules exist (tests of v5-only layouts skip otherwise; the 4.x
#: families are tested by tests/integration/test_hf_v4_families.py in CI's transformers 4.57 environment)
TRANSFORMERS_V5 = requirement_met("transformers>=5")


def tiny_mixtral(seed: int = 0, top_k: int = 2) -> Any:
    """Two MoE layers, 4 experts, top-k: the smallest model with a known transformers router."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=top_k,
        vocab_size=100,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg)


def plant_collapse(model: Any) -> None:
    """Route every token of every layer to experts 0 and 1: a constant residual channel the routers read."""
    import torch

    with torch.no_grad():
        # Channel 0 of every embedding is large, so after RMSNorm it dominates each router's input.
        model.get_input_embeddings().weight[:, 0] += 50.0
        for mod in model.modules():
            # v5: the router module; 4.x: the sparse MoE block's gate Linear (same [E, H] weight)
            name = type(mod).__name__
            gate = mod if name == "MixtralTopKRouter" else mod.gate if name == "MixtralSparseMoeBlock" else None
            if gate is not None:
                gate.weight.zero_()
                gate.weight[:, 0] = torch.tensor([5.0, 5.0, -5.0, -5.0])


#: Shrinks any MoE family's config to a tiny one (8 experts, top-2): the test files apply each field where the
#: config class has it (transformers 5 in test_hf_families.py, 4.x in test_hf_v4_families.py).
TINY_MOE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,  # = heads: MLA families (DeepSeek) need it
    "head_dim": 8,
    "vocab_size": 128,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "max_position_embeddings": 64,
    "n_shared_experts": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def padded_batches(b: int, s: int) -> list[tuple[Any, Any]]:
    """Two (input_ids [b, s], attention_mask) batches: one with left and right padding (b ≥ 3), one without."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 100, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return [(x, mask), (torch.randint(3, 100, (b, s), generator=g), torch.ones(b, s, dtype=torch.long))]


def assert_aux_loss(load: Any, out: Any, step: int, n_layers: int, n_valid: int) -> None:
    """transformers' Mixtral-style aux loss (load_balancing_loss_func, masked) equals N·Σ_e f_e·P_e from the trace.

    transformers concatenates every layer's logits and takes per-expert means over all (layer, token) pairs, so
    f_e = Σ_l c_le / (L·T) (assignments per token, summing to k) and P_e = Σ_l prob_sum_le / (L·T).
    """
    import math

    lo = load[load.step == step].groupby("expert")[["tokens", "prob_sum"]].sum().sort_index()
    f = lo.tokens.to_numpy() / (n_layers * n_valid)
    p = lo.prob_sum.to_numpy() / (n_layers * n_valid)
    aux = len(lo) * float((f * p).sum())
    assert math.isclose(aux, float(out.aux_loss), rel_tol=1e-5), (aux, float(out.aux_loss))


#: The flight ring's sample in the family tests: the first 7 tokens (batch-first) of each step, padding included.
FLIGHT_ROWS = 7


def flight_layers(run: Any, inputs: list[Any]) -> Any:
    """The one flight dump of a two-step family recording, per layer: (its meta entry, {name: array [2, R, ...]})
    for x, ids, weights, logits, after checking that it holds both steps' first FLIGHT_ROWS rows and, as token ids,
    the first FLIGHT_ROWS of each step's `inputs` (input_ids [B, S])."""
    from moescope.analysis.explain import read_dump

    (path,) = (run / "flight").iterdir()
    d = read_dump(path)
    for info in d.meta["layers"]:
        layer = info["layer"]
        assert info["steps"] == [0, 1] and info["rows"] == 2 * FLIGHT_ROWS, (info["module"], info["steps"])
        tok = d.layer(layer, "token_ids").reshape(2, FLIGHT_ROWS)
        for step, x in enumerate(inputs):
            assert (tok[step] == x.reshape(-1)[:FLIGHT_ROWS].numpy()).all(), f"{info['module']}: token ids"
        yield info, {n: d.layer(layer, n).reshape(2, FLIGHT_ROWS, -1) for n in ("x", "ids", "weights", "logits")}

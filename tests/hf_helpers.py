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

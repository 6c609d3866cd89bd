"""`ids_fn` readers for transformers 4.x MoE blocks whose selection no named rule describes (hooks/transformers_v4.toml).

Each is called on the block's forward output ``(hidden, router_logits [T, E])`` and applies the block's own
selection to that same logits tensor, so the ids and weights are those the block dispatched:

- PhiMoE: transformers' own ``sparsemixer`` (imported from the model's module), eval mode only — in training it
  samples experts (Gumbel noise, random midpoint mask), which cannot be replayed, so the reader refuses.
- Ernie 4.5 MoE: top-k of softmax + the correction bias (the block's ``moe_statics``), weights = the unbiased
  probabilities of the selected experts over their sum clamped at ``norm_min``.
"""

from __future__ import annotations

from typing import Any

import torch

from .specs import AdapterError


def _logits(module: Any, output: Any) -> torch.Tensor:
    """The block's router logits [T, E] (second element of its output)."""
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)):
        raise AdapterError(f"{type(module).__name__}: expected the block output (hidden, router_logits [T, E])")
    return output[1].detach()


def phimoe_sparsemixer(module: Any, args: tuple[Any, ...], output: Any) -> tuple[Any, Any, Any]:
    """PhiMoE (4.x PhimoeSparseMoeBlock): (logits [T, E], ids [T, 2], weights [T, 2]) by transformers' sparsemixer."""
    if module.training:
        raise AdapterError(
            "phimoe: in training PhimoeSparseMoeBlock samples its experts (sparsemixer's Gumbel noise), which the "
            "trace cannot replay; record it in eval mode"
        )
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = _logits(module, output)  # [T, E]
    weights, ids = sparsemixer(logits, jitter_eps=module.router_jitter_noise, training=False)  # [T, 2] each
    return logits, ids, weights


def ernie_biased_topk(module: Any, args: tuple[Any, ...], output: Any) -> tuple[Any, Any, Any]:
    """Ernie 4.5 MoE (4.x Ernie4_5_MoeSparseMoeBlock): ids by biased top-k, weights renormalised unbiased probs."""
    logits = _logits(module, output).float()  # [T, E]
    probs = torch.softmax(logits, dim=1, dtype=torch.float)  # [T, E]
    with torch.no_grad():
        ids = torch.topk(module.moe_statics(probs), module.top_k, dim=-1).indices  # [T, k]
    w = probs.gather(-1, ids)  # [T, k]
    w = w / torch.clamp(w.sum(dim=-1, keepdim=True), min=module.norm_min)
    return logits, ids, w

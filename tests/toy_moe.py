"""A tiny MoE language model with a user-registered router, for capture tests that need no transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import moescope


class ToyRouter(nn.Module):
    """Softmax top-k router returning (logits [T, E], weights [T, k], ids [T, k])."""

    def __init__(self, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.proj = nn.Linear(hidden, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(x)  # [T, E]
        w, ids = torch.topk(torch.softmax(logits.float(), -1), self.top_k, -1)  # [T, k]
        return logits, w / w.sum(-1, keepdim=True), ids


class ToyBlock(nn.Module):
    def __init__(self, hidden: int, n_experts: int, top_k: int, dense: bool = False) -> None:
        super().__init__()
        self.router = ToyRouter(hidden, n_experts, top_k)
        self.experts = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_experts))
        self.dense = dense

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        x = h.reshape(-1, d)  # [T, H]
        _, w, ids = self.router(x)
        if self.dense:
            # Every expert on every token, gated by its (mostly zero) weight: no data-dependent shapes, so
            # torch.compile and CUDA graphs take the block whole.
            gates = x.new_zeros(x.shape[0], len(self.experts)).scatter(1, ids, w.to(x.dtype))  # [T, E]
            ys = torch.stack([expert(x) for expert in self.experts], 1)  # [T, E, H]
            return h + (gates[:, :, None] * ys).sum(1).reshape(b, s, d)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = (ids == e)  # [T, k]
            rows = sel.any(-1)
            if rows.any():
                out[rows] += (w * sel).sum(-1, keepdim=True)[rows].to(x.dtype) * expert(x[rows])
        return h + out.reshape(b, s, d)


class ToyMoE(nn.Module):
    """Embedding → n_layers MoE blocks → LM head."""

    def __init__(self, vocab: int = 64, hidden: int = 16, n_layers: int = 2, n_experts: int = 8, top_k: int = 2,
                 dense: bool = False, checkpoint: str | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(ToyBlock(hidden, n_experts, top_k, dense) for _ in range(n_layers))
        self.head = nn.Linear(hidden, vocab)
        self.checkpoint = checkpoint  # None, "reentrant" or "non_reentrant": torch.utils.checkpoint per block

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(input_ids)
        for blk in self.blocks:
            if self.checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=self.checkpoint == "reentrant")
            else:
                h = blk(h)
        return self.head(F.rms_norm(h, (h.shape[-1],)))


moescope.register_router(
    ToyRouter, source="output", logits=0, weights=1, ids=2, n_experts="n_experts", top_k="top_k", family="toy"
)

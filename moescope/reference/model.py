"""A small Mixtral-style Mixture-of-Experts decoder, in one file, in the spirit of nanoGPT.

RMSNorm → RoPE causal attention → RMSNorm → MoE block (top-k router + SwiGLU experts), repeated.
The router returns `(logits, weights, ids)` like transformers v5 `*TopKRouter` modules and the
experts hold fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` parameters like v5 fused experts,
so a tool that hooks transformers models hooks this one the same way.

Shape letters: B batch, S sequence, H d_model, T = B·S tokens, E experts, k top-k, I expert
intermediate size, V vocab, nh heads, hd head dim.

This file deliberately knows nothing about any diagnostics tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MoEConfig:
    """Every knob of the reference MoE; the defaults are a small but complete Mixtral-style model."""

    vocab_size: int = 256  # byte-level
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 256  # I, the SwiGLU intermediate size of one expert
    max_seq_len: int = 512  # only bounds the RoPE table; positions are computed on the fly
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    router_init_std: float = 0.02  # larger values start the router closer to a hard, lopsided assignment
    aux_loss_coef: float = 0.01  # Switch load-balancing loss N·Σ f_e P_e; 0 disables it
    z_loss_coef: float = 0.001  # router z-loss mean(logsumexp(logits)²); 0 disables it
    router_jitter: float = 0.0  # multiplicative noise on the router input while training (Switch)
    router_bias: bool = False  # a learned per-expert logit bias (GPT-OSS routers have one); shared by all tokens
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free balancing: a selection-only bias per expert
    bias_update_rate: float = 1e-3  # u in b_e += u·sign(mean load − load_e), applied by update_router_bias()
    dispatch: str = "sorted"  # "sorted" (contiguous slices / grouped mm) or "textbook" (boolean-mask loop)
    tie_embeddings: bool = True


@dataclass
class MoEOutput:
    """What MoEModel.forward returns (attribute names as transformers' causal-LM outputs)."""

    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None  # lm_loss + aux_loss_coef·aux_loss + z_loss_coef·z_loss (None without labels)
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # mean over MoE layers, 1.0 = perfectly balanced
    z_loss: torch.Tensor  # mean over MoE layers


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension by its root mean square."""
        # compute in float32: bf16 squares lose too much precision for the mean
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin tables [S, hd] for the given integer positions [S]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd], rotate-half layout (as Llama/Mixtral)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key pairs [B, nh, S, hd] by their position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.theta = cfg.rope_theta
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_offset: int) -> torch.Tensor:
        """Causal self-attention with rotary positions starting at `position_offset`."""
        B, S, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=-1)  # 3 × [B, S, H]
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, hd]
        k = k.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(position_offset, position_offset + S, device=x.device)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attention_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S] key padding
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()  # [S, S]
            # the diagonal stays visible so a padded query row never softmaxes over nothing (NaN)
            mask = (causal & keep) | torch.eye(S, dtype=torch.bool, device=x.device)  # [B, 1, S, S]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, S, H)  # [B, S, H]
        return self.o_proj(y)


class Router(nn.Module):
    """Top-k softmax router. forward(x [T, H]) -> (logits [T, E] fp32, weights [T, k], ids [T, k] int64)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.jitter = cfg.router_jitter
        self.use_bias = cfg.bias_balancing
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.logit_bias = nn.Parameter(torch.zeros(cfg.n_experts)) if cfg.router_bias else None
        # selection-only bias (DeepSeek-V3's e_score_correction_bias): a buffer, so no gradient and no
        # optimizer ever touches it; update_router_bias() moves it from the observed load
        self.register_buffer("bias", torch.zeros(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens: router logits, the gate weights applied, and the selected expert ids."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        # the router runs in float32 even under bf16 autocast: a bf16 softmax over E logits is where
        # "95% of traffic to one expert" precision bugs come from
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.logit_bias is None else self.logit_bias.float()
            logits = F.linear(x.float(), self.weight.float(), bias)  # [T, E]
        probs = logits.softmax(dim=-1)  # [T, E]
        scores = logits + self.bias if self.use_bias else logits  # bias steers selection only
        ids = torch.topk(scores, self.top_k, dim=-1).indices  # [T, k] int64
        weights = probs.gather(-1, ids)  # [T, k]
        # renormalising the gathered probs equals a softmax over the selected logits
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, ids


class Experts(nn.Module):
    """E SwiGLU experts with fused parameters gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.d_expert = cfg.d_expert
        self.dispatch = cfg.dispatch  # "sorted" or "textbook"
        # same layout as transformers v5 fused experts: gate rows first, then up rows
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_expert, cfg.d_model))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_expert))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert `e` on its tokens x [n, H] -> [n, H]."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # 2 × [n, I]
        return F.linear(F.silu(gate) * up, self.down_proj[e])  # [n, H]

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids/weights [T, k] (transformers v5 argument order) -> weighted sum of expert outputs [T, H]."""
        if self.dispatch == "textbook":
            return textbook_dispatch(self, x, top_k_weights, top_k_index)
        return sorted_dispatch(self, x, top_k_weights, top_k_index)


def _use_grouped_mm(x: torch.Tensor) -> bool:
    # torch._grouped_mm wants CUDA, bf16 and Hopper-class tensor cores; everything else takes the loop
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


def sorted_dispatch(experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sort token-slots by expert, run each expert on one contiguous slice, scatter back weighted."""
    T, H = x.shape
    k = ids.shape[1]
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    flat_ids = ids.reshape(-1)  # [T·k]
    order = torch.argsort(flat_ids, stable=True)  # [T·k] slot indices grouped by expert
    token_of_slot = order // k  # [T·k] the token each sorted slot came from
    counts = torch.bincount(flat_ids, minlength=experts.n_experts)  # [E]
    xs = x[token_of_slot]  # [T·k, H], expert e's tokens are rows offs[e-1]:offs[e]
    if _use_grouped_mm(xs):
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end offset of each group
        gate_up = experts.gate_up_proj.to(xs.dtype).transpose(1, 2)  # [E, H, 2I]
        gate, up = torch._grouped_mm(xs, gate_up, offs=offs).chunk(2, dim=-1)  # 2 × [T·k, I]
        down = experts.down_proj.to(xs.dtype).transpose(1, 2)  # [E, I, H]
        ys = torch._grouped_mm(F.silu(gate) * up, down, offs=offs)  # [T·k, H]
    else:
        # one host sync for the split sizes, then E small dense matmul chains over contiguous rows.
        # unbind once: indexing gate_up_proj[e] per expert would make autograd allocate a full
        # [E, 2I, H] zero gradient per expert (O(E²) memory traffic in backward)
        gate_up_w, down_w = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
        ys_list = []
        for e, xe in enumerate(xs.split(counts.tolist(), dim=0)):
            if xe.shape[0] == 0:
                continue
            gate, up = F.linear(xe, gate_up_w[e]).chunk(2, dim=-1)  # 2 × [n_e, I]
            ys_list.append(F.linear(F.silu(gate) * up, down_w[e]))  # [n_e, H]
        ys = torch.cat(ys_list, dim=0)  # [T·k, H]
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)  # [T·k, H] gate-weighted
    out = torch.zeros(T, H, dtype=ys.dtype, device=x.device)
    return out.index_add_(0, token_of_slot, ys)  # [T, H], sums each token's k slots


def textbook_dispatch(experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The per-expert boolean-mask loop of the textbooks (and transformers v4 Mixtral), for reference."""
    T, H = x.shape
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    out = torch.zeros(T, H, dtype=x.dtype, device=x.device)
    expert_mask = F.one_hot(ids, experts.n_experts).permute(2, 1, 0)  # [E, k, T]
    for e in range(experts.n_experts):
        slot, tok = torch.where(expert_mask[e])  # every expert scans every token
        if tok.numel() == 0:
            continue
        y = experts.expert_forward(e, x[tok]) * weights[tok, slot, None].to(x.dtype)  # [n, H]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


class MoEBlock(nn.Module):
    """Router + experts; also computes the load-balancing and z losses of this layer."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        # assignments per expert since the last bias update (for aux-loss-free balancing)
        self.register_buffer("load", torch.zeros(cfg.n_experts), persistent=False)

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (y [B, S, H], aux_loss, z_loss); token_mask [B, S] excludes padding from the losses."""
        B, S, H = x.shape
        flat = x.reshape(B * S, H)  # [T, H]
        logits, weights, ids = self.router(flat)
        y = self.experts(flat, ids, weights)  # a module call, so hooks on the experts see (x, ids, weights)
        keep = None if token_mask is None else token_mask.reshape(-1).bool()  # [T]
        aux, z = balance_losses(logits, ids, self.n_experts, keep)
        if self.training:
            with torch.no_grad():
                sel = ids if keep is None else ids[keep]
                self.load += torch.bincount(sel.reshape(-1), minlength=self.n_experts).to(self.load.dtype)
        return y.view(B, S, H).to(x.dtype), aux, z


def balance_losses(
    logits: torch.Tensor, ids: torch.Tensor, n_experts: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch aux loss N·Σ f_e P_e (f_e = share of assignments, P_e = mean prob) and z-loss mean(lse²)."""
    if keep is not None:
        logits, ids = logits[keep], ids[keep]
    logits = logits.float()
    probs = logits.softmax(-1)  # [T, E]
    counts = torch.bincount(ids.reshape(-1), minlength=n_experts).float()  # [E], not differentiable
    f = counts / max(ids.numel(), 1)  # [E] fraction of the T·k assignments
    P = probs.mean(0)  # [E] gradient flows through here
    aux = n_experts * (f * P).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return aux, z


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoEBlock(cfg)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_offset: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (x [B, S, H], aux_loss, z_loss)."""
        x = x + self.attn(self.attn_norm(x), attention_mask, position_offset)
        y, aux, z = self.moe(self.moe_norm(x), attention_mask)
        return x + y, aux, z


class MoEModel(nn.Module):
    """Decoder-only MoE language model over bytes."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std), residual projections scaled by 1/sqrt(2·n_layers)."""
        cfg = self.config
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("router.logit_bias"):
                nn.init.zeros_(p)
            elif name.endswith("router.weight"):
                nn.init.normal_(p, std=cfg.router_init_std)
            elif name.endswith(("o_proj.weight", "down_proj")):
                nn.init.normal_(p, std=resid_std)
            else:
                nn.init.normal_(p, std=cfg.init_std)

    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE block of every layer, in order."""
        return [layer.moe for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_offset: int = 0,
    ) -> MoEOutput:
        """input_ids [B, S] (+ mask [B, S], labels [B, S] shifted inside, -100 ignored) -> MoEOutput."""
        cfg = self.config
        x = self.embed(input_ids)  # [B, S, H]
        aux_total = x.new_zeros((), dtype=torch.float32)
        z_total = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, aux, z = layer(x, attention_mask, position_offset)
            aux_total = aux_total + aux
            z_total = z_total + z
        logits = self.lm_head(self.norm(x))  # [B, S, V]
        aux_loss = aux_total / cfg.n_layers
        z_loss = z_total / cfg.n_layers
        loss = lm_loss = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask.bool(), -100)
            # predict token t+1 from positions ≤ t
            lm_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, cfg.vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            loss = lm_loss
            if cfg.aux_loss_coef:
                loss = loss + cfg.aux_loss_coef * aux_loss
            if cfg.z_loss_coef:
                loss = loss + cfg.z_loss_coef * z_loss
        return MoEOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss)

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Aux-loss-free balancing step (call after optimizer.step()): raise the bias of underloaded experts."""
        if not self.config.bias_balancing:
            return
        for block in self.moe_blocks():
            load = block.load
            if load.sum() > 0:
                block.router.bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
            load.zero_()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0) -> torch.Tensor:
        """Sample continuations [B, S + max_new_tokens] (no KV cache: each step re-reads the window)."""
        for _ in range(max_new_tokens):
            window = input_ids[:, -self.config.max_seq_len :]
            logits = self(window).logits[:, -1, :] / max(temperature, 1e-5)  # [B, V]
            nxt = torch.multinomial(logits.float().softmax(-1), 1)  # [B, 1]
            input_ids = torch.cat([input_ids, nxt], dim=1)
        return input_ids


def upcycle(dense: MoEModel, n_experts: int, top_k: int, noise: float = 0.01, seed: int = 0) -> MoEModel:
    """Sparse upcycling: a new MoE whose experts are copies of a 1-expert model's FFN plus small noise."""
    if dense.config.n_experts != 1:
        raise ValueError("upcycle() expects a dense model (n_experts=1)")
    cfg = MoEConfig(**{**dense.config.__dict__, "n_experts": n_experts, "top_k": top_k})
    moe = MoEModel(cfg).to(next(dense.parameters()).device)
    src = dense.state_dict()
    dst = moe.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in dst.items():
            if name.endswith(("gate_up_proj", "down_proj")):
                base = src[name][0]  # [2I, H] or [H, I], the one dense FFN
                # noise relative to the weight scale, so experts start as near-clones that can diverge
                eps = torch.randn((n_experts, *base.shape), generator=gen).to(base) * noise * base.std()
                t.copy_(base.expand(n_experts, *base.shape) + eps)
            elif ".router." in name:
                continue  # a fresh router: the dense model had nothing to route
            else:
                t.copy_(src[name])
    return moe

"""Spectral snapshots of MoE experts: per-expert singular spectra and expert × expert similarity.

`snapshot_experts(model, run_dir, step)` finds every MoE layer of a live model, computes on the device where
the weights live (only the small results reach the host) and appends to the run's `expert_spectra` and
`expert_similarity` tables. `snapshot_state_dict(path, run_dir, step)` does the weight-based part from a saved
checkpoint with numpy only. Metric definitions and chance levels: `moescope.spectral_offline`; in short

- ``subspace_overlap``: ||V_aᵀV_b||²_F / r of the top-r right (input-side) singular subspaces, chance r/d;
- ``subspace_overlap_centered``: the same on each expert's deviation from the mean expert (fair to upcycled
  experts, which share one dense FFN);
- ``cka``: linear CKA (debiased estimator by default) of the experts' outputs on a probe batch (seeded Gaussian
  inputs by default).

Expert layouts are recognised without hard-coded paths: a module holding fused 3-D ``gate_up_proj``/
``down_proj`` parameters (transformers v5, the bundled reference model; GPT-OSS/Llama 4 transposed, GPT-OSS
interleaved), a non-gated fused ``up_proj``/``down_proj`` pair, DBRX's 2-D ``w1``/``v1``/``w2``, or an
``nn.ModuleList`` of MLP modules (transformers v4 Mixtral ``w1, w2, w3``; ``gate_proj/up_proj/down_proj``).

torch is imported lazily, so `snapshot_state_dict` on safetensors works without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .spectral_maths import (
    ALL_METRICS,
    MLP_NAMES,
    WEIGHT_METRICS,
    Backend,
    ExpertWeights,
    SpectralError,
    assign_layer_numbers,
    canonical_down,
    canonical_in,
    chance_overlap,
    chunk_size,
    fused_transposed,
    similarity_frame,
    snapshot_state_dict,
    spectra_frame,
    split_gate_up,
    weight_metrics,
    write_snapshot,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "ALL_METRICS",
    "ExpertLayer",
    "SpectralError",
    "chance_overlap",
    "cka_matrix",
    "find_expert_layers",
    "linear_cka",
    "snapshot_experts",
    "snapshot_state_dict",
]


@dataclass
class ExpertLayer:
    """One MoE layer's experts as found in a model, with a float32 canonical loader."""

    path: str  # module path of the module holding the experts
    module: nn.Module
    kind: str  # "fused", "dbrx" or "list"
    n_experts: int
    hidden: int
    gated: bool
    transposed: bool = False
    interleaved: bool = False
    layer: int = 0
    top_k: int | None = None

    def load(self, e0: int, e1: int) -> ExpertWeights:
        """Experts e0..e1-1 in canonical float32 form, on the weights' device (no host copy)."""
        m = self.module
        if self.kind == "fused":
            raw_in = m.gate_up_proj if self.gated else m.up_proj
            w_in = canonical_in(raw_in[e0:e1].float(), self.transposed)  # [c, 2I, H]
            down = canonical_down(m.down_proj[e0:e1].float(), self.transposed)  # [c, H, I]
            gate, up = split_gate_up(w_in, self.interleaved) if self.gated else (None, w_in)
            b_name = "gate_up_proj_bias" if self.gated else "up_proj_bias"
            b_in = _param(m, b_name)
            b_down = _param(m, "down_proj_bias")
            return ExpertWeights(
                w_in,
                gate,
                up,
                down,
                None if b_in is None else b_in[e0:e1].float(),  # [c, 2I]
                None if b_down is None else b_down[e0:e1].float(),  # [c, H]
            )
        import torch

        if self.kind == "dbrx":
            inter = m.w1.shape[0] // self.n_experts
            gate = m.w1.view(self.n_experts, inter, self.hidden)[e0:e1].float()  # [c, I, H]
            up = m.v1.view(self.n_experts, inter, self.hidden)[e0:e1].float()  # [c, I, H]
            down = m.w2.view(self.n_experts, inter, self.hidden)[e0:e1].float().swapaxes(1, 2)  # [c, H, I]
            return ExpertWeights(torch.cat([gate, up], dim=1), gate, up, down)
        g_name, u_name, d_name = _mlp_names(m[0])  # type: ignore[index]
        experts = [m[e] for e in range(e0, e1)]  # type: ignore[index]
        up = torch.stack([getattr(x, u_name).weight.float() for x in experts])  # [c, I, H]
        down = torch.stack([getattr(x, d_name).weight.float() for x in experts])  # [c, H, I]
        bu = [getattr(getattr(x, u_name), "bias", None) for x in experts]
        bd = [getattr(getattr(x, d_name), "bias", None) for x in experts]
        b_down = torch.stack([b.float() for b in bd]) if all(b is not None for b in bd) else None  # [c, H]
        if g_name is None:
            b_in = torch.stack([b.float() for b in bu]) if all(b is not None for b in bu) else None
            return ExpertWeights(up, None, up, down, b_in, b_down)
        gate = torch.stack([getattr(x, g_name).weight.float() for x in experts])  # [c, I, H]
        bg = [getattr(getattr(x, g_name), "bias", None) for x in experts]
        b_in = None
        if all(b is not None for b in bg + bu):
            b_in = torch.cat([torch.stack([b.float() for b in bg]), torch.stack([b.float() for b in bu])], dim=1)
        return ExpertWeights(torch.cat([gate, up], dim=1), gate, up, down, b_in, b_down)

    def outputs(self, x: torch.Tensor, e0: int, e1: int) -> torch.Tensor:
        """Outputs of experts e0..e1-1 on probe x [n, H] → [c, n, H], float32."""
        import torch

        if self.kind == "list" and _act_of(self.module[0]) is None:  # type: ignore[index]
            # an MLP whose activation we cannot see: run its own forward, in its own dtype
            dt = next(self.module.parameters()).dtype
            return torch.stack([self.module[e](x.to(dt)).float() for e in range(e0, e1)])  # type: ignore[index]
        w = self.load(e0, e1)
        h = torch.einsum("nh,cmh->cnm", x, w.w_in)  # [c, n, 2I] (or [c, n, I] non-gated), storage order
        if w.b_in is not None:
            h = h + w.b_in[:, None, :]
        a = self._activate(h)  # [c, n, I]
        y = torch.einsum("cni,chi->cnh", a, w.down)  # [c, n, H]
        if w.b_down is not None:
            y = y + w.b_down[:, None, :]
        if getattr(self.module, "has_post_expert_norm", False) and hasattr(self.module, "post_expert_norm"):
            y = self.module.post_expert_norm(y).float()
        return y

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        """The expert's own gating on the storage-order up-projection h [c, n, 2I] → [c, n, I]."""
        import torch.nn.functional as F

        m = self.module
        if self.kind == "list":
            act = _act_of(m[0]) or F.silu  # type: ignore[index]
        elif self.kind == "dbrx":
            act = _act_of(m) or F.silu
        else:
            if self.gated and hasattr(m, "_apply_gate"):
                # transformers v5 experts gate here (GPT-OSS: clamped, alpha-scaled, interleaved)
                return m._apply_gate(h)
            act = _act_of(m) or F.silu  # the reference model's experts use SiLU and hold no act module
        if not self.gated:
            return act(h)
        g, u = split_gate_up(h.swapaxes(1, 2), self.interleaved)  # split along the 2I axis
        return (act(g) * u).swapaxes(1, 2)


def _param(m: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(m, name, None)
    return p if p is not None and hasattr(p, "shape") else None


def _act_of(m: Any) -> Callable[[Any], Any] | None:
    for name in ("act_fn", "activation_fn", "act", "activation"):
        f = getattr(m, name, None)
        if callable(f):
            return f
    return None


def _mlp_names(m: nn.Module) -> tuple[str | None, str, str]:
    """The (gate, up, down) Linear names of an expert MLP module; raises when it has none.

    An expert holds its projections and nothing else with parameters; a decoder layer holding fc1/fc2 next to
    its attention is not an expert.
    """
    holders = {n for n, c in m.named_children() if any(True for _ in c.parameters())}
    for g, u, d in MLP_NAMES:
        names = [n for n in (g, u, d) if n is not None]
        if all(_is_linear(getattr(m, n, None)) for n in names) and holders <= set(names):
            if not any(True for _ in m.parameters(recurse=False)):
                return g, u, d
    raise SpectralError(f"{type(m).__name__}: not an expert MLP")


_FLOATS = ("float32", "float16", "bfloat16", "float64")


def _is_linear(m: Any) -> bool:
    w = getattr(m, "weight", None)
    return w is not None and getattr(w, "ndim", 0) == 2


def _check_dtype(path: str, t: Any) -> None:
    """Refuse quantized expert storage: its raw values are not the weights (int packs, FP8 with scales)."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in _FLOATS:
        raise SpectralError(f"{path}: expert weights are {name}; only float experts are supported (dequantize first)")


def _expert_layer(path: str, m: nn.Module) -> ExpertLayer | None:
    """An ExpertLayer when `m` holds experts in a known layout, else None."""
    from torch import nn

    own = dict(m.named_parameters(recurse=False))
    gu, up, down = own.get("gate_up_proj"), own.get("up_proj"), own.get("down_proj")
    if down is not None and down.ndim == 3 and (gu is not None and gu.ndim == 3 or up is not None and up.ndim == 3):
        gated = gu is not None and gu.ndim == 3
        w_in = gu if gated else up
        assert w_in is not None
        tr = getattr(m, "is_transposed", None)  # transformers v5 experts say so; others by shape
        tr = bool(tr) if tr is not None else fused_transposed(w_in.shape, down.shape, gated)
        hidden = w_in.shape[1] if tr else w_in.shape[2]
        conc = getattr(m, "is_concatenated", None)  # transformers v5 says so (GPT-OSS: False)
        # transformers 4.x GPT-OSS experts carry no flag and interleave gate/up columns (gate_up[..., ::2])
        inter = not bool(conc) if conc is not None else type(m).__name__ == "GptOssExperts"
        return ExpertLayer(path, m, "fused", int(w_in.shape[0]), int(hidden), gated, tr, inter and gated)
    w1, v1, w2 = own.get("w1"), own.get("v1"), own.get("w2")
    n = getattr(m, "moe_num_experts", None) or getattr(m, "num_experts", None)
    if all(p is not None and p.ndim == 2 for p in (w1, v1, w2)) and isinstance(n, int) and n > 0:
        assert w1 is not None
        if w1.shape[0] % n == 0 and w1.shape == v1.shape == w2.shape:  # type: ignore[union-attr]
            return ExpertLayer(path, m, "dbrx", n, int(w1.shape[1]), True)  # DBRX: [E·I, H] each
    if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
        try:
            g, u, d = _mlp_names(m[0])
        except SpectralError:
            return None
        hidden = int(getattr(m[0], u).weight.shape[1])
        return ExpertLayer(path, m, "list", len(m), hidden, g is not None)
    return None


def _top_k(model: nn.Module, path: str) -> int | None:
    """Best-effort top-k of the MoE block that owns the experts at `path` (for the manifest)."""
    parts = path.split(".")
    owners = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, 0, -1)]  # nearest first
    for obj in owners + [getattr(model, "config", None)]:
        for cand in (obj, getattr(obj, "router", None), getattr(obj, "gate", None)):
            for name in ("top_k", "num_experts_per_tok", "moe_top_k"):
                v = getattr(cand, name, None) if cand is not None else None
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
    return None


def find_expert_layers(model: nn.Module, run_dir: str | Path | None = None) -> list[ExpertLayer]:
    """Every MoE layer of `model` in module order, found by how experts are stored (no hard-coded paths).

    Layers are numbered 0, 1, … in module order like the recorder's, or as the manifest in `run_dir` numbers
    their experts modules.
    """
    found: list[ExpertLayer] = []
    skip: tuple[str, ...] = ()
    for path, m in model.named_modules():
        if skip and path.startswith(skip):
            continue  # the MLPs inside an expert list are not layers of their own
        ly = _expert_layer(path, m)
        if ly is not None:
            _check_dtype(path, next(ly.module.parameters()))
            ly.top_k = _top_k(model, path)
            found.append(ly)
            skip = (*skip, path + ".")
    for ly, num in zip(found, assign_layer_numbers([ly.path for ly in found], run_dir)):
        ly.layer = num
    return found


# ----------------------------------------------------------------------------------------------- CKA


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = True) -> float:
    """Linear CKA of two representations of the same n inputs, x [n, p], y [n, q] (debiased by default)."""
    return float(cka_matrix([x, y], debiased)[0, 1])


def cka_matrix(outputs: Sequence[torch.Tensor] | torch.Tensor, debiased: bool = True) -> np.ndarray:
    """Pairwise linear CKA of E representations [E, n, d] → [E, E] (float64 on the host)."""
    import torch

    with torch.no_grad():
        kf = torch.stack([_gram_flat(o.detach(), debiased) for o in outputs])  # [E, n²]
        return (kf @ kf.T).cpu().numpy()


def _gram_flat(y: torch.Tensor, debiased: bool = True) -> torch.Tensor:
    """Centered, Frobenius-normalised linear kernel of y [n, d], flattened → [n²].

    The plain estimator (HSIC with the centered kernel) is biased upwards when the feature dimension is large
    next to n: unrelated random experts with H = I = 1024 score 0.67 on 256 probe tokens, near the 0.8 clone
    threshold. The debiased estimator U-centers the kernel instead (an unbiased HSIC estimate; Song et al.
    2012, as in Kornblith et al. 2019's reference code), which puts unrelated representations near 0 at any n.
    Both are invariant to isotropic scaling and orthogonal transforms of y.
    """
    import torch

    # float64 for the n × n kernels where the device has it (MPS does not)
    y = y.to(torch.float32 if y.device.type == "mps" else torch.float64)
    yc = y - y.mean(dim=0, keepdim=True)  # [n, d]
    k = yc @ yc.T  # [n, n] linear kernel, already centered
    if debiased:
        n = k.shape[0]
        if n < 4:
            raise SpectralError(f"debiased CKA needs at least 4 probe tokens, got {n}")
        k.fill_diagonal_(0.0)
        means = k.sum(dim=0) / (n - 2)  # [n]
        means = means - means.sum() / (2 * (n - 1))
        k = k - means[:, None] - means[None, :]  # U-centering
        k.fill_diagonal_(0.0)
    return k.reshape(-1) / k.norm().clamp_min(1e-300)  # ⟨K_a, K_b⟩ / (‖K_a‖‖K_b‖) is then a dot product


# ----------------------------------------------------------------------------------------------- driver


def _torch_backend() -> Backend:
    import torch

    def top_right(w: torch.Tensor, r: int) -> torch.Tensor:
        return torch.linalg.svd(w, full_matrices=False).Vh[:, :r]  # [c, r, H]

    return Backend(
        svdvals=torch.linalg.svdvals,  # [c, min(m, n)], descending
        top_right=top_right,
        cat=lambda xs: torch.cat(xs, dim=0),
        to_numpy=lambda t: t.detach().cpu().numpy(),
    )


def _probe_for(probe: Any, ly: ExpertLayer, probe_tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """The probe batch for one layer: x [n, H] float32 on the weights' device."""
    import torch

    x = probe
    if isinstance(probe, Mapping):
        x = probe.get(ly.layer, probe.get(ly.path))
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        # generated on the CPU so the numbers do not depend on the device; [n, H] is small to move
        return torch.randn(probe_tokens, ly.hidden, generator=gen).to(device)
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [n, H]
    if x.shape[-1] != ly.hidden:
        raise SpectralError(f"probe hidden size {x.shape[-1]} != layer {ly.layer} hidden size {ly.hidden}")
    if x.shape[0] > probe_tokens:  # a seeded subset bounds the [E, n, n] kernels
        keep = torch.randperm(x.shape[0], generator=gen)[:probe_tokens].sort().values
        x = x[keep.to(x.device)]
    return x.to(device)


def _dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def snapshot_experts(
    model: nn.Module,
    path: str | Path,
    step: int = 0,
    rank_r: int = 8,
    probe: torch.Tensor | Mapping[Any, torch.Tensor] | None = None,
    probe_tokens: int = 256,
    metrics: Sequence[str] = ALL_METRICS,
    spectra: bool = True,
    max_sigma: int | None = None,
    seed: int = 0,
    cka_debiased: bool = True,
) -> pd.DataFrame:
    """Write expert spectra and pairwise similarity of every MoE layer of `model` to the run directory `path`.

    Computed under no_grad in float32 on the device holding each layer's weights, a few experts at a time;
    only spectra and [E, E] matrices reach the host. `probe` (hidden states [..., H], or a mapping from layer
    number or module path to them) replaces the default seeded Gaussian probe for CKA; at most `probe_tokens`
    rows are used. `cka_debiased` (default) uses the debiased CKA estimator, near 0 for unrelated experts at
    any hidden size; the plain one drifts towards 1 as the expert width grows past the probe size.
    `max_sigma` keeps the largest singular values only. Returns the similarity rows written;
    ``.attrs["chance"]`` maps layer → r/d, the subspace_overlap of unrelated experts.

    Replicated models (DDP) give every rank the same numbers: call it on one rank. Under expert parallelism
    each rank sees only its local experts, and pairs are formed among those (local expert ids).
    """
    import torch

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = sorted(set(metrics) - set(ALL_METRICS))
    if bad:
        raise SpectralError(f"unknown metric(s) {bad}; known: {list(ALL_METRICS)}")
    if rank_r < 1 or probe_tokens < 4:
        raise SpectralError(f"rank_r must be >= 1 and probe_tokens >= 4 (got {rank_r}, {probe_tokens})")
    layers = find_expert_layers(model, path)
    if not layers:
        raise SpectralError(
            f"{type(model).__name__}: no MoE experts found (fused gate_up_proj/down_proj or expert lists)"
        )
    rank = _dist_rank()
    run = Path(path).name
    be = _torch_backend()
    sims, specs, info, chance = [], [], [], {}
    with torch.no_grad():
        for ly in layers:
            first = ly.load(0, 1)
            per_expert = int(first.w_in[0].numel() + first.down[0].numel())
            chunk = chunk_size(ly.n_experts, per_expert)
            weight_part = [m for m in metrics if m in WEIGHT_METRICS]
            res = weight_metrics(ly.load, ly.n_experts, chunk, be, rank_r, weight_part, spectra, max_sigma)
            if "cka" in metrics and ly.n_experts >= 2:
                x = _probe_for(probe, ly, probe_tokens, seed, first.w_in.device)  # [n, H]
                # flattened kernels [E, n²] are kept, not the outputs [E, n, H]
                kf = torch.cat(
                    [
                        torch.stack(
                            [_gram_flat(y, cka_debiased) for y in ly.outputs(x, e0, min(ly.n_experts, e0 + chunk))]
                        )
                        for e0 in range(0, ly.n_experts, chunk)
                    ]
                )
                res.similarity["cka"] = (kf @ kf.T).cpu().numpy()
            res.similarity = {m: res.similarity[m] for m in metrics if m in res.similarity}
            sims.append(similarity_frame(run, rank, step, ly.layer, res.similarity))
            specs.append(spectra_frame(run, rank, step, ly.layer, res.spectra))
            chance[ly.layer] = chance_overlap(res.rank_r, res.hidden)
            info.append(
                {
                    "layer": ly.layer,
                    "module": ly.path,
                    "n_experts": ly.n_experts,
                    "top_k": ly.top_k,
                    "router_kind": None,
                }
            )
    sim = pd.concat(sims, ignore_index=True)
    spec = pd.concat(specs, ignore_index=True)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {"model": {"class": type(model).__name__, "n_params": int(n_params)}, "layers": info}
    write_snapshot(path, rank, sim, spec, manifest)
    sim.attrs["chance"] = chance
    return sim

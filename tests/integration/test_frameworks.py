"""Recording MoE frameworks beyond transformers: the trace must hold exactly what each framework's router dispatched.

Each case builds a tiny random-init CPU model around one framework's own MoE layer or router (hooks/frameworks.toml):
DeepSpeed ``TopKGate`` (inside ``deepspeed.moe.layer.MoE``, top-1/2/3, with and without token dropping),
Megatron-Core ``TopKRouter`` (sequence-first, softmax with capacity dropping, sigmoid with an expert bias),
torchtitan's ``MoE`` (its ``TokenChoiceTopKRouter`` with softmax and sigmoid scoring and a load-balancing bias),
lucidrains' ``mixture-of-experts`` and ``st-moe-pytorch`` (GShard dispatch/combine with a capacity axis). A token-id
model wraps the layers so the recorder sees a [B, S] batch; two forwards are recorded, the first with left and
right padding. Ground truth comes from this test's own forward hooks on the router modules, turned into
batch-first rows by this test's code: per token, the experts it was dispatched to, their weights, the routes that
were not dispatched. The trace is read back with pyarrow and must match per token (routing rows), per expert
(``expert_load.tokens`` and ``weight_sum``), per layer (``router_stats.tokens`` and ``dropped``) and, where the
spec reads the router's probabilities, ``prob_sum``, entropy and margin (and the z-loss numerator where it reads the
real logits); where it reads none, ``prob_sum`` must be absent, not invented.

Shims (only where a framework cannot run as installed on a CPU-only torch, each applied for the test only):
Megatron-Core moves the router weights to ``torch.cuda.current_device()`` at every call and creates its expert-bias
buffers there, so that one call returns the CPU device here; and megatron-core 0.15/0.16 reference
``te_general_gemm`` without defining it when Transformer Engine is absent (a NameError at the router's first call),
so the test sets the module attribute to ``None`` (the value its fallback branch means).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import moescope  # noqa: E402

nn = torch.nn

B, S, V, D = 3, 8, 64, 16  # batch, sequence length, vocabulary, model width of every tiny model


# -- the token-id wrapper and the batches ------------------------------------------------------------------------


class TinyLM(nn.Module):
    """Token ids [B, S] → embedding → residual MoE blocks: the entry module the recorder reads the batch from."""

    def __init__(self, blocks: list[nn.Module], seq_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(blocks)
        self.seq_first = seq_first  # Megatron's layers take [S, B, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after every block ([B, S, D], or [S, B, D] for a sequence-first model)."""
        h = self.emb(input_ids)  # [B, S, D]
        if self.seq_first:
            h = h.transpose(0, 1).contiguous()  # [S, B, D]
        for blk in self.blocks:
            h = h + blk(h)
        return h


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of the two recorded forwards: left- and right-padded, then unpadded."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return [
        (torch.randint(0, V, (B, S), generator=g), mask),
        (torch.randint(0, V, (B, S), generator=g), torch.ones(B, S, dtype=torch.long)),
    ]


# -- ground truth ------------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One router call as the framework dispatched it, tokens in batch-first order (b * S + s)."""

    ids: torch.Tensor  # [T, k] long: the experts the token was dispatched to, -1 for a route not dispatched
    weights: torch.Tensor  # [T, k] float32: the combine weight of each dispatched route (0 where ids is -1)
    probs: torch.Tensor | None = None  # [T, E] the router's probabilities, where the spec reads them
    logits: torch.Tensor | None = None  # [T, E] the router's logits, where the spec reads them (st-moe)


def _pad_rows(mask: torch.Tensor, dense_w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] dispatched mask and weights → ids [T, k] (-1 padded) and weights [T, k], with a plain loop."""
    ids = torch.full((mask.shape[0], k), -1, dtype=torch.long)
    w = torch.zeros(mask.shape[0], k)
    for t in range(mask.shape[0]):
        experts = mask[t].nonzero().flatten().tolist()
        assert len(experts) <= k, f"token {t} dispatched to {len(experts)} experts > k={k}"
        for j, e in enumerate(experts):
            ids[t, j] = e
            w[t, j] = dense_w[t, e]
    return ids, w


def truth_deepspeed(mod: Any, args: Any, out: Any, extra: dict[str, Any]) -> Call:
    """TopKGate with sparse_routes (as MOELayer calls it): indices/gates [k, T], -1 = dropped over capacity."""
    assert len(out) == 7, "MOELayer's gate call returns the sparse-routes 7-tuple"
    _, capacity, n_exp, idx, _, gates, exp_counts = out
    ids, w = idx.t().long(), gates.t().float()  # [T, k]
    # DeepSpeed's own bookkeeping agrees: kept routes per expert fit the capacity and never exceed the assignments
    # before the cut (exp_counts), and a dropped route carries no weight.
    kept = torch.bincount(ids[ids >= 0], minlength=n_exp)
    assert bool((kept <= exp_counts).all()) and int(kept.max()) <= int(capacity)
    assert int(exp_counts.sum()) == ids.numel() and bool((w[ids < 0] == 0).all())
    return Call(ids, w)


def truth_megatron(mod: Any, args: Any, out: Any, extra: dict[str, Any]) -> Call:
    """TopKRouter: (probs [S*B, E], routing_map [S*B, E]) in sequence-first order; rows re-ordered to [B, S] here."""
    probs, rmap = out
    s, b = args[0].shape[:2]
    probs = probs.reshape(s, b, -1).transpose(0, 1).reshape(s * b, -1).float()  # [B*S, E]
    rmap = rmap.reshape(s, b, -1).transpose(0, 1).reshape(s * b, -1)  # [B*S, E]
    assert bool((probs[~rmap] == 0).all()), "Megatron's probs are zero off the routing map"
    return Call(*_pad_rows(rmap, probs, mod.topk))


def truth_torchtitan(mod: Any, args: Any, out: Any, extra: dict[str, Any]) -> Call:
    """TokenChoiceTopKRouter: (top-k scores [B, L, K], ids [B, L, K], scores [B, L, E])."""
    w, ids, scores = out
    k = ids.shape[-1]
    return Call(ids.reshape(-1, k).long(), w.reshape(-1, k).float(), scores.reshape(-1, scores.shape[-1]).float())


def truth_dispatch(mod: Any, args: Any, out: Any, extra: dict[str, Any]) -> Call:
    """GShard gating (lucidrains, st-moe): dispatch/combine [B, N, E, C]; a token's experts = its non-empty slots."""
    dispatch, combine = out[0], out[1]
    e = dispatch.shape[-2]
    mask = dispatch.reshape(-1, e, dispatch.shape[-1]).ne(0).any(-1)  # [T, E]
    dense = combine.reshape(-1, e, combine.shape[-1]).float().sum(-1)  # [T, E]
    k = int(getattr(mod, "top_n", 2))
    probs = logits = None
    if "logits" in extra:  # st-moe: softmax of its to_gates output, as the gate computes raw_gates (no noise)
        logits = extra.pop("logits").reshape(-1, e).float()  # [T, E]
        probs = torch.softmax(logits, -1)
    return Call(*_pad_rows(mask, dense, k), probs, logits)


# -- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One framework configuration under test."""

    family: str  # the spec family hooks/frameworks.toml gives it
    package: str  # importorskip'd
    build: Callable[[], TinyLM]
    router: str  # the router class's qualified name (the test finds its modules by it, not through moescope)
    truth: Callable[[Any, Any, Any, dict[str, Any]], Call]
    n_experts: int
    top_k: int
    prob_sum: bool  # the spec reads the router's probabilities: prob_sum is exact
    drops: bool | None = None  # True: some route must be dropped (the dropped path is tested); False: none may be
    logits_from: str | None = None  # submodule whose output the test also hooks (st-moe's to_gates)
    differs: bool = False  # ids must differ from top-k of the probabilities somewhere (biased selection)


E = 4


def _deepspeed(k: int, drop: bool) -> Callable[[], TinyLM]:
    def build() -> TinyLM:
        from deepspeed.moe.layer import MoE

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                # eval capacity factor 0.5: ceil(T/E·0.5·k) slots per expert, so some routes are cut
                self.moe = MoE(D, nn.Linear(D, D), num_experts=E, ep_size=1, k=k, capacity_factor=0.5,
                               eval_capacity_factor=0.5, min_capacity=1, drop_tokens=drop, use_rts=False)

            def forward(self, h: torch.Tensor) -> torch.Tensor:
                return self.moe(h)[0]  # (output, l_aux, exp_counts)

        torch.manual_seed(0)
        return TinyLM([Block(), Block()]).eval()

    return build


def _megatron_groups() -> Any:
    from megatron.core.process_groups_config import ProcessGroupCollection

    # the groups a single process has: none (TopKRouter reads them only for aux losses and TP reductions)
    return ProcessGroupCollection(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)


def _megatron(score: str) -> Callable[[], TinyLM]:
    def build() -> TinyLM:
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.transformer.transformer_config import TransformerConfig

        if score == "softmax":  # capacity factor 0.5 over top-2: each expert keeps ceil(T·2/E·0.5) routes
            extra: dict[str, Any] = {"moe_expert_capacity_factor": 0.5, "moe_token_drop_policy": "probs"}
        else:  # DeepSeek-V3 style: sigmoid scores + a selection-only expert bias, renormalised top-k
            extra = {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                     "moe_router_topk_scaling_factor": 2.0}
        cfg = TransformerConfig(num_layers=2, hidden_size=D, num_attention_heads=2, num_moe_experts=E,
                                moe_router_topk=2, moe_router_dtype="fp32", moe_aux_loss_coeff=0.0, **extra)

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.router = TopKRouter(cfg, pg_collection=_megatron_groups())
                self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
                if self.router.expert_bias is not None:
                    self.router.expert_bias.copy_(torch.randn(E) * 0.5)

            def forward(self, h: torch.Tensor) -> torch.Tensor:  # [S, B, D]
                probs, _ = self.router(h)  # [S*B, E], zeros off the routing map
                x = h.reshape(-1, D)
                out = sum(probs[:, e : e + 1] * self.experts[e](x) for e in range(E))  # the router's combine weights
                return out.reshape(h.shape)

        torch.manual_seed(0)
        return TinyLM([Block(), Block()], seq_first=True).eval()

    return build


def _torchtitan(score: str) -> Callable[[], TinyLM]:
    def build() -> TinyLM:
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        n = 8
        cfg = MoE.Config(
            num_experts=n,
            routed_experts=RoutedExperts.Config(
                inner_experts=GroupedExperts.Config(dim=D, hidden_dim=32, num_experts=n),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=n, top_k=2),
            ),
            router=TokenChoiceTopKRouter.Config(num_experts=n, gate=Linear.Config(in_features=D, out_features=n),
                                                top_k=2, score_func=score, route_norm=True, route_scale=2.0),
        )

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.moe = MoE(cfg)
                for p in self.moe.parameters():  # torchtitan allocates with torch.empty and inits at model build
                    nn.init.normal_(p, std=0.3)
                # the auxiliary-loss-free balancing bias: steers selection only, so ids ≠ top-k of the scores
                self.moe.expert_bias_E.copy_(torch.randn(n) * (0.3 if score == "softmax" else 1.0))

            def forward(self, h: torch.Tensor) -> torch.Tensor:
                return self.moe(h)

        torch.manual_seed(0)
        return TinyLM([Block(), Block()]).eval()

    return build


def _lucidrains() -> TinyLM:
    from mixture_of_experts import MoE

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # second_policy "all": every token asks for 2 experts, so every route not dispatched is a capacity cut
            self.moe = MoE(dim=D, num_experts=E, hidden_dim=32, second_policy_eval="all", capacity_factor_eval=1.0)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.moe(h)[0]  # (output, aux loss)

    torch.manual_seed(0)
    return TinyLM([Block(), Block()]).eval()


def _st_moe() -> TinyLM:
    from st_moe_pytorch import MoE

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # threshold 0.2: the 2nd expert is dispatched with probability min(1, gate2 / 0.2) — 1 or 2 per token
            self.moe = MoE(dim=D, num_experts=E, gating_top_n=2, expert_hidden_mult=2, capacity_factor_eval=1.0)
            with torch.no_grad():
                self.moe.gate.to_gates.weight.mul_(4.0)  # peaked gates: crowded experts, capacity cuts

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.moe(h)[0]  # MixtureOfExpertsReturn(outputs, total_aux_loss, balance_loss, router_z_loss)

    torch.manual_seed(0)
    return TinyLM([Block(), Block()]).eval()


def _skip_torchtitan() -> str | None:
    try:  # torchtitan imports triton at module import (its EP kernels); CUDA torch wheels on Linux bring it
        import triton  # noqa: F401
    except ImportError:
        return "torchtitan imports triton at import time and triton is not installed (CPU-only torch wheel)"
    return None


CASES: dict[str, Case] = {
    "deepspeed-top1-drop": Case("deepspeed", "deepspeed", _deepspeed(1, True), "deepspeed.moe.sharded_moe.TopKGate",
                                truth_deepspeed, E, 1, False, drops=True),
    "deepspeed-top2-drop": Case("deepspeed", "deepspeed", _deepspeed(2, True), "deepspeed.moe.sharded_moe.TopKGate",
                                truth_deepspeed, E, 2, False, drops=True),
    "deepspeed-top2-nodrop": Case("deepspeed", "deepspeed", _deepspeed(2, False),
                                  "deepspeed.moe.sharded_moe.TopKGate", truth_deepspeed, E, 2, False, drops=False),
    "deepspeed-top3-drop": Case("deepspeed", "deepspeed", _deepspeed(3, True), "deepspeed.moe.sharded_moe.TopKGate",
                                truth_deepspeed, E, 3, False, drops=True),
    "megatron-softmax-capacity": Case("megatron_core", "megatron.core", _megatron("softmax"),
                                      "megatron.core.transformer.moe.router.TopKRouter", truth_megatron, E, 2, False,
                                      drops=True),
    "megatron-sigmoid-bias": Case("megatron_core", "megatron.core", _megatron("sigmoid"),
                                  "megatron.core.transformer.moe.router.TopKRouter", truth_megatron, E, 2, False,
                                  drops=False),
    "torchtitan-softmax": Case("torchtitan", "torchtitan", _torchtitan("softmax"),
                               "torchtitan.models.common.moe.TokenChoiceTopKRouter", truth_torchtitan, 8, 2, True,
                               drops=False, differs=True),
    "torchtitan-sigmoid": Case("torchtitan", "torchtitan", _torchtitan("sigmoid"),
                               "torchtitan.models.common.moe.TokenChoiceTopKRouter", truth_torchtitan, 8, 2, True,
                               drops=False, differs=True),
    "lucidrains-moe": Case("lucidrains_moe", "mixture_of_experts", _lucidrains,
                           "mixture_of_experts.mixture_of_experts.Top2Gating", truth_dispatch, E, 2, False, drops=True),
    "st-moe": Case("st_moe", "st_moe_pytorch", _st_moe, "st_moe_pytorch.st_moe_pytorch.TopNGating", truth_dispatch, E,
                   2, True, drops=True, logits_from="to_gates"),
}


@contextmanager
def shims(case: Case) -> Iterator[None]:
    """The CPU shims of the module docstring, for Megatron-Core only, undone afterwards."""
    if case.family != "megatron_core":
        yield
        return
    import megatron.core.transformer.moe.moe_utils as mu

    saved_dev = torch.cuda.current_device
    had_gemm = hasattr(mu, "te_general_gemm")
    torch.cuda.current_device = lambda: torch.device("cpu")  # the device Megatron moves router weights to
    if not had_gemm:
        mu.te_general_gemm = None  # megatron-core's missing fallback when Transformer Engine is absent
    try:
        yield
    finally:
        torch.cuda.current_device = saved_dev
        if not had_gemm:
            del mu.te_general_gemm


def _qualname(m: Any) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def record_case(case: Case, tmp: Path) -> tuple[Path, dict[str, list[Call]]]:
    """Record the two forwards of the case's tiny model; returns (run dir, truth calls per router module)."""
    model = case.build()
    routers = {n: m for n, m in model.named_modules() if _qualname(m) == case.router}
    assert len(routers) == 2, f"{case.family}: the test found routers {sorted(routers)}"
    calls: dict[str, list[Call]] = {}
    extra: dict[str, dict[str, Any]] = {n: {} for n in routers}
    handles = []
    for name, mod in routers.items():
        def hook(m: Any, args: Any, out: Any, _n: str = name) -> None:
            calls.setdefault(_n, []).append(case.truth(m, args, out, extra[_n]))

        handles.append(mod.register_forward_hook(hook))
        if case.logits_from:
            def logits_hook(m: Any, args: Any, out: Any, _n: str = name) -> None:
                extra[_n]["logits"] = out.detach().clone()

            handles.append(mod.get_submodule(case.logits_from).register_forward_hook(logits_hook))
    run = tmp / case.family
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # the flight ring on: the counts must not change, and check_flight compares its rows with the truth
            with moescope.record(model, run, tokens=1.0, flight_steps=2, flight_tokens=FLIGHT_ROWS) as rec, \
                    torch.no_grad():
                for step, (x, mask) in enumerate(batches()):
                    rec.step = step
                    model(input_ids=x, attention_mask=mask)
                rec.dump_flight()
    finally:
        for h in handles:
            h.remove()
    ours = [str(w.message) for w in caught if str(w.message).startswith("moescope")]
    assert not ours, f"{case.family}: moescope warned: {ours}"
    return run, calls


FLIGHT_ROWS = 10  # the ring's sample: the first 10 tokens (batch-first) of each step, padding included


def check_flight(case: Case, run: Path, calls: dict[str, list[Call]], model_settings: dict[str, dict[str, float]]
                 ) -> None:
    """The flight dump holds each router's dispatched experts and weights for the sampled tokens of both steps (in
    the input's order, also for sequence-first routers), and the settings its spec names, read from the router."""
    from moescope.analysis.explain import read_dump

    (path,) = (run / "flight").iterdir()
    d = read_dump(path)
    for info in d.meta["layers"]:
        layer, module = info["layer"], info["module"]
        assert info["steps"] == [0, 1] and info["rows"] == 2 * FLIGHT_ROWS
        ids, w = d.layer(layer, "ids"), d.layer(layer, "weights")  # [R, k]
        for i, step in enumerate((0, 1)):
            call = calls[module][step]
            for t in range(FLIGHT_ROWS):
                row = i * FLIGHT_ROWS + t
                got = sorted((int(e), float(x)) for e, x in zip(ids[row], w[row]) if 0 <= e < case.n_experts)
                kept = call.ids[t] >= 0
                want = sorted((int(e), float(x)) for e, x in zip(call.ids[t][kept], call.weights[t][kept]))
                assert got == want, f"{module} step {step} token {t}: ring {got} ≠ dispatched {want}"
        assert model_settings[module] and all(info["settings"][k] == v for k, v in model_settings[module].items()), \
            (module, info["settings"], model_settings[module])


def spec_settings(case: Case) -> dict[str, dict[str, float]]:
    """The numeric values of the case spec's `settings`, read from each router of a fresh build of its model."""
    from moescope.capture.specs import REGISTRY

    model = case.build()
    out: dict[str, dict[str, float]] = {}
    for name, mod in model.named_modules():
        if _qualname(mod) != case.router:
            continue
        spec = REGISTRY.resolve(type(mod))
        assert spec is not None and spec.settings, f"{case.family}: its spec names no settings"
        vals: dict[str, float] = {}
        for path in spec.settings:
            v: Any = mod
            for part in path.split("."):
                v = getattr(v, part, None)
            if isinstance(v, (bool, int, float)):
                vals[path] = float(v)
        out[name] = vals
    return out


def read(run: Path, table: str) -> Any:
    """One trace table of a run as pandas, read directly from its Parquet parts."""
    parts = sorted((run / table).glob("*.parquet"))
    assert parts, f"no {table} parts in {run}"
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pandas()


def _stored(rows: Any, col: str, fill: float) -> np.ndarray:
    """A list column of token rows as a [n, k] array, NULL entries as `fill`."""
    return np.array([[fill if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in r]
                     for r in rows[col]], dtype=np.float64)


def check_trace(case: Case, run: Path, calls: dict[str, list[Call]]) -> dict[str, int]:
    """Every assertion of the module docstring; returns the dropped and dispatched route counts seen."""
    manifest = json.loads((run / "manifest.json").read_text())
    layers = {entry["module"]: entry for entry in manifest["layers"]}
    assert set(layers) == set(calls), f"recorder hooked {sorted(layers)}, routers called {sorted(calls)}"
    for entry in layers.values():
        assert (entry["family"], entry["n_experts"], entry["top_k"]) == (case.family, case.n_experts, case.top_k)
    routing, load, stats = read(run, "routing"), read(run, "expert_load"), read(run, "router_stats")
    seen = {"dropped": 0, "routes": 0, "differs": 0, "prob_sum_written": 0}
    for step, (_x, mask) in enumerate(batches()):
        valid = mask.reshape(-1).bool()  # [B*S]
        for module, entry in layers.items():
            layer, n_exp = entry["layer"], entry["n_experts"]
            call = calls[module][step]
            ids, w = call.ids[valid], call.weights[valid]  # [n, k]
            rows = routing[(routing.step == step) & (routing.layer == layer)].sort_values(["seq", "pos"])
            # one row per real token, in batch order (a sequence-first router's rows re-ordered), padding skipped
            assert rows.seq.tolist() == torch.arange(B).repeat_interleave(S)[valid].tolist(), f"{module}: rows"
            assert rows.pos.tolist() == (mask.cumsum(-1) - 1).reshape(-1)[valid].tolist(), f"{module}: pos"
            got_ids = torch.as_tensor(_stored(rows, "experts", -1).astype(np.int64))
            got_w = torch.as_tensor(_stored(rows, "weights", 0.0).astype(np.float32))
            assert got_ids.shape == ids.shape, f"{module}: stored rows {tuple(got_ids.shape)} ≠ {tuple(ids.shape)}"
            kept = ids >= 0
            if case.family in ("deepspeed", "torchtitan"):  # the router's own slot order, -1 where dropped
                assert torch.equal(got_ids, ids), f"{module} step {step}: stored ids ≠ the router's ids"
                torch.testing.assert_close(got_w[kept], w[kept].half().float(), rtol=0, atol=0)
            else:  # masks have no slot order: the same (expert, weight) set per token, first choice first
                for t in range(ids.shape[0]):
                    want = sorted((int(e), float(x)) for e, x in zip(ids[t][kept[t]], w[t][kept[t]].half().float()))
                    got = sorted((int(e), float(x)) for e, x in zip(got_ids[t], got_w[t]) if e >= 0)
                    assert got == want, f"{module} step {step} token {t}: stored {got} ≠ dispatched {want}"
                    gw = got_w[t][got_ids[t] >= 0]
                    assert bool((gw[:-1] >= gw[1:]).all()), f"{module}: slots not in weight order"
            counts = torch.bincount(ids[kept], minlength=n_exp)
            wsum = torch.zeros(n_exp, dtype=torch.float64).index_add_(0, ids[kept], w[kept].double())
            lo = load[(load.step == step) & (load.layer == layer)].sort_values("expert")
            assert lo.expert.tolist() == list(range(n_exp))
            assert lo.tokens.tolist() == counts.tolist(), f"{module} step {step}: expert_load ≠ dispatched counts"
            np.testing.assert_allclose(lo.weight_sum.to_numpy(), wsum.numpy(), rtol=1e-6, atol=1e-9)
            st = stats[(stats.step == step) & (stats.layer == layer)]
            assert int(st.tokens.iloc[0]) == int(valid.sum())
            n_drop = int((~kept).sum())
            assert int(st.dropped.iloc[0]) == n_drop, f"{module} step {step}: dropped {st.dropped.iloc[0]} ≠ {n_drop}"
            seen["dropped"] += n_drop
            seen["routes"] += int(kept.sum())
            if case.prob_sum:
                assert call.probs is not None
                want_p = call.probs[valid].double().sum(0).numpy()
                np.testing.assert_allclose(lo.prob_sum.to_numpy(), want_p, rtol=1e-5, atol=1e-5)
                # entropy and top-1 − top-2 margin of the probabilities, normalised per token (sigmoid scores)
                pn = call.probs[valid].double()
                pn = pn / pn.sum(-1, keepdim=True)
                top2 = pn.topk(2, -1).values
                assert math.isclose(float(st.entropy_sum.iloc[0]), float(torch.special.entr(pn).sum()), rel_tol=1e-4)
                assert math.isclose(float(st.margin_sum.iloc[0]), float((top2[:, 0] - top2[:, 1]).sum()),
                                    rel_tol=1e-4)
            else:
                seen["prob_sum_written"] += int(lo.prob_sum.notna().sum())
            if call.logits is not None:  # the z-loss numerator of the real logits
                lse_sq = float(torch.logsumexp(call.logits[valid].double(), -1).square().sum())
                assert math.isclose(float(st.lse_sq_sum.iloc[0]), lse_sq, rel_tol=1e-5)
            if case.differs:
                ref = torch.topk(call.probs[valid], case.top_k, -1).indices.sort(-1).values
                seen["differs"] += int((ids.sort(-1).values != ref).any(-1).sum())
    return seen


@pytest.mark.parametrize("name", sorted(CASES))
def test_framework_trace_matches_dispatch(name: str, tmp_path: Path) -> None:
    """The trace holds exactly what each framework's router dispatched, token by token and expert by expert."""
    case = CASES[name]
    pytest.importorskip(case.package)
    if case.family == "torchtitan" and (why := _skip_torchtitan()):
        pytest.skip(why)
    with warnings.catch_warnings():
        # framework noise at import/build: Megatron without Transformer Engine/Apex, torchtitan's float32 autocast
        warnings.simplefilter("ignore", UserWarning)
        with shims(case):
            run, calls = record_case(case, tmp_path)
    seen = check_trace(case, run, calls)
    with warnings.catch_warnings(), shims(case):
        warnings.simplefilter("ignore", UserWarning)
        check_flight(case, run, calls, spec_settings(case))
    assert seen["routes"] > 0
    if case.drops is True:
        assert seen["dropped"] > 0, "no route was dropped: the capacity path went untested"
    elif case.drops is False:
        assert seen["dropped"] == 0
    if case.differs:
        assert seen["differs"] > 0, "biased selection chose top-k of the scores everywhere: the test proves nothing"


def test_no_probabilities_no_prob_sum(tmp_path: Path) -> None:
    """A router whose spec reads no probabilities (DeepSpeed: logits computed inline) has prob_sum NULL, not 0."""
    case = CASES["deepspeed-top1-drop"]
    pytest.importorskip(case.package)
    run, calls = record_case(case, tmp_path)
    seen = check_trace(case, run, calls)
    assert seen["prob_sum_written"] == 0


def test_deepspeed_dense_gate_output_is_refused_not_misread(tmp_path: Path) -> None:
    """A TopKGate called without sparse_routes (older MOELayers) returns dense masks: the first-call check refuses
    the spec's reading (one warning naming the spec), the user's forward runs unchanged, and no count is recorded."""
    pytest.importorskip("deepspeed")
    from deepspeed.moe.sharded_moe import TopKGate

    class DenseBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = TopKGate(D, E, k=2, min_capacity=1, top2_2nd_expert_sampling=False)
            self.proj = nn.Linear(D, D)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            _, combine, _, _ = self.gate(h.reshape(-1, D))  # (l_aux, combine [T, E, C], dispatch [T, E, C], counts)
            return self.proj(h) * combine.sum((1, 2)).reshape(*h.shape[:-1], 1)

    torch.manual_seed(0)
    model = TinyLM([DenseBlock()]).eval()
    x, mask = batches()[0]
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with moescope.record(model, tmp_path / "dense") as rec, torch.no_grad():
            rec.step = 0
            got = model(input_ids=x, attention_mask=mask)
    assert torch.equal(got, want)
    ours = [str(w.message) for w in caught if str(w.message).startswith("moescope: capture of layer")]
    assert len(ours) == 1 and "spec 'deepspeed'" in ours[0] and 'per-expert counts [E]' in ours[0], ours
    assert not list((tmp_path / "dense").rglob("*.parquet")), "a refused reading still wrote counts"
    counters = json.loads((tmp_path / "dense" / "manifest.json").read_text())["counters"]
    assert [(d["module"], d["family"]) for d in counters["disabled_layers"]] == [("blocks.0.gate", "deepspeed")]

"""Recording transformers 4.x MoE families (hooks/transformers_v4.toml): the trace holds what the experts received.

Runs only under transformers<5 (CI runs it in a second environment with transformers 4.57; README "Tests").
Each case builds a tiny random-init model of one family, records a left/right-padded batch and an unpadded one
with ``tokens=1.0``, and compares the Parquet trace with ground truth taken by this test's own hooks, never
through moescope:

- ``dispatch``: every routed expert's forward is hooked to return a one-hot row (expert e → unit vector e) and the
  shared experts to return zeros, so the MoE block's output row of token t is Σ_slots weight · onehot(id): exactly
  the (expert, weight) pairs the block dispatched, read from the block's own output.
- ``experts_args``: fused experts modules (GPT-OSS, DBRX, Qwen3-VL-MoE) are called with the ids and weights; a
  forward pre-hook reads them as the experts received them.
- ``router``: the router's own return value (Granite-MoE / JetMoE sorted slots, undone with a plain loop here).

The gate's logits come from a hook on the gate ``nn.Linear`` itself, and where the model has
``output_router_logits`` the stored ids are also the softmax top-k of those logits and its ``aux_loss`` follows
from the trace.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from hf_helpers import (  # noqa: E402
    FLIGHT_ROWS,
    TINY_MOE,
    TRANSFORMERS_V5,
    assert_aux_loss,
    flight_layers,
    padded_batches,
)

if TRANSFORMERS_V5:
    pytest.skip(
        "transformers>=5 is installed: the 4.x specs (requires = 'transformers<5') are inactive; CI runs this file "
        "in its transformers 4.57 environment (README 'Tests')",
        allow_module_level=True,
    )

import moescope  # noqa: E402
from moescope.capture.recorder import RecordError, find_routers  # noqa: E402

pytestmark = pytest.mark.hf

from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

B, S, E, K = 3, 7, 8, 2  # batch, sequence length, experts, top-k of every tiny model

TINY: dict[str, Any] = dict(TINY_MOE)


@dataclass
class Case:
    """One 4.x family: how to build it and where this test reads its ground truth."""

    model_type: str
    truth: str = "dispatch"  # "dispatch", "dispatch_grouped", "experts_args", "router", "scores"
    gate: str | None = "gate"  # the block's nn.Linear gate, hooked for the logits (None: no logits to compare)
    overrides: dict[str, Any] = field(default_factory=dict)
    router_logits: bool = False  # output_router_logits returns the gate logits
    biased: bool = False  # the block selects with a bias: its ids are not the softmax top-k of those logits
    aux: bool = False  # aux_loss is load_balancing_loss_func over those logits: recomputable from the trace
    norm: bool | None = None  # the block's norm_topk_prob, set both ways across cases (selection_norm)
    setup: Callable[[Any], None] | None = None
    base: bool = False  # build the base model (AutoModel: text towers of multimodal families)
    probs: str = "softmax"  # the family's router probabilities (prob_sum in expert_load)


def _bias(model: Any) -> None:
    """A non-zero selection bias, so biased selection differs from plain top-k of the scores."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        b = getattr(m, "e_score_correction_bias", None)
        if isinstance(b, torch.Tensor):
            b.data.copy_(torch.randn(b.shape, generator=g) * 0.5)


MIX = {"router_logits": True, "aux": True}
MROPE = {"rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1]}}  # text towers: 3-D rope of head_dim 8
CASES: dict[str, Case] = {
    "mixtral": Case("mixtral", **MIX),
    "minimax": Case("minimax", overrides={"layer_types": ["full_attention", "full_attention"]}, **MIX),
    "qwen2_moe": Case("qwen2_moe", norm=False, **MIX),
    "qwen2_moe_norm": Case("qwen2_moe", norm=True, **MIX),
    "qwen3_moe": Case("qwen3_moe", norm=True, **MIX),
    "olmoe": Case("olmoe", norm=False, **MIX),
    "flex_olmo": Case("flex_olmo", norm=False, **MIX),
    "qwen3_next": Case("qwen3_next", overrides={"layer_types": ["linear_attention", "full_attention"]}, norm=True,
                       **MIX),
    "jamba": Case(
        "jamba",
        gate="router",
        overrides={"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
                   "use_mamba_kernels": False},
        **MIX,
    ),
    "hunyuan_v1_moe": Case("hunyuan_v1_moe", gate="gate.wg"),
    "deepseek_v3": Case("deepseek_v3", gate=None, setup=_bias),
    "deepseek_v2": Case("deepseek_v2", gate=None, overrides={"topk_method": "group_limited_greedy"}),
    "glm4_moe": Case("glm4_moe", gate=None, setup=_bias),
    "dots1": Case("dots1", gate=None, setup=_bias),
    "longcat_flash": Case(
        "longcat_flash", gate=None, setup=_bias,
        overrides={"num_layers": 2, "ffn_hidden_size": 32, "expert_ffn_hidden_size": 32, "zero_expert_num": 2},
    ),
    "gpt_oss": Case("gpt_oss", truth="experts_args", gate=None),
    "dbrx": Case(
        "dbrx", truth="experts_args", gate="router.layer",
        overrides={"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
                   "attn_config": {"kv_n_heads": 2}, "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": E,
                                                                     "moe_top_k": K}},
    ),
    "aria": Case("aria_text", truth="dispatch_grouped", gate="router",
                 overrides={"moe_num_experts": E, "moe_topk": K, "moe_num_shared_experts": 1}),
    "phimoe": Case("phimoe", **MIX),
    "ernie4_5_moe": Case("ernie4_5_moe", overrides={"moe_num_experts": E, "moe_k": K, "moe_num_shared_experts": 1,
                                                    "moe_layer_start_index": 0}, setup=_bias, router_logits=True,
                         biased=True),
    "qwen3_vl_moe": Case("qwen3_vl_moe_text", truth="experts_args", base=True, overrides=MROPE),
    "glm4v_moe": Case("glm4v_moe_text", gate=None, base=True, setup=_bias,
                      overrides={"rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 0]}}),
    "llama4": Case("llama4_text", truth="scores", gate=None, probs="sigmoid",
                   overrides={"intermediate_size_mlp": 64, "interleave_moe_layer_step": 1}),
    "granitemoe": Case("granitemoe", truth="router", gate=None),
    "granitemoeshared": Case("granitemoeshared", truth="router", gate=None),
    "jetmoe": Case("jetmoe", truth="router", gate=None),
}


# -- building -------------------------------------------------------------------------------------------------


def build(case: Case) -> Any:
    """A tiny random-init model of the family (eval mode, float32); TINY fields its config does not take are dropped."""
    cls = CONFIG_MAPPING[case.model_type]
    params = set(inspect.signature(cls.__init__).parameters)
    kw = {k: v for k, v in TINY.items() if k in params}
    if case.norm is not None:
        kw["norm_topk_prob"] = case.norm
    kw.update(case.overrides)
    torch.manual_seed(0)
    model = (AutoModel if case.base else AutoModelForCausalLM).from_config(cls(**kw)).eval()
    if case.setup is not None:
        case.setup(model)
    return model


def batches() -> list[tuple[Any, Any]]:
    """(input_ids, attention_mask): a batch with left and right padding, then one without."""
    return padded_batches(B, S)


def read(run: Path, table: str) -> Any:
    """One trace table of a run as pandas, read directly from its Parquet parts."""
    parts = sorted((run / table).glob("*.parquet"))
    assert parts, f"no {table} parts in {run}"
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pandas()


# -- ground truth (this test's own hooks) ---------------------------------------------------------------------


def moe_blocks(model: Any, case: Case) -> dict[str, Any]:
    """MoE blocks in module order, found without moescope: modules holding the routed experts."""
    if case.truth == "router":
        # JetMoE: the mixture-of-attention gating (self_attention.experts.router) and the MLP one, both routers
        return {n: m for n, m in model.named_modules() if type(m).__name__.endswith("TopKGating")}
    return {n: m for n, m in model.named_modules() if hasattr(m, "experts") and
            type(m).__name__.endswith(("SparseMoeBlock", "MoE", "Moe", "MoELayer", "FFN", "MLP"))
            and not isinstance(m, torch.nn.ModuleList)}


def _onehot_out(e: int) -> Callable[..., Any]:
    def hook(module: Any, args: Any, out: Any) -> Any:
        probe = torch.zeros_like(out)  # [n, H]: expert e's output becomes unit vector e
        probe[..., e] = 1.0
        return probe

    return hook


def _zeros_out(module: Any, args: Any, out: Any) -> Any:
    return torch.zeros_like(out)


def truth_hooks(model: Any, case: Case, calls: dict[str, list[dict[str, Any]]]) -> list[Any]:
    """Attach the ground-truth hooks; each block call appends {ids, weights, logits} to calls[block]."""
    handles = []
    for name, block in moe_blocks(model, case).items():
        calls[name] = []
        if case.truth == "dispatch":
            for e, expert in enumerate(block.experts):
                handles.append(expert.register_forward_hook(_onehot_out(e)))
            for attr in ("shared_expert", "shared_experts", "shared_mlp"):
                if isinstance(getattr(block, attr, None), torch.nn.Module):
                    handles.append(getattr(block, attr).register_forward_hook(_zeros_out))
            handles.append(block.register_forward_pre_hook(_new_call(name, calls)))
            handles.append(block.register_forward_hook(_dispatched(name, calls)))
        elif case.truth == "dispatch_grouped":
            # Aria: one grouped-GEMM experts module over the tokens sorted by expert (tokens_per_expert rows each)
            handles.append(block.experts.register_forward_hook(_grouped_onehot))
            handles.append(block.shared_experts.register_forward_hook(_zeros_out))
            handles.append(block.register_forward_pre_hook(_new_call(name, calls)))
            handles.append(block.register_forward_hook(_dispatched(name, calls, block.config.moe_num_experts)))
        elif case.truth == "experts_args":
            handles.append(block.register_forward_pre_hook(_new_call(name, calls)))
            handles.append(block.experts.register_forward_pre_hook(_experts_args(name, case, calls), with_kwargs=True))
        elif case.truth == "scores":
            # Llama 4: the router's scores [T, E] (sigmoid of the top-k logits, 0 elsewhere) scale the experts' input
            handles.append(block.router.register_forward_hook(_scores(name, calls)))
        else:
            handles.append(block.register_forward_hook(_sorted_router(name, calls)))
        if case.gate is not None:
            gate = block.get_submodule(case.gate)
            assert isinstance(gate, torch.nn.Linear), f"{name}.{case.gate} is not the gate Linear"
            handles.append(gate.register_forward_hook(_gate_logits(name, calls)))
    return handles


def _new_call(name: str, calls: dict[str, list[dict[str, Any]]]) -> Callable[..., None]:
    def hook(module: Any, args: Any) -> None:
        calls[name].append({})

    return hook


def _grouped_onehot(module: Any, args: Any, out: Any) -> Any:
    sizes = args[1]  # tokens_per_expert [E]: the sorted rows are expert 0's, then expert 1's, ...
    experts = torch.repeat_interleave(torch.arange(len(sizes)), sizes.long())  # [T*k]
    return torch.nn.functional.one_hot(experts, out.shape[-1]).to(out.dtype)


def _dispatched(name: str, calls: dict[str, list[dict[str, Any]]], n_exp: int | None = None) -> Callable[..., None]:
    def hook(module: Any, args: Any, out: Any) -> None:
        hidden = (out[0] if isinstance(out, tuple) else out).detach()
        rows = hidden.reshape(-1, hidden.shape[-1])  # [T, H]: Σ_slots weight · onehot(id), zero elsewhere
        e = n_exp or len(module.experts)
        assert bool((rows[:, e:] == 0).all()), "something besides the routed experts reached the output"
        dense = rows[:, :e]  # [T, E]
        ids = torch.sort(torch.topk((dense != 0).float(), K, dim=-1).indices, dim=-1).values  # [T, K]
        assert bool(((dense != 0).sum(-1) == K).all()), "a token reached other than top-k experts"
        calls[name][-1].update(ids=ids, weights=dense.gather(-1, ids))

    return hook


def _experts_args(name: str, case: Case, calls: dict[str, list[dict[str, Any]]]) -> Callable[..., None]:
    def hook(module: Any, args: Any, kwargs: Any) -> None:
        if case.model_type == "gpt_oss":  # experts(hidden, router_indices=ids [T, k], routing_weights=[T, E] dense)
            ids, dense = kwargs["router_indices"], kwargs["routing_weights"]
            w = dense.reshape(ids.shape[0], -1).gather(-1, ids)
        elif case.model_type == "qwen3_vl_moe_text":  # experts(hidden, router_weights [T, E] dense, router_indices)
            ids, dense = args[2], args[1]
            w = dense.reshape(ids.shape[0], -1).gather(-1, ids)
        else:  # DBRX: experts(x, weights [T, E], top_weights [T, k], top_experts [T, k])
            ids, w = args[3], args[2]
        order = torch.argsort(ids, dim=-1)
        calls[name][-1].update(ids=ids.gather(-1, order), weights=w.gather(-1, order).detach())

    return hook


def _scores(name: str, calls: dict[str, list[dict[str, Any]]]) -> Callable[..., None]:
    def hook(module: Any, args: Any, out: Any) -> None:
        scores, logits = out  # [T, E] each
        ids = torch.sort(torch.topk((scores != 0).float(), K, dim=-1).indices, dim=-1).values  # [T, K]
        assert bool(((scores != 0).sum(-1) == K).all())
        calls[name].append({"ids": ids, "weights": scores.gather(-1, ids).detach(), "logits": logits.detach()})

    return hook


def _sorted_router(name: str, calls: dict[str, list[dict[str, Any]]]) -> Callable[..., None]:
    def hook(module: Any, args: Any, out: Any) -> None:
        order, _, gates, sizes, logits = out  # slots sorted by expert: expert 0's first, then 1's, ...
        ids = torch.empty(order.numel(), dtype=torch.long)
        w = torch.empty(order.numel())
        j = 0
        for expert, size in enumerate(sizes):
            for _ in range(size):
                ids[order[j]] = expert
                w[order[j]] = gates[j]
                j += 1
        ids, w = ids.reshape(-1, module.top_k), w.reshape(-1, module.top_k)
        o = torch.argsort(ids, dim=-1)
        calls[name].append({"ids": ids.gather(-1, o), "weights": w.gather(-1, o), "logits": logits.detach()})

    return hook


def _gate_logits(name: str, calls: dict[str, list[dict[str, Any]]]) -> Callable[..., None]:
    def hook(module: Any, args: Any, out: Any) -> None:
        calls[name][-1]["logits"] = out.detach().reshape(-1, out.shape[-1]).float()

    return hook


# -- recording and checks -------------------------------------------------------------------------------------


def record_case(case: Case, tmp: Path) -> tuple[Any, Path, dict[str, list[dict[str, Any]]], list[Any]]:
    """Record two forwards of the family's tiny model; returns (model, run dir, truth calls, model outputs)."""
    model = build(case)
    calls: dict[str, list[dict[str, Any]]] = {}
    handles = truth_hooks(model, case, calls)
    assert calls, f"{case.model_type}: this test found no MoE block"
    run = tmp / case.model_type
    outs = []
    kw = {"output_router_logits": True} if case.router_logits else {}
    try:
        # the flight ring on: the trace must not change, and check_flight compares its rows with the truth
        with moescope.record(model, run, tokens=1.0, flight_steps=2, flight_tokens=FLIGHT_ROWS) as rec, \
                torch.no_grad():
            for step, (x, mask) in enumerate(batches()):
                rec.step = step
                outs.append(model(input_ids=x, attention_mask=mask, **kw))
            rec.dump_flight()
    finally:
        for h in handles:
            h.remove()
    return model, run, calls, outs


def check_flight(run: Path, calls: dict[str, list[dict[str, Any]]]) -> None:
    """The flight dump holds, for the sampled tokens of both steps, the (expert, weight) pairs each block
    dispatched and its gate's logits where the test reads them."""
    by_layer = dict(zip(sorted(e["layer"] for e in json.loads((run / "manifest.json").read_text())["layers"]), calls))
    for info, got in flight_layers(run, [x for x, _mask in batches()]):
        block, n = by_layer[info["layer"]], info["n_experts"]
        for step in (0, 1):
            truth = calls[block][step]
            for t in range(FLIGHT_ROWS):
                pairs = sorted((int(e), float(v)) for e, v in zip(got["ids"][step, t], got["weights"][step, t])
                               if 0 <= e < n)
                want = sorted(zip(truth["ids"][t].tolist(), truth["weights"][t].float().tolist()))
                assert [e for e, _ in pairs] == [e for e, _ in want], f"{block} step {step} token {t}: ring ids"
                np.testing.assert_allclose([v for _, v in pairs], [v for _, v in want], rtol=1e-5, atol=1e-7)
            if "logits" in truth:
                assert (got["logits"][step] == truth["logits"][:FLIGHT_ROWS].numpy()).all(), f"{block}: ring logits"


def _stored(rows: Any) -> tuple[Any, Any]:
    """(ids, weights) [T, k] of routing rows, each row's slots sorted by expert id."""
    ids = torch.as_tensor(np.stack(rows.experts.to_numpy()).astype(np.int64))
    w = torch.as_tensor(np.stack(rows.weights.to_numpy()).astype(np.float32))
    o = torch.argsort(ids, dim=-1)
    return ids.gather(-1, o), w.gather(-1, o)


def check_trace(case: Case, run: Path, calls: dict[str, list[dict[str, Any]]], outs: list[Any]) -> None:
    """Every assertion of the module docstring, for one recorded family."""
    layers = sorted(json.loads((run / "manifest.json").read_text())["layers"], key=lambda e: e["layer"])
    blocks = list(calls)
    assert len(layers) == len(blocks), (layers, blocks)
    for entry, block in zip(layers, blocks):
        # moescope hooks the block itself or its router child: either way the layer is this block's
        assert entry["module"] == block or entry["module"].startswith(block + "."), (entry["module"], block)
        assert (entry["n_experts"], entry["top_k"]) == (E + case.overrides.get("zero_expert_num", 0), K)
    routing, load, stats = read(run, "routing"), read(run, "expert_load"), read(run, "router_stats")
    for step, (_x, mask) in enumerate(batches()):
        valid = mask.reshape(-1).bool()  # [B*S]
        for entry, block in zip(layers, blocks):
            layer, truth = entry["layer"], calls[block][step]
            rows = routing[(routing.step == step) & (routing.layer == layer)].sort_values(["seq", "pos"])
            assert rows.seq.tolist() == torch.arange(B).repeat_interleave(S)[valid].tolist()
            got_ids, got_w = _stored(rows)
            assert torch.equal(got_ids, truth["ids"][valid]), f"{block} step {step}: stored ids ≠ dispatched"
            # the routing table stores weights as float16 (trace schema): compare at that precision
            torch.testing.assert_close(got_w, truth["weights"][valid].float().half().float(), rtol=0, atol=0)
            lo = load[(load.step == step) & (load.layer == layer)].sort_values("expert")
            counts = torch.bincount(truth["ids"][valid].reshape(-1), minlength=entry["n_experts"])
            assert lo.tokens.tolist() == counts.tolist(), f"{block} step {step}: expert_load ≠ bincount"
            st = stats[(stats.step == step) & (stats.layer == layer)]
            assert int(st.tokens.iloc[0]) == int(valid.sum())
            if "logits" in truth:
                lse_sq = torch.logsumexp(truth["logits"][valid], -1).pow(2).sum().item()
                assert math.isclose(float(st.lse_sq_sum.iloc[0]), lse_sq, rel_tol=1e-5), f"{block}: z-loss sum"
                lv = truth["logits"][valid]
                probs = torch.sigmoid(lv) if case.probs == "sigmoid" else torch.softmax(lv, -1)  # [T, E]
                ps = lo.prob_sum.to_numpy()
                np.testing.assert_allclose(ps, probs.sum(0).numpy(), rtol=1e-4, atol=1e-5)
            else:  # the router returns no logits: none are invented (no z-loss sum, no probability mass)
                assert not float(np.nan_to_num(st.lse_sq_sum.iloc[0])), f"{block}: a z-loss sum without logits"
        if case.router_logits:
            _check_router_logits(case, layers, blocks, calls, routing, outs[step], step, valid)
        if case.aux:
            assert_aux_loss(load, outs[step], step, len(layers), int(valid.sum()))


def _check_router_logits(case: Case, layers: list[Any], blocks: list[str], calls: Any, routing: Any, out: Any,
                         step: int, valid: Any) -> None:
    """transformers' output_router_logits are the gate's logits; unbiased, the stored ids are their softmax top-k."""
    rl = out.router_logits
    assert len(rl) == len(layers)
    for entry, block, logits in zip(layers, blocks, rl):
        logits = logits.float().reshape(B * S, -1)
        assert torch.equal(logits, calls[block][step]["logits"])
        ref = torch.topk(torch.softmax(logits, -1), K, -1).indices[valid].sort(-1).values
        rows = routing[(routing.step == step) & (routing.layer == entry["layer"])].sort_values(["seq", "pos"])
        # biased (Ernie): somewhere the block chose other than the softmax top-k — the ids are the block's own
        assert torch.equal(_stored(rows)[0], ref) != case.biased


@pytest.mark.parametrize("family", sorted(CASES))
def test_v4_family_trace_matches_dispatch(family: str, tmp_path: Path) -> None:
    """The trace holds exactly the (expert, weight) pairs each 4.x MoE block dispatched, for every real token."""
    case = CASES[family]
    _, run, calls, outs = record_case(case, tmp_path)
    check_trace(case, run, calls, outs)
    check_flight(run, calls)


def test_selection_norm_follows_each_block(tmp_path: Path) -> None:
    """qwen2_moe with norm_topk_prob off and on: the bound selections differ and so do the stored weights."""
    off, on = build(CASES["qwen2_moe"]), build(CASES["qwen2_moe_norm"])
    assert {li.spec.selection for li in find_routers(off)} == {"softmax_topk"}
    assert {li.spec.selection for li in find_routers(on)} == {"softmax_topk_norm"}
    sums = []
    for name, model in (("off", off), ("on", on)):
        with moescope.record(model, tmp_path / name, tokens=1.0), torch.no_grad():
            model(input_ids=batches()[1][0])
        w = np.stack(read(tmp_path / name, "routing").weights.to_numpy()).astype(np.float32)
        sums.append(w.sum(-1))
    assert float(sums[0].max()) < 0.999 and np.allclose(sums[1], 1.0, atol=2e-3)


def test_gpt_oss_inspect_lists_only_v4_routers(capsys: Any) -> None:
    """`moescope inspect hf:gpt_oss` under 4.x lists the routers the 4.x spec reads (ids=1, dense weights=0)."""
    from moescope import cli

    code = cli.main(["inspect", "hf:gpt_oss"])
    text = capsys.readouterr().out
    model = build(CASES["gpt_oss"])
    infos = find_routers(model)
    assert code == 0 and {li.spec.requires for li in infos} == {"transformers<5"}
    assert [li.module for li in infos] == [n for n, m in model.named_modules() if type(m).__name__ == "GptOssTopKRouter"]
    assert "ids=output[1]" in text and "ids=output[2]" not in text, text


def test_no_spec_message_names_the_readme_section(tmp_path: Path) -> None:
    """A model with no known router under 4.x: the error points at README 'Custom routers', not at v5-only support."""
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(RecordError) as err:
        with moescope.record(model, tmp_path / "none", tokens=1.0):
            pass
    msg = str(err.value)
    assert "README 'Custom routers'" in msg and "Custom models" not in msg, msg
    assert "v5" not in msg and "not supported" not in msg, msg
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "\n## Custom routers" in readme or "\n### Custom routers" in readme


def test_phimoe_in_training_stops_capture_not_the_forward(tmp_path: Path) -> None:
    """PhiMoE samples its experts in training: the reader refuses, each layer's capture stops with a warning
    naming the cause, and the user's forward still returns the model's own output."""
    model = build(CASES["phimoe"]).train()
    x = batches()[1][0]
    torch.manual_seed(3)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    with pytest.warns(RuntimeWarning, match="sparsemixer") as rec_w:
        with moescope.record(model, tmp_path / "t", tokens=1.0), torch.no_grad():
            torch.manual_seed(3)
            got = model(input_ids=x).logits
    assert torch.equal(got, ref)
    stopped = [w for w in rec_w if "capture of layer" in str(w.message)]
    assert len(stopped) == 2, [str(w.message) for w in rec_w]
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    disabled = manifest["counters"].get("disabled_layers", [])
    assert sorted(d["layer"] for d in disabled) == [0, 1], manifest["counters"]


def test_switch_transformers_v4_dispatch_and_dropped(tmp_path: Path) -> None:
    """Switch (4.x): the one-hot dispatch after capacity is stored as the router returned it; a dropped token keeps
    the expert it chose (argmax of its logits) and is counted in router_stats.dropped."""
    from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel

    cfg = SwitchTransformersConfig(
        vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SwitchTransformersEncoderModel(cfg).eval()
    calls: dict[str, list[Any]] = {}

    def hook(name: str) -> Callable[..., None]:
        def h(module: Any, args: Any, out: Any) -> None:
            calls.setdefault(name, []).append(tuple(t.detach().clone() for t in out))  # (mask, max prob, logits)

        return h

    routers = {n: m for n, m in model.named_modules() if type(m).__name__ == "SwitchTransformersTop1Router"}
    handles = [m.register_forward_hook(hook(n)) for n, m in routers.items()]
    x = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with moescope.record(model, tmp_path / "sw", tokens=1.0), torch.no_grad():
        model(input_ids=x)
    for h in handles:
        h.remove()
    layers = json.loads((tmp_path / "sw" / "manifest.json").read_text())["layers"]
    assert [e["module"] for e in layers] == list(routers) and all(e["top_k"] == 1 for e in layers)
    routing, stats = read(tmp_path / "sw", "routing"), read(tmp_path / "sw", "router_stats")
    n_dropped = 0
    for entry in layers:
        mask, max_prob, logits = calls[entry["module"]][0]
        mask, logits = mask.reshape(-1, 4), logits.reshape(-1, 4)
        dropped = mask.sum(-1) == 0  # [T]: over capacity
        ids = torch.where(dropped, logits.argmax(-1), mask.argmax(-1))
        rows = routing[routing.layer == entry["layer"]].sort_values(["seq", "pos"])
        got = torch.as_tensor(np.stack(rows.experts.to_numpy()).astype(np.int64)).reshape(-1)
        assert torch.equal(got, ids)
        got_w = torch.as_tensor(np.stack(rows.weights.to_numpy()).astype(np.float32)).reshape(-1)
        assert torch.equal(got_w, max_prob.reshape(-1).half().float())
        assert int(stats[stats.layer == entry["layer"]].dropped.iloc[0]) == int(dropped.sum())
        n_dropped += int(dropped.sum())
    assert n_dropped > 0, "capacity 3 over 8 tokens should drop some: the dropped path went untested"


@pytest.mark.parametrize("block_cls", ["Qwen3OmniMoeThinkerTextSparseMoeBlock", "Qwen3OmniMoeTalkerTextSparseMoeBlock"])
@pytest.mark.parametrize("norm", [False, True])
def test_qwen3_omni_blocks_alone_are_read_exactly(block_cls: str, norm: bool) -> None:
    """Qwen3-Omni's text blocks (the family needs a whole multimodal model end to end): the block alone, fed random
    hidden states, is read by its spec exactly as the one-hot expert probe sees it dispatched."""
    from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as conf
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as mod

    from moescope.capture import adapters as A

    cfg_cls = conf.Qwen3OmniMoeTalkerTextConfig if "Talker" in block_cls else conf.Qwen3OmniMoeTextConfig
    params = set(inspect.signature(cfg_cls.__init__).parameters)
    cfg = cfg_cls(**{k: v for k, v in {**TINY, "norm_topk_prob": norm}.items() if k in params})
    cfg.shared_expert_intermediate_size = 32  # the talker block reads it; 4.57's talker config does not declare it
    torch.manual_seed(0)
    block = getattr(mod, block_cls)(cfg).eval()
    spec = A.resolve(block)
    assert spec is not None and spec.family == "qwen3_omni_moe"
    assert spec.selection == ("softmax_topk_norm" if norm else "softmax_topk")
    calls: dict[str, list[dict[str, Any]]] = {"b": []}
    handles = [e.register_forward_hook(_onehot_out(i)) for i, e in enumerate(block.experts)]
    for attr in ("shared_expert", "shared_experts"):
        if isinstance(getattr(block, attr, None), torch.nn.Module):
            handles.append(getattr(block, attr).register_forward_hook(_zeros_out))
    handles += [block.register_forward_pre_hook(_new_call("b", calls)), block.register_forward_hook(_dispatched("b", calls))]
    hidden = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        out = block(hidden)
    for h in handles:
        h.remove()
    n, k = A.router_shape(block, spec, None)
    assert (n, k) == (E, K)
    ev = A.extract_router_output(spec, out, n, k, module=block, args=(hidden,))
    o = torch.argsort(ev.ids, dim=-1)
    assert torch.equal(ev.ids.gather(-1, o), calls["b"][0]["ids"])
    assert torch.equal(ev.weights.gather(-1, o), calls["b"][0]["weights"].float())

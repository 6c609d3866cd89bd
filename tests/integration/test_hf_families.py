"""Recording real transformers MoE families: the trace must hold exactly what each router returned.

Each case builds a tiny random-init model of one family, records two forwards (a left/right-padded batch and an
unpadded one) with ``tokens=1.0``, and compares the Parquet trace, read back with pyarrow, against ground truth
captured by this test's own forward hooks on the router modules (ids, weights, logits as the router returned them).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_helpers import (  # noqa: E402
    FLIGHT_ROWS,
    TINY_MOE,
    TRANSFORMERS_V5,
    assert_aux_loss,
    flight_layers,
    padded_batches,
)

if not TRANSFORMERS_V5:
    pytest.skip(
        "transformers<5 is installed: these cases build v5 router modules (v5 specs require transformers>=5); "
        "the 4.x families are tested by test_hf_v4_families.py",
        allow_module_level=True,
    )
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import moescope  # noqa: E402

pytestmark = pytest.mark.hf

from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

TINY: dict[str, Any] = {**TINY_MOE, "moe_num_experts": 8, "moe_top_k": 2, "top_k_experts": 2}  # + v5-only names

B, S = 3, 7  # batch, sequence length of each recorded forward


@dataclass
class Case:
    """One family under test: how to build it and what to assert beyond the exact ids/weights match."""

    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)
    base: bool = False  # build the family's base model (AutoModel: text towers of multimodal families)
    softmax_topk: bool = False  # the family selects the top-k of softmax(logits): ids == top-k of output_router_logits
    aux: bool = False  # the model's aux_loss is transformers' load_balancing_loss_func over those logits
    truth: str = "tuple"  # how this test reads ground truth off the router (see _truth)
    setup: Callable[[Any], None] | None = None  # e.g. set a non-zero correction bias
    # biased selection: the stored ids must differ from softmax-top-k of the logits somewhere (proof that the
    # ids come from the router, not from recomputation)
    differs: bool = False
    extra: Callable[[Any, dict[str, Any]], None] | None = None  # more checks on (routing rows, manifest layers)


def _bias(model: Any) -> None:
    """Give every router a non-zero selection bias so biased selection differs from softmax-top-k."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        b = getattr(m, "e_score_correction_bias", None)
        if isinstance(b, torch.Tensor):
            b.data.copy_(torch.randn(b.shape, generator=g) * 0.5)


def _zaya_skip(model: Any) -> None:
    """Make Zaya's skip expert win often (its balancing bias is -1 at init, so it is never chosen)."""
    for m in model.modules():
        if type(m).__name__ == "ZayaRouter":
            m.balancing_biases.data[-1] = 0.05


def _zaya_skips_stored(routing: Any, layers: dict[str, Any]) -> None:
    """Zaya: the skip class is stored as expert E (n_experts counts it), never folded into expert 0."""
    for entry in layers.values():
        rows = routing[routing.layer == entry["layer"]]
        ids = np.concatenate(rows.experts.to_numpy())
        assert entry["n_experts"] == 9 and (ids == 8).any(), "no skip selection recorded"


SOFTMAX = {"softmax_topk": True, "aux": True}
CASES: dict[str, Case] = {
    # softmax → top-k: ids are also the top-k of output_router_logits; aux_loss is recomputable from the trace
    "mixtral": Case("mixtral", **SOFTMAX),
    "qwen2_moe": Case("qwen2_moe", **SOFTMAX),
    "qwen3_moe": Case("qwen3_moe", **SOFTMAX),
    "qwen3_next": Case("qwen3_next", {"layer_types": ["linear_attention", "full_attention"]}, **SOFTMAX),
    "olmoe": Case("olmoe", **SOFTMAX),
    "flex_olmo": Case("flex_olmo", **SOFTMAX),
    "minimax": Case("minimax", **SOFTMAX),
    "hunyuan_v1_moe": Case("hunyuan_v1_moe", softmax_topk=True),  # its CausalLM computes no aux_loss
    "jamba": Case(
        "jamba",
        {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
        **SOFTMAX,
    ),
    # top-k of logits, softmax over the selected: same ids as softmax top-k
    "gpt_oss": Case("gpt_oss", softmax_topk=True),
    "granitemoe": Case("granitemoe", **SOFTMAX),
    "granitemoeshared": Case("granitemoeshared", **SOFTMAX),
    "aria_text": Case("aria_text", softmax_topk=True),
    "cohere2_moe": Case("cohere2_moe", softmax_topk=True),
    # biased / grouped / sigmoid selection: only the router's returned ids are right
    "deepseek_v3": Case("deepseek_v3", setup=_bias, differs=True),
    "deepseek_v2": Case("deepseek_v2"),
    "glm4_moe": Case("glm4_moe", setup=_bias, differs=True),
    "dots1": Case("dots1", setup=_bias, differs=True),
    "ernie4_5_moe": Case("ernie4_5_moe"),
    "minimax_m2": Case("minimax_m2", setup=_bias, differs=True),
    "afmoe": Case("afmoe"),
    "phimoe": Case("phimoe"),
    "exaone_moe": Case("exaone_moe", setup=_bias, differs=True),
    "longcat_flash": Case(
        "longcat_flash",
        {"num_layers": 2, "ffn_hidden_size": 32, "expert_ffn_hidden_size": 32, "zero_expert_num": 2, "moe_topk": 2},
        setup=_bias,
        differs=True,
    ),
    "axk1": Case("axk1", setup=_bias, differs=True),
    "deepseek_v32": Case("deepseek_v32", setup=_bias, differs=True),
    "glm4_moe_lite": Case("glm4_moe_lite", setup=_bias),
    "glm_moe_dsa": Case("glm_moe_dsa", setup=_bias),
    "dots3_note_text": Case("dots3_note_text", setup=_bias),
    "nemotron_h": Case("nemotron_h", setup=_bias),
    "solar_open": Case("solar_open", setup=_bias),
    "hy_v4": Case("hy_v4", setup=_bias),
    "hy_v3": Case("hy_v3", setup=_bias),
    "minimax_m3_vl_text": Case("minimax_m3_vl_text", setup=_bias),
    "inkling_text": Case("inkling_text", setup=_bias),
    "inkling2_text": Case("inkling2_text", setup=_bias),
    "kolibri1": Case("kolibri1", setup=_bias),
    "laguna": Case("laguna", setup=_bias),
    "flint": Case("flint"),
    "mellum": Case("mellum", **SOFTMAX),
    "granitemoe_swa": Case("granitemoe_swa", **SOFTMAX),
    "beam": Case("beam", {"mlp_layer_types": ["sparse", "sparse"]}, setup=_bias, differs=True),
    "deepseek_v4": Case("deepseek_v4", {"mlp_layer_types": ["hash_moe", "moe"]}, setup=_bias),
    "gemma4": Case("gemma4_text", {"enable_moe_block": True}, truth="probs"),
    "zaya": Case("zaya", {"num_experts_per_tok": 1}, truth="zaya", setup=_zaya_skip, extra=_zaya_skips_stored),
    "lfm2_moe": Case("lfm2_moe", {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0}),
    "granitemoehybrid": Case(
        "granitemoehybrid", {"mamba_n_heads": 8, "layer_types": ["mamba", "attention"]}, **SOFTMAX
    ),
    "kimi_linear": Case("kimi_linear", {"layer_types": ["linear_attention", "full_attention"]}, setup=_bias),
    "bailing_hybrid": Case("bailing_hybrid", {"layer_types": ["linear_attention", "full_attention"]}, setup=_bias),
    "qwen3_5_moe": Case(
        "qwen3_5_moe_text",
        {
            **{"layer_types": ["linear_attention", "full_attention"]},
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        },
        **SOFTMAX,
    ),
    "axk2": Case("axk2", setup=_bias),
    # text towers of multimodal families (base models)
    "qwen3_vl_moe": Case("qwen3_vl_moe_text", base=True),
    "mistral_large4": Case("mistral_large4_text", base=True),
    "muse_spark": Case("muse_spark_text", base=True, setup=_bias),
    "openai_privacy_filter": Case("openai_privacy_filter", base=True),
    # output layouts of their own
    "llama4": Case("llama4_text", truth="llama4"),
    "jetmoe": Case("jetmoe", truth="jetmoe", softmax_topk=False),
    "doge": Case("doge", {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 2}, truth="doge"),
    "dbrx": Case(
        "dbrx",
        {
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 64,
            # transformers 5.23's DbrxAttention reads attn_config.rope_theta, absent from DbrxAttentionConfig,
            # and clamps qkv with clip_qkv unconditionally: both must be given.
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
        },
        truth="dbrx",
        **SOFTMAX,
    ),
}


# -- ground truth ----------------------------------------------------------------------------------------------


def _router_modules(model: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Router modules by name, found by this test's own class-name list (not through moescope)."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ in names}


# Where transformers' declaration names something other than the router module itself.
ROUTER_CLASSES: dict[str, tuple[str, ...]] = {
    "jetmoe": ("JetMoeTopKGating",),
    "deepseek_v4": (
        "DeepseekV4TopKRouter",
        "DeepseekV4HashRouter",
    ),  # only the top-k router is declared  # it also declares JetMoeAttention (index 2), the MoA gating's caller
}


def _truth_hooks(model: Any, case: Case, calls: dict[str, list[dict[str, Any]]]) -> list[Any]:
    """Attach ground-truth hooks; each router call appends {ids, weights, logits, dropped} to calls[module]."""
    handles = []
    declared = ROUTER_CLASSES.get(case.model_type) or _declared_router_classes(model)
    for name, mod in _router_modules(model, declared).items():
        if case.truth == "dbrx":
            # DBRX's router returns logits only: truth for ids/weights is what the block hands the experts.
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            handles.append(mod.register_forward_hook(_mk_dbrx_logits(name, calls)))
            handles.append(parent.experts.register_forward_pre_hook(_mk_dbrx_experts(name, calls)))
        else:
            handles.append(mod.register_forward_hook(_mk_hook(name, case.truth, calls, mod)))
    return handles


def _declared_router_classes(model: Any) -> tuple[str, ...]:
    """The router classes transformers itself declares (``_can_record_outputs['router_logits']``)."""
    names: list[str] = []
    for m in model.modules():
        rec = getattr(type(m), "_can_record_outputs", None) or {}
        spec = rec.get("router_logits")
        for r in spec if isinstance(spec, list) else [spec] if spec is not None else []:
            cls = getattr(r, "target_class", r)
            if isinstance(cls, type):
                names.append(cls.__name__)
    return tuple(dict.fromkeys(names))


def _mk_hook(name: str, kind: str, calls: dict[str, list[dict[str, Any]]], mod: Any) -> Callable[..., None]:
    def hook(module: Any, args: Any, out: Any) -> None:
        if kind == "llama4":
            scores, logits = out  # scores [T, E]: sigmoid(top-k logits) there, 0 elsewhere
            k = module.top_k
            ids = torch.topk(logits, k, dim=1).indices  # the router's own call, on the same tensor
            rec = {"logits": logits, "ids": ids, "weights": scores.gather(1, ids)}
        elif kind == "jetmoe":
            order, _, gates, sizes, logits = out
            k = module.top_k
            # undo the router's sort with a plain loop: sorted positions hold expert 0's slots, then expert 1's, ...
            ids = torch.empty(order.numel(), dtype=torch.long)
            w = torch.empty(order.numel())
            j = 0
            for expert, size in enumerate(sizes):
                for _ in range(size):
                    ids[order[j]] = expert
                    w[order[j]] = gates[j]
                    j += 1
            rec = {"logits": logits, "ids": ids.reshape(-1, k), "weights": w.reshape(-1, k)}
        elif kind == "doge":
            # the family's product-key selection, redone from its per-key logits [2, T, K]
            (sx, sy), (ix, iy) = out[1].topk(module.num_keys, dim=-1)
            scores = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2)
            index = (ix.unsqueeze(-1) * module.num_keys + iy.unsqueeze(-2)).flatten(-2)
            ids = index.gather(-1, scores.topk(module.top_k, dim=-1).indices)
            rec = {"logits": None, "ids": ids, "weights": torch.ones(ids.shape)}  # weights are not observable
        elif kind == "probs":
            # Gemma 4 returns softmax probabilities where other families return logits: log p is their logits
            rec = {"logits": out[0].clamp_min(torch.finfo(torch.float32).tiny).log(), "ids": out[2], "weights": out[1]}
        elif kind == "zaya":
            logits, weights, ids = out[0], out[1], out[2]
            n_cls = module.num_router_classes
            # the family's choice over E + 1 classes (last = skip expert), before the router masks skips to id 0
            probs = torch.softmax(logits.reshape(-1, n_cls), -1) + module.balancing_biases
            full = torch.topk(probs, module.top_k, dim=-1).indices
            skip = full == n_cls - 1
            assert torch.equal(ids.reshape(full.shape)[~skip], full[~skip])
            assert bool((weights.reshape(full.shape)[skip] == 0).all())
            rec = {"logits": logits, "ids": full, "weights": weights}
        elif kind == "switch":
            mask, probs, logits = out
            rec = {"logits": logits, "onehot": mask, "max_prob": probs}
        else:
            logits, weights, ids = out[0], out[1], out[2]
            rec = {"logits": logits, "ids": ids, "weights": weights}
        rec["x"] = args[0] if args and isinstance(args[0], torch.Tensor) else None  # the router's input rows
        calls.setdefault(name, []).append({k: v.detach().clone() for k, v in rec.items() if v is not None})

    return hook


def _mk_dbrx_logits(name: str, calls: dict[str, list[dict[str, Any]]]) -> Callable[..., None]:
    def hook(module: Any, args: Any, out: Any) -> None:
        calls.setdefault(name, []).append({"logits": out.detach().clone(), "x": args[0].detach().clone()})

    return hook


def _mk_dbrx_experts(name: str, calls: dict[str, list[dict[str, Any]]]) -> Callable[..., None]:
    def hook(module: Any, args: Any) -> None:
        calls[name][-1]["ids"] = args[1].detach().clone()
        calls[name][-1]["weights"] = args[2].detach().clone()

    return hook


# -- building and recording ------------------------------------------------------------------------------------


def build(case: Case) -> Any:
    """A tiny random-init model of the family (eval mode, float32)."""
    cls = CONFIG_MAPPING[case.model_type]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    kw = {k: v for k, v in TINY.items() if k in fields}
    kw.update(case.overrides)
    torch.manual_seed(0)
    auto = AutoModel if case.base else AutoModelForCausalLM
    model = auto.from_config(cls(**kw)).eval()
    if case.setup is not None:
        case.setup(model)
    return model


def batches() -> list[tuple[Any, Any]]:
    """(input_ids, attention_mask): a batch with left and right padding, then one without."""
    return padded_batches(B, S)


def read(run: Path, table: str) -> pa.Table:
    """One trace table of a run, read directly from its Parquet parts."""
    parts = sorted((run / table).glob("*.parquet"))
    assert parts, f"no {table} parts in {run}"
    return pa.concat_tables([pq.read_table(p) for p in parts])


def record_case(case: Case, tmp: Path) -> tuple[Any, Path, dict[str, list[dict[str, Any]]], list[Any]]:
    """Record two forwards of the family's tiny model; returns (model, run dir, truth calls, model outputs)."""
    model = build(case)
    calls: dict[str, list[dict[str, Any]]] = {}
    handles = _truth_hooks(model, case, calls)
    assert calls == {} and handles, f"{case.model_type}: no router modules found by the test"
    run = tmp / case.model_type
    outs = []
    try:
        # the flight ring on: the trace must not change, and check_flight compares its rows with the truth
        with moescope.record(model, run, tokens=1.0, flight_steps=2, flight_tokens=FLIGHT_ROWS) as rec, \
                torch.no_grad():
            for step, (x, mask) in enumerate(batches()):
                rec.step = step
                outs.append(model(input_ids=x, attention_mask=mask, output_router_logits=True))
            rec.dump_flight()
    finally:
        for h in handles:
            h.remove()
    return model, run, calls, outs


# -- the checks ------------------------------------------------------------------------------------------------

def check_flight(run: Path, calls: dict[str, list[dict[str, Any]]]) -> None:
    """The flight dump holds, for the sampled tokens of both steps, each router's own input rows, ids, weights and
    logits, exactly (the ring stores them in float64 and the rows in their dtype)."""
    import json

    manifest = {e["layer"]: e for e in json.loads((run / "manifest.json").read_text())["layers"]}
    for info, got in flight_layers(run, [x for x, _mask in batches()]):
        module = info["module"]
        for step in (0, 1):
            truth = calls[module][step]
            names = ["x", "ids", "weights"]
            if "logits" in truth and manifest[info["layer"]].get("lse") is not False:
                names.append("logits")
            for name in names:
                want = truth[name].reshape(B * S, -1)[:FLIGHT_ROWS]
                want = want.float() if want.is_floating_point() else want
                assert (got[name][step] == want.numpy()).all(), f"{module} step {step}: ring {name} ≠ the router's"


def check_trace(case: Case, run: Path, calls: dict[str, list[dict[str, Any]]], outs: list[Any]) -> None:
    """Every assertion of the module docstring, for one recorded family."""
    import json

    manifest = json.loads((run / "manifest.json").read_text())
    layers = {entry["module"]: entry for entry in manifest["layers"]}
    assert set(layers) == set(calls), f"recorder hooked {sorted(layers)}, routers called {sorted(calls)}"
    routing = read(run, "routing").to_pandas()
    load = read(run, "expert_load").to_pandas()
    stats = read(run, "router_stats").to_pandas()
    for step, (_x, mask) in enumerate(batches()):
        valid = mask.reshape(-1).bool()  # [B*S]
        for module, entry in layers.items():
            layer, n_exp = entry["layer"], entry["n_experts"]
            truth = calls[module][step]
            ids, w = truth["ids"].reshape(B * S, -1), truth["weights"].reshape(B * S, -1).float()
            rows = routing[(routing.step == step) & (routing.layer == layer)].sort_values(["seq", "pos"])
            # one row per real token; pos = its position in its text (real tokens before it), padding skipped
            want_seq = torch.arange(B).repeat_interleave(S)[valid]
            want_pos = (mask.cumsum(-1) - 1).reshape(-1)[valid]
            assert rows.seq.tolist() == want_seq.tolist(), f"{module} step {step}: rows ≠ valid tokens"
            assert rows.pos.tolist() == want_pos.tolist(), f"{module} step {step}: pos"
            got_ids = torch.as_tensor(np.stack(rows.experts.to_numpy()).astype(np.int64))
            got_w = torch.as_tensor(np.stack(rows.weights.to_numpy()).astype(np.float32))
            assert torch.equal(got_ids, ids[valid]), f"{module} step {step}: stored ids ≠ the router's ids"
            # the routing table stores weights as float16 (trace schema): compare at that precision
            torch.testing.assert_close(got_w, w[valid].half().float(), rtol=0, atol=0)
            counts = torch.bincount(ids[valid].reshape(-1), minlength=n_exp)
            lo = load[(load.step == step) & (load.layer == layer)].sort_values("expert")
            assert lo.tokens.tolist() == counts.tolist(), f"{module} step {step}: expert_load ≠ bincount"
            st = stats[(stats.step == step) & (stats.layer == layer)]
            assert int(st.tokens.iloc[0]) == int(valid.sum())
            if "logits" not in truth:  # no per-expert logits (Doge): their statistics are unknown (NaN), not 0
                assert math.isnan(float(st.lse_sq_sum.iloc[0])) and st.nonfinite.isna().all()
                assert lo.prob_sum.isna().all()
                continue
            logits = truth["logits"].reshape(B * S, -1).float()[valid]
            got_lse = float(st.lse_sq_sum.iloc[0])
            if entry.get("lse") is False:  # probabilities read as logits (Gemma 4): no z-loss
                assert math.isnan(got_lse) and math.isnan(float(st.lse_max.iloc[0])), f"{module}: lse must be NULL"
                continue
            lse_sq = torch.logsumexp(logits, -1).pow(2).sum().item()
            assert math.isclose(got_lse, lse_sq, rel_tol=1e-5, abs_tol=1e-6), f"{module}: z-loss numerator"
        if case.extra is not None:
            case.extra(routing, layers)
        if case.differs:
            _check_differs(layers, routing, calls, step, valid)
        if case.softmax_topk:
            _check_softmax_topk(case, layers, routing, outs[step], step, valid)
        if case.aux:
            assert_aux_loss(load, outs[step], step, len(layers), int(valid.sum()))


def _check_softmax_topk(case: Case, layers: dict[str, Any], routing: Any, out: Any, step: int, valid: Any) -> None:
    """Where the family selects softmax-top-k, the stored ids are the top-k of the model's output_router_logits."""
    rl = out.router_logits
    assert len(rl) == len(layers)
    for (_, entry), logits in zip(sorted(layers.items(), key=lambda kv: kv[1]["layer"]), rl):
        k = entry["top_k"]
        ref = torch.topk(torch.softmax(logits.float().reshape(B * S, -1), -1), k, -1).indices[valid]
        rows = routing[(routing.step == step) & (routing.layer == entry["layer"])].sort_values(["seq", "pos"])
        got = torch.as_tensor(np.stack(rows.experts.to_numpy()).astype(np.int64))
        assert torch.equal(got.sort(-1).values, ref.sort(-1).values)


def _check_differs(layers: dict[str, Any], routing: Any, calls: dict[str, Any], step: int, valid: Any) -> None:
    """Biased (DeepSeek-V3-style) selection: somewhere the stored ids are not softmax-top-k of the logits."""
    differ = 0
    for module, entry in layers.items():
        logits = calls[module][step]["logits"].reshape(B * S, -1).float()[valid]
        ref = torch.topk(torch.softmax(logits, -1), entry["top_k"], -1).indices.sort(-1).values
        rows = routing[(routing.step == step) & (routing.layer == entry["layer"])].sort_values(["seq", "pos"])
        got = torch.as_tensor(np.stack(rows.experts.to_numpy()).astype(np.int64)).sort(-1).values
        differ += int((got != ref).any(-1).sum())
    assert differ > 0, "biased router selected exactly softmax-top-k everywhere: the test proves nothing"


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_trace_matches_router(family: str, tmp_path: Path) -> None:
    """The trace holds exactly the router's ids/weights for every non-padded token and layer."""
    case = CASES[family]
    _, run, calls, outs = record_case(case, tmp_path)
    check_trace(case, run, calls, outs)
    check_flight(run, calls)


def test_switch_transformers_capacity_aux_and_z_loss(tmp_path: Path) -> None:
    """Switch: one-hot dispatch after capacity; aux loss and z-loss from the trace equal transformers' own."""
    from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    cfg = SwitchTransformersConfig(
        vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=4, num_sparse_encoder_layers=2,
        num_decoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SwitchTransformersEncoderModel(cfg).eval()
    calls: dict[str, list[dict[str, Any]]] = {}
    handles = [
        m.register_forward_hook(_mk_hook(n, "switch", calls, m))
        for n, m in _router_modules(model, ("SwitchTransformersTop1Router",)).items()
    ]
    g = torch.Generator().manual_seed(0)
    s_len = 8
    pad = torch.ones(2, s_len, dtype=torch.long)
    pad[1, :3] = 0
    inputs = [  # (ids, mask): one sequence (transformers' aux loss groups by sequence), padded pair, unpadded pair
        (torch.randint(3, 100, (1, s_len), generator=g), torch.ones(1, s_len, dtype=torch.long)),
        (torch.randint(3, 100, (2, s_len), generator=g), pad),
        (torch.randint(3, 100, (2, s_len), generator=g), torch.ones(2, s_len, dtype=torch.long)),
    ]
    outs = []
    run = tmp_path / "switch"
    with moescope.record(model, run, tokens=1.0) as rec, torch.no_grad():
        for step, (x, mask) in enumerate(inputs):
            rec.step = step
            outs.append(model(input_ids=x, attention_mask=mask, output_router_logits=True))
    for h in handles:
        h.remove()
    import json

    layers = {e["module"]: e for e in json.loads((run / "manifest.json").read_text())["layers"]}
    assert set(layers) == set(calls) and all(e["top_k"] == 1 and e["n_experts"] == 4 for e in layers.values())
    routing = read(run, "routing").to_pandas()
    load = read(run, "expert_load").to_pandas()
    stats = read(run, "router_stats").to_pandas()
    n_dropped = 0
    for step, (x, mask) in enumerate(inputs):
        valid = mask.reshape(-1).bool()
        for module, entry in layers.items():
            t = calls[module][step]
            onehot = t["onehot"].reshape(-1, 4)
            logits = t["logits"].reshape(-1, 4).float()
            dropped = onehot.sum(-1) == 0
            # kept tokens: the dispatch mask's expert; dropped ones: the expert they chose (the router's argmax)
            assert torch.equal(onehot.argmax(-1)[~dropped], logits.argmax(-1)[~dropped])
            ids = torch.where(dropped, logits.argmax(-1), onehot.argmax(-1))[valid]
            rows = routing[(routing.step == step) & (routing.layer == entry["layer"])].sort_values(["seq", "pos"])
            got = torch.as_tensor(np.stack(rows.experts.to_numpy()).astype(np.int64)).reshape(-1)
            assert torch.equal(got, ids)
            got_w = torch.as_tensor(np.stack(rows.weights.to_numpy()).astype(np.float32)).reshape(-1)
            assert torch.equal(got_w, t["max_prob"].reshape(-1)[valid].half().float())
            lo = load[(load.step == step) & (load.layer == entry["layer"])].sort_values("expert")
            assert lo.tokens.tolist() == torch.bincount(ids, minlength=4).tolist()
            st = stats[(stats.step == step) & (stats.layer == entry["layer"])]
            assert int(st.dropped.iloc[0]) == int(dropped[valid].sum())
            n_dropped += int(dropped[valid].sum())
        if bool(mask.all()):
            # transformers: z-loss over every layer's logits concatenated along the sequence
            cat = torch.cat([o.float() for o in outs[step].router_logits], dim=1)  # [B, L*S, E]
            z_ref = float(sw.router_z_loss_func(cat))
            st = stats[stats.step == step]
            assert math.isclose(float(st.lse_sq_sum.sum() / st.tokens.sum()), z_ref, rel_tol=1e-5)
            if x.shape[0] == 1:
                # aux: N²·mean_e(f_e·P_e) per sequence group, f from argmax over all layers (before capacity)
                aux_ref = float(sw.load_balancing_loss_func(torch.softmax(cat, -1), cat.argmax(-1)))
                lo = load[load.step == step].groupby("expert")[["tokens", "prob_sum"]].sum().sort_index()
                n_tok = float(st.tokens.sum())  # L·S
                aux = 4 * float(((lo.tokens / n_tok) * (lo.prob_sum / n_tok)).sum())
                assert math.isclose(aux, aux_ref, rel_tol=1e-5), (aux, aux_ref)
    assert n_dropped > 0, "capacity 3 over 8 tokens should drop some: the dropped path went untested"


def _generate(left_pad: int, tmp: Path) -> tuple[Any, Any, Path, dict[str, list[dict[str, Any]]], Any]:
    """Greedy generate 5 tokens on a tiny Mixtral under recording; sequence 1 has `left_pad` pad tokens."""
    case = CASES["mixtral"]
    model = build(case)
    model.generation_config.pad_token_id = 0
    x = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :left_pad] = 0
    x[1, :left_pad] = 0
    calls: dict[str, list[dict[str, Any]]] = {}
    handles = _truth_hooks(model, case, calls)
    run = tmp / f"gen-{left_pad}"
    with moescope.record(model, run, tokens=1.0), torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for h in handles:
        h.remove()
    return x, mask, run, calls, out


@pytest.mark.parametrize("left_pad", [0, 2])
def test_generate_records_prefill_and_every_decode_step(left_pad: int, tmp_path: Path) -> None:
    """Prefill + 4 decode forwards: rows per decode step = batch, pos continues the sequence, ids = router's."""
    x, mask, run, calls, out = _generate(left_pad, tmp_path)
    routing = read(run, "routing").to_pandas()
    stats = read(run, "router_stats").to_pandas()
    n_layers, s_len = 2, x.shape[1]
    assert sorted(routing.step.unique()) == [0, 1, 2, 3, 4]  # 5 new tokens: the last one is never fed back
    assert sorted(routing.layer.unique()) == list(range(n_layers))
    n_real = int(mask.sum())
    # prefill: one row per real token and layer; padded positions are in neither rows nor counts
    pre = routing[routing.step == 0]
    assert len(pre) == n_real * n_layers
    assert stats[stats.step == 0].tokens.tolist() == [n_real] * n_layers
    for step in range(1, 5):
        dec = routing[routing.step == step]
        assert len(dec) == x.shape[0] * n_layers and sorted(dec.seq.unique()) == [0, 1]
        assert stats[stats.step == step].tokens.tolist() == [x.shape[0]] * n_layers
    for seq in range(2):
        rows = routing[(routing.seq == seq) & (routing.layer == 0)].sort_values(["step", "pos"])
        real = int(mask[seq].sum())
        # pos is the token's position in its text: 0..S-1 over the prefill, then S, S+1, ... one per decode step
        assert rows.pos.tolist() == list(range(real + 4)), rows.pos.tolist()
        # the token fed at each position: the prompt's real tokens, then the generated ones
        fed = out[seq, s_len - real : s_len + 4].tolist()
        assert rows.token_id.tolist() == fed
    # ids per (step, layer) are what the router returned, padded prefill tokens left out
    for module, calls_m in calls.items():
        layer = int(module.split(".")[2])
        for step, truth in enumerate(calls_m):
            valid = mask.reshape(-1).bool() if step == 0 else torch.ones(x.shape[0], dtype=torch.bool)
            rows = routing[(routing.step == step) & (routing.layer == layer)].sort_values(["seq", "pos"])
            got = torch.as_tensor(np.stack(rows.experts.to_numpy()).astype(np.int64))
            assert torch.equal(got, truth["ids"].reshape(valid.numel(), -1)[valid])


def test_pos_is_the_same_with_and_without_position_ids(tmp_path: Path) -> None:
    """A left-padded prompt's first real token has the same pos whether or not position_ids are passed."""
    model = build(CASES["mixtral"])
    x = torch.randint(3, 100, (1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    pos_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes
    with moescope.record(model, tmp_path / "p", tokens=1.0) as rec, torch.no_grad():
        rec.step = 0
        model(input_ids=x, attention_mask=mask)
        rec.step = 1
        model(input_ids=x, attention_mask=mask, position_ids=pos_ids)
    r = read(tmp_path / "p", "routing").to_pandas()
    a = r[(r.step == 0) & (r.layer == 0)].sort_values("pos").pos.tolist()
    b = r[(r.step == 1) & (r.layer == 0)].sort_values("pos").pos.tolist()
    assert a == b, (a, b)


@pytest.mark.parametrize("dec_len", [6, 4])
def test_switch_encoder_decoder_decoder_tokens(dec_len: int, tmp_path: Path) -> None:
    """Decoder routers are recorded against the decoder's own tokens (ids, mask), not the encoder's."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_sparse_encoder_layers=1,
        num_decoder_layers=2, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=16,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    x = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    dec = torch.randint(3, 100, (2, dec_len))
    with moescope.record(model, tmp_path / "r", tokens=1.0), torch.no_grad():
        model(input_ids=x, attention_mask=mask, decoder_input_ids=dec)
    import json

    layers = json.loads((tmp_path / "r" / "manifest.json").read_text())["layers"]
    dec_layer = next(e["layer"] for e in layers if e["module"].startswith("decoder."))
    stats = read(tmp_path / "r", "router_stats").to_pandas()
    assert int(stats[stats.layer == dec_layer].tokens.iloc[0]) == 2 * dec_len
    rows = read(tmp_path / "r", "routing").to_pandas()
    rows = rows[rows.layer == dec_layer].sort_values(["seq", "pos"])
    assert rows.token_id.tolist() == dec.reshape(-1).tolist()


# Routers whose families need a multimodal model to run end to end: the router module alone, built from its own
# (tiny) config and fed random hidden states, must be read exactly by its spec. (model type, router class).
ROUTER_ONLY: list[tuple[str, str, dict[str, Any]]] = [
    ("mistral4", "Mistral4TopkRouter", {}),
    ("glm4v_moe_text", "Glm4vMoeTextTopkRouter", {}),
    ("glm5_next_text", "Glm5NextTextTopkRouter", {"qk_rope_head_dim": 0}),  # its DSA layers are NoPE-only
    ("ernie4_5_vl_moe_text", "Ernie4_5_VLMoeMoeTopKRouter", {"moe_intermediate_size": [32, 32], "moe_k": 2}),
    ("qwen3_omni_moe_text", "Qwen3OmniMoeTextTopKRouter", {}),
    ("qwen3_omni_moe_text", "Qwen3OmniMoeThinkerTextTopKRouter", {}),
    ("qwen3_omni_moe_talker_text", "Qwen3OmniMoeTalkerTextTopKRouter", {}),
    ("deepseek_ocr2_text", "DeepseekOcr2TextTopkRouter", {}),
    ("unlimited_ocr_text", "UnlimitedOcrTextTopkRouter", {}),
    ("diffusion_gemma_text", "DiffusionGemmaTextRouter", {}),
    ("mimo_v2_flash", "MiMoV2FlashTopkRouter", {}),
    ("qwen4_exp_text", "Qwen4ExpTextTopKRouter", {}),
    ("step3p7:Step3p7TextConfig", "Step3p7TopKRouter", {}),
]


def _config_class(name: str) -> Any:
    """A config class by model type, or 'dir:ClassName' for sub-configs the auto mapping does not list."""
    import importlib

    if ":" in name:
        pkg, cls_name = name.split(":")
        return getattr(importlib.import_module(f"transformers.models.{pkg}.configuration_{pkg}"), cls_name)
    return CONFIG_MAPPING[name]


@pytest.mark.parametrize(("model_type", "router_cls", "overrides"), ROUTER_ONLY)
def test_router_module_alone_is_read_exactly(model_type: str, router_cls: str, overrides: dict[str, Any]) -> None:
    """The spec's output indices, n_experts and top_k fit the router as transformers defines it."""
    import importlib

    from moescope.capture import adapters as A

    cls = _config_class(model_type)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    kw = {k: v for k, v in {**TINY, **overrides}.items() if k in fields}
    cfg = cls(**kw)
    mod = importlib.import_module(cls.__module__.replace(".configuration_", ".modeling_"))
    torch.manual_seed(0)
    router = getattr(mod, router_cls)(cfg)
    torch.nn.init.normal_(next(router.parameters()))
    spec = A.resolve(router)
    assert spec is not None, f"{router_cls} resolves to no spec"
    n, k = A.router_shape(router, spec, None)
    assert (n, k) == (8, 2)
    hidden = torch.randn(B * S, cfg.hidden_size)
    extra = [torch.zeros(8)] if "bias" in str(router.forward.__code__.co_varnames) else []
    with torch.no_grad():
        out = router(hidden, *extra)
    ev = A.extract_router_output(spec, out, n, k)
    assert ev is not None and torch.equal(ev.ids, out[2].reshape(B * S, k).long())
    torch.testing.assert_close(ev.weights, out[1].reshape(B * S, k).float())
    assert ev.logits is not None and ev.logits.shape == (B * S, n)
    if spec.logits_are == "probs":
        torch.testing.assert_close(torch.softmax(ev.logits, -1), out[0].float())
    else:
        assert torch.equal(ev.logits, out[0].reshape(B * S, n).float())


if __name__ == "__main__":  # triage: python tests/test_hf_families.py FAMILY...
    import sys
    import tempfile
    import traceback

    for fam in sys.argv[1:] or sorted(CASES):
        t0 = time.time()
        try:
            c = CASES[fam] if fam in CASES else Case(fam)
            _, r, cl, o = record_case(c, Path(tempfile.mkdtemp()))
            check_trace(c, r, cl, o)
            print(f"OK   {fam} {time.time() - t0:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - triage prints every failure
            print(f"FAIL {fam}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            if len(sys.argv) == 2:
                traceback.print_exc()

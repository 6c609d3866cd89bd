"""The router-spec vocabulary, known answers on tiny hand-built routers: every layout is recorded exactly as the
router itself returned or dispatched it (its own output, read by a hook of the test), ids that are no expert
count as dropped in every table, a wrong spec is one warning naming the field to change, and no moescope hook
failure reaches the user's forward."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import moescope  # noqa: E402
from moescope.capture import adapters as A  # noqa: E402
from moescope.capture import specs as S  # noqa: E402

B, SEQ, H, V = 2, 12, 8, 40


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test do not leak into other tests."""
    A.all_specs()
    monkeypatch.setattr(S.REGISTRY, "entries", list(S.REGISTRY.entries))


# -- tiny routers in the layouts of the frameworks ---------------------------------------------------------------


class KFirstGate(nn.Module):
    """DeepSpeed-style: (logits [T, E], weights [k, T], ids [k, T]); routes over capacity get id -1, weight 0."""

    def __init__(self, n_experts: int = 4, k: int = 2, capacity: int = 5) -> None:
        super().__init__()
        self.wg = nn.Linear(H, n_experts, bias=False)
        self.num_experts, self.k, self.capacity = n_experts, k, capacity

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.wg(x)  # [T, E]
        w, ids = logits.softmax(-1).topk(self.k, -1)  # [T, k]
        ids_kt, w_kt = ids.t(), w.t()  # [k, T]: first choices of every token first, as DeepSpeed fills capacity
        onehot = F.one_hot(ids_kt.reshape(-1), self.num_experts)  # [k*T, E]
        position = (onehot.cumsum(0) * onehot).sum(-1).reshape(ids_kt.shape)  # [k, T]: 1-based place in the queue
        keep = position <= self.capacity
        return logits, torch.where(keep, w_kt, 0.0), torch.where(keep, ids_kt, -1)


class MapRouter(nn.Module):
    """Megatron-style: (probs [T, E], routing_map [T, E] bool); a token's second choice only above 0.2."""

    def __init__(self, n_experts: int = 6, topk: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(H, n_experts, bias=False)
        self.num_experts, self.topk = n_experts, topk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)  # [T, E]
        scores, top = logits.softmax(-1).topk(self.topk, -1)  # [T, k]
        keep = torch.ones_like(top, dtype=torch.bool)
        keep[:, 1:] = scores[:, 1:] > 0.2  # a variable number of experts per token: 1 or 2
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, keep)  # [T, E]
        probs = torch.zeros_like(logits).scatter(1, top, scores) * routing_map  # [T, E]
        return probs, routing_map


class DispatchGate(nn.Module):
    """GShard/lucidrains-style top-2: (dispatch [b, n, E, C], combine [b, n, E, C], loss); 0-2 experts per token."""

    def __init__(self, n_experts: int = 4, capacity: int = 3) -> None:
        super().__init__()
        self.w_gating = nn.Parameter(torch.randn(H, n_experts))
        self.num_gates, self.capacity = n_experts, capacity

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e, c = self.num_gates, self.capacity
        gates = (x @ self.w_gating).softmax(-1)  # [b, n, E]
        g1, i1 = gates.max(-1)
        m1 = F.one_hot(i1, e).float()  # [b, n, E]
        g2, i2 = (gates * (1 - m1)).max(-1)
        m2 = F.one_hot(i2, e).float() * (g2 > 0.2)[..., None]  # second expert only for a confident second choice
        p1 = m1.cumsum(-2) - 1  # [b, n, E]: place in the expert's queue, per sequence
        m1 = m1 * (p1 < c)
        p2 = m2.cumsum(-2) - 1 + m1.sum(-2, keepdim=True)
        m2 = m2 * (p2 < c)
        d1 = m1[..., None] * F.one_hot(p1.clamp(0, c - 1).long(), c)  # [b, n, E, C]
        d2 = m2[..., None] * F.one_hot(p2.clamp(0, c - 1).long(), c)
        norm = (g1 + g2 * (m2.sum(-1) > 0)).clamp_min(1e-9)  # [b, n]
        combine = d1 * (g1 / norm)[..., None, None] + d2 * (g2 / norm)[..., None, None]
        return (d1 + d2).bool(), combine, gates.mean()


class ScoreRouter(nn.Module):
    """torchtitan-style: (top_scores [T, k], selected [T, k], tokens per expert [E]); the logits are `gate`'s output."""

    def __init__(self, n_experts: int = 6, top_k: int = 2, score: str = "sigmoid") -> None:
        super().__init__()
        self.gate = nn.Linear(H, n_experts, bias=False)
        self.num_experts, self.top_k, self.score = n_experts, top_k, score

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate(x)  # [T, E]
        scores = torch.sigmoid(logits) if self.score == "sigmoid" else logits.softmax(-1)
        top, sel = scores.topk(self.top_k, -1)  # [T, k]
        return top, sel, torch.histc(sel.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)


class ProbsRouter(ScoreRouter):
    """Returns its sigmoid scores [T, E] where others return logits: (scores, top_scores, selected)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        scores = torch.sigmoid(self.gate(x))  # [T, E]
        top, sel = scores.topk(self.top_k, -1)
        return scores, top, sel


class OddRouter(nn.Module):
    """An output no layout describes: a namespace with a flat [T*k] choice list, -1 for 'no expert'."""

    def __init__(self, n_experts: int = 5, k: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(H, n_experts, bias=False)
        self.n, self.k = n_experts, k

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        logits = self.proj(x)  # [T, E]
        w, ids = logits.softmax(-1).topk(self.k, -1)
        ids = torch.where(w < 0.25, -1, ids)  # weak choices are skipped
        return SimpleNamespace(choice=ids.reshape(-1), gate=w.reshape(-1), raw=logits)


def odd_ids(module: OddRouter, args: tuple[Any, ...], out: SimpleNamespace) -> tuple[Any, Any, Any]:
    """The ids_fn of OddRouter: (logits [T, E], ids [T, k] with -1 = none, weights [T, k])."""
    return out.raw, out.choice.reshape(-1, module.k), out.gate.reshape(-1, module.k)


class Block(nn.Module):
    def __init__(self, router: nn.Module, seq_first: bool = False, three_d: bool = False) -> None:
        super().__init__()
        self.router, self.seq_first, self.three_d = router, seq_first, three_d

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.transpose(0, 1) if self.seq_first else h  # [S, B, H] in Megatron's order
        self.router(x if self.three_d else x.reshape(-1, H))
        return h


class Model(nn.Module):
    def __init__(self, router: nn.Module, seq_first: bool = False, three_d: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.block = Block(router, seq_first, three_d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(self.emb(input_ids))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, SEQ), generator=g)
    mask = torch.ones(B, SEQ, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return x, mask


def record(model: nn.Module, path: Path, **kw: Any) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
    """Record one forward; returns what the router returned (its own hook), the input ids and the mask."""
    seen: list[Any] = []
    h = model.block.router.register_forward_hook(lambda m, a, out: seen.append(out))
    x, mask = inputs()
    try:
        with moescope.record(model, path, tokens=1.0, **kw), torch.no_grad():
            model(x, attention_mask=mask)
    finally:
        h.remove()
    return seen, x, mask


def read(path: Path, table: str) -> list[dict[str, Any]]:
    return pq.read_table(path / table).to_pylist()


def load(path: Path) -> dict[str, np.ndarray]:
    rows = sorted(read(path, "expert_load"), key=lambda r: r["expert"])
    return {k: np.array([r[k] for r in rows]) for k in ("tokens", "prob_sum", "weight_sum")}


def stats(path: Path) -> dict[str, Any]:
    (row,) = read(path, "router_stats")
    return row


def routing(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Token rows by (sequence, index in the input): `pos` counts real tokens, so left padding shifts it."""
    _, mask = inputs()
    pad = (mask == 0).sum(-1).tolist()  # [B] left-padding tokens per sequence
    return {(r["seq"], r["pos"] + pad[r["seq"]]): r for r in read(path, "routing")}


# -- [k, T] ids with a sentinel (DeepSpeed) ---------------------------------------------------------------------


def test_k_first_with_sentinel_counts_dropped_routes_in_every_table(tmp_path: Path, registry: None) -> None:
    moescope.register_router(KFirstGate, ids_layout="k_first", sentinel=-1, n_experts="num_experts", top_k="k")
    torch.manual_seed(0)
    (out,), x, mask = record(Model(KFirstGate()), tmp_path / "r")
    ids, w = out[2].t(), out[1].t()  # [T, k] as the router dispatched them
    valid = mask.reshape(-1).bool()
    kept = ids[valid]
    assert (kept == -1).any() and (kept >= 0).any()  # the capacity really dropped routes of real tokens
    got = load(tmp_path / "r")
    assert got["tokens"].tolist() == np.bincount(kept[kept >= 0].numpy(), minlength=4).tolist()
    wsum = np.bincount(kept[kept >= 0].numpy(), weights=w[valid][kept >= 0].numpy(), minlength=4)
    np.testing.assert_allclose(got["weight_sum"], wsum, rtol=1e-5)
    st = stats(tmp_path / "r")
    assert st["tokens"] == int(valid.sum()) and st["dropped"] == int((kept == -1).sum())
    rows = routing(tmp_path / "r")
    assert len(rows) == int(valid.sum())
    for (b, s), r in rows.items():
        truth = ids[b * SEQ + s].tolist()
        assert r["experts"] == [None if e < 0 else e for e in truth]  # a dropped route is NULL, never expert 0
        assert r["token_id"] == int(x[b, s])
    # the routing table agrees with expert_load: the same assignments, counted from the token rows
    from_rows = np.bincount([e for r in rows.values() for e in r["experts"] if e is not None], minlength=4)
    assert from_rows.tolist() == got["tokens"].tolist()


def test_a_naive_spec_is_one_warning_naming_the_field(tmp_path: Path, registry: None) -> None:
    """Read as [T, k], the [k, T] ids would record T = 2 tokens: the first call says to set ids_layout."""
    moescope.register_router(KFirstGate, n_experts="num_experts", top_k="k")
    torch.manual_seed(0)
    model = Model(KFirstGate())
    x, mask = inputs()
    before = model(x, attention_mask=mask)
    with pytest.warns(RuntimeWarning) as caught:
        with moescope.record(model, tmp_path / "r") as rec, torch.no_grad():
            after = model(x, attention_mask=mask)
            model(x, attention_mask=mask)  # the layer stays off: one warning, not one per call
    msgs = [str(w.message) for w in caught if "stopped" in str(w.message)]
    assert len(msgs) == 1
    assert msgs[0] == (
        "moescope: capture of layer 0 (block.router, spec 'KFirstGate') stopped: AdapterError: spec 'KFirstGate': "
        f"ids has shape [2, {B * SEQ}] but top_k=2, T={B * SEQ}: looks like [k, T]; set ids_layout = \"k_first\"")
    assert torch.equal(before, after) and rec.disabled_layers[0]["family"] == "KFirstGate"
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert [(d["layer"], d["family"]) for d in man["counters"]["disabled_layers"]] == [(0, "KFirstGate")]
    assert not (tmp_path / "r" / "expert_load").exists()  # nothing recorded rather than a wrong trace


def test_an_unknown_out_of_range_id_names_sentinel(tmp_path: Path, registry: None) -> None:
    moescope.register_router(KFirstGate, ids_layout="k_first", n_experts="num_experts", top_k="k")
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match=re.escape("holds id -1, outside [0, 4) (n_experts=4): if -1 means "
                                                      "'no expert' set sentinel = -1")):
        record(Model(KFirstGate()), tmp_path / "r")


# -- [T, E] routing maps, sequence-first (Megatron) -------------------------------------------------------------


def test_seq_first_routing_map_rows_match_their_tokens(tmp_path: Path, registry: None) -> None:
    spec = dict(ids_layout="routing_map", ids=1, weights=0, logits_from="gate", top_k="topk",
                n_experts="num_experts")
    moescope.register_router(MapRouter, token_layout="seq_first", **spec)
    torch.manual_seed(0)
    model = Model(MapRouter(), seq_first=True)
    (out,), x, mask = record(model, tmp_path / "r")
    probs, rmap = (t.reshape(SEQ, B, -1).transpose(0, 1).reshape(B * SEQ, -1) for t in out)  # [B*S, E]
    valid = mask.reshape(-1).bool()
    n_sel = rmap.sum(-1)
    assert {1, 2} <= set(n_sel[valid].tolist())  # tokens with one and with two experts
    rows = routing(tmp_path / "r")
    assert len(rows) == int(valid.sum())
    for (b, s), r in rows.items():
        t = b * SEQ + s
        chosen = sorted(torch.nonzero(rmap[t]).reshape(-1).tolist())
        assert sorted(e for e in r["experts"] if e is not None) == chosen, (b, s)
        assert r["experts"][0] == int(probs[t].argmax())  # slot 0 is the first choice
        assert r["experts"].count(None) == 2 - len(chosen)  # a missing second expert is a dropped slot
        assert r["token_id"] == int(x[b, s])
    got = load(tmp_path / "r")
    assert got["tokens"].tolist() == rmap[valid].sum(0).tolist()
    np.testing.assert_allclose(got["weight_sum"], probs[valid].sum(0).numpy(), rtol=1e-5)
    gate_logits = model.block.router.gate(model.emb(x).reshape(-1, H))  # [B*S, E], batch-first order
    np.testing.assert_allclose(got["prob_sum"], gate_logits.softmax(-1)[valid].sum(0).detach().numpy(), rtol=1e-5)
    st = stats(tmp_path / "r")
    assert st["tokens"] == int(valid.sum()) and st["dropped"] == int((2 - n_sel[valid]).sum())

    # the same router read batch-first: the counts agree, but most rows sit on another token
    moescope.register_router(MapRouter, **spec)
    record(model, tmp_path / "naive")
    wrong = sum(sorted(e for e in r["experts"] if e is not None)
                != sorted(torch.nonzero(rmap[b * SEQ + s]).reshape(-1).tolist())
                for (b, s), r in routing(tmp_path / "naive").items())
    assert wrong > SEQ // 2
    assert load(tmp_path / "naive")["tokens"].sum() > 0


def test_routing_map_read_as_ids_and_too_many_experts_are_named(registry: None) -> None:
    torch.manual_seed(0)
    out = MapRouter()(torch.randn(10, H))
    assert out[1].sum(-1).max() == 2
    topk = A.RouterSpec("m", ("X",), ids=1, weights=0)
    with pytest.raises(A.AdapterError, match=re.escape('looks like a [T, E] routing map (E=6); set ids_layout = '
                                                       '"routing_map"')):
        A.check_output(topk, out, 6, 2, None)
    rmap = A.RouterSpec("m", ("X",), ids=1, weights=0, ids_layout="routing_map")
    A.check_output(rmap, out, 6, 2, None)  # top_k = 2 holds every token's experts
    with pytest.raises(A.AdapterError, match=re.escape("sends a token to 2 experts but top_k=1: set top_k = 2")):
        A.check_output(rmap, out, 6, 1, None)


# -- dispatch / combine masks with a capacity axis (GShard, lucidrains) ----------------------------------------


def test_dispatch_mask_with_capacity(tmp_path: Path, registry: None) -> None:
    moescope.register_router(DispatchGate, ids_layout="dispatch", ids=0, weights=1, logits_are="none",
                             n_experts="num_gates", top_k=2)
    torch.manual_seed(3)
    (out,), x, mask = record(Model(DispatchGate(), three_d=True), tmp_path / "r")
    dispatch, combine = out[0].reshape(B * SEQ, 4, -1), out[1].reshape(B * SEQ, 4, -1)  # [T, E, C]
    chosen = dispatch.any(-1)  # [T, E]
    gate = combine.sum(-1)  # [T, E]
    valid = mask.reshape(-1).bool()
    n_sel = chosen.sum(-1)
    assert {0, 1, 2} <= set(n_sel[valid].tolist())  # tokens with no, one and two experts
    got = load(tmp_path / "r")
    assert got["tokens"].tolist() == chosen[valid].sum(0).tolist()
    np.testing.assert_allclose(got["weight_sum"], gate[valid].sum(0).numpy(), rtol=1e-5)
    st = stats(tmp_path / "r")
    assert st["tokens"] == int(valid.sum()) and st["dropped"] == int((2 - n_sel[valid]).sum())
    for (b, s), r in routing(tmp_path / "r").items():
        t = b * SEQ + s
        assert sorted(e for e in r["experts"] if e is not None) == torch.nonzero(chosen[t]).reshape(-1).tolist()
        for e, wt in zip(r["experts"], r["weights"], strict=True):
            assert (wt is None) if e is None else abs(wt - float(gate[t, e])) < 1e-3


# -- scores without logits (torchtitan) -------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_logits_from_a_submodule_and_sigmoid_prob_sum(tmp_path: Path, registry: None, score: str) -> None:
    moescope.register_router(ScoreRouter, weights=0, ids=1, logits_from="gate", probs=score)
    torch.manual_seed(0)
    model = Model(ScoreRouter(score=score))
    (out,), x, mask = record(model, tmp_path / "r")
    valid = mask.reshape(-1).bool()
    logits = model.block.router.gate(model.emb(x).reshape(-1, H)).detach()  # [T, E]
    scores = torch.sigmoid(logits) if score == "sigmoid" else logits.softmax(-1)
    got = load(tmp_path / "r")
    np.testing.assert_allclose(got["prob_sum"], scores[valid].sum(0).numpy(), rtol=1e-5)  # the scores themselves
    assert got["tokens"].tolist() == np.bincount(out[1][valid].reshape(-1).numpy(), minlength=6).tolist()
    np.testing.assert_allclose(got["weight_sum"].sum(), float(out[0][valid].sum()), rtol=1e-5)


def test_sigmoid_scores_in_place_of_logits(tmp_path: Path, registry: None) -> None:
    """logits_are='probs' with probs='sigmoid': prob_sum is the sum of the scores the router returned."""
    moescope.register_router(ProbsRouter, logits=0, weights=1, ids=2, logits_are="probs", probs="sigmoid")
    torch.manual_seed(0)
    (out,), _, mask = record(Model(ProbsRouter()), tmp_path / "r")
    valid = mask.reshape(-1).bool()
    np.testing.assert_allclose(load(tmp_path / "r")["prob_sum"], out[0][valid].sum(0).numpy(), rtol=1e-5)


# -- the ids_fn escape hatch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_path", [False, True])
def test_ids_fn(tmp_path: Path, registry: None, as_path: bool) -> None:
    fn: Any = f"{__name__}:odd_ids" if as_path else odd_ids
    moescope.register_router(OddRouter, ids_fn=fn, n_experts="n", top_k="k")
    torch.manual_seed(0)
    (out,), _, mask = record(Model(OddRouter()), tmp_path / "r")
    ids = out.choice.reshape(-1, 2)
    valid = mask.reshape(-1).bool()
    kept = ids[valid]
    assert (kept == -1).any()
    assert load(tmp_path / "r")["tokens"].tolist() == np.bincount(kept[kept >= 0].numpy(), minlength=5).tolist()
    np.testing.assert_allclose(load(tmp_path / "r")["prob_sum"], out.raw.softmax(-1)[valid].sum(0).numpy(),
                               rtol=1e-5)
    assert stats(tmp_path / "r")["dropped"] == int((kept == -1).sum())


# -- hook safety ------------------------------------------------------------------------------------------------


class ExpertsRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(H, 4, bias=False)
        self.num_experts, self.top_k = 4, 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Experts(nn.Module):
    def forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * w.sum(-1, keepdim=True)


class ExpertsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router, self.experts = ExpertsRouter(), Experts()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, H)
        w, ids = self.router(x).softmax(-1).topk(2, -1)
        return h + self.experts(x, ids=ids, w=w).reshape(h.shape)


class ExpertsModel(Model):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.emb = nn.Embedding(V, H)
        self.block = ExpertsBlock()


def test_a_failing_experts_pre_hook_never_reaches_the_forward(tmp_path: Path, registry: None) -> None:
    """Extraction in the experts pre-hook fails (the spec names a keyword the experts do not get)."""
    moescope.register_router(ExpertsRouter, source="experts_input", logits=None, experts_ids="expert_ids",
                             experts_weights="w", family="mine")
    torch.manual_seed(0)
    model = ExpertsModel()
    x, mask = inputs()
    before = model(x, attention_mask=mask)
    with pytest.warns(RuntimeWarning, match=re.escape("capture of layer 0 (block.router, spec 'mine') stopped: "
                                                      "AdapterError: mine: experts input has no ids tensor")):
        with moescope.record(model, tmp_path / "r"), torch.no_grad():
            after = model(x, attention_mask=mask)
    assert torch.equal(before, after)
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["counters"]["disabled_layers"][0]["error"].startswith("AdapterError: mine: experts input has no ids")


def test_a_failing_entry_hook_never_reaches_the_forward(tmp_path: Path, registry: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope.capture.recorder import Recorder

    moescope.register_router(ScoreRouter, weights=0, ids=1, logits_from="gate", probs="sigmoid")

    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("grid")

    monkeypatch.setattr(Recorder, "_fill_grid", broken)
    torch.manual_seed(0)
    model = Model(ScoreRouter())
    x, mask = inputs()
    with pytest.warns(RuntimeWarning, match=r"reading the token grid at Model's input failed \(RuntimeError: grid\)"):
        with moescope.record(model, tmp_path / "r"), torch.no_grad():
            model(x, attention_mask=mask)
            model(x, attention_mask=mask)
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["counters"]["entry_hook_errors"] == 2
    assert sum(r["tokens"] for r in read(tmp_path / "r", "router_stats")) == 2 * B * SEQ  # no mask: every token


# -- the spec fields themselves ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ids_layout": "kt"}, "ids_layout must be one of"),
        ({"token_layout": "sbh"}, "token_layout must be one of"),
        ({"sentinel": "-1"}, "sentinel must be an integer id"),
        ({"sentinel": True}, "sentinel must be an integer id"),
        ({"logits_from": ""}, "logits_from must be the dotted path"),
        ({"ids_fn": "pkg.module.function"}, 'ids_fn must be "pkg.module:function" or a callable'),
        ({"ids_fn": "x:y", "source": "logits"}, 'ids_fn reads the router\'s forward; it needs source = "output"'),
        ({"ids_layout": "routing_map", "onehot": True}, "unset onehot"),
        ({"settings": ["temperature", "config..scale"]}, "settings must be a list of attribute paths"),
        ({"settings": [1.0]}, "settings must be a list of attribute paths"),
        ({"ids_layout": "dispatch", "ids": 0, "weights": 1, "token_layout": "seq_first", "sentinel": -1}, None),
    ],
)
def test_field_validation_names_the_field(fields: dict[str, Any], message: str | None) -> None:
    if message is None:
        assert S.spec_from_mapping({"classes": ["R"], **fields}, "t").ids_layout == "dispatch"
        return
    with pytest.raises(S.AdapterError, match=re.escape(message)):
        S.spec_from_mapping({"classes": ["R"], **fields}, "t")


def test_same_fields_in_toml_and_register_router(tmp_path: Path, registry: None) -> None:
    f = tmp_path / "mine.toml"
    f.write_text('[[router]]\nfamily = "kt"\nclasses = ["pkg.mod.Gate"]\nids_layout = "k_first"\nsentinel = -1\n'
                 'token_layout = "seq_first"\nlogits_from = "wg"\nprobs = "sigmoid"\n'
                 f'ids_fn = "{__name__}:odd_ids"\nsettings = ["capacity", "parent.jitter"]\n')
    (from_toml,) = S.load_spec_file(f)
    registered = moescope.register_router("pkg.mod.Gate", family="kt", ids_layout="k_first", sentinel=-1,
                                          token_layout="seq_first", logits_from="wg", probs="sigmoid",
                                          ids_fn=f"{__name__}:odd_ids", settings=["capacity", "parent.jitter"])
    assert registered is None  # moescope.register_router returns nothing; the registry holds the spec
    assert A.all_specs()[0] == from_toml
    assert A.resolve_fn(from_toml) is odd_ids


def test_unregister_router(registry: None) -> None:
    moescope.register_router(ScoreRouter, weights=0, ids=1, logits_from="gate")
    router = ScoreRouter()
    assert A.resolve(router) is not None
    assert moescope.unregister_router(ScoreRouter) == 1
    assert A.resolve(router) is None
    with pytest.raises(A.AdapterError, match=r"unregister_router\(.*ScoreRouter\): no registered class"):
        moescope.unregister_router(ScoreRouter)
    # a qualified class name removes only your registrations: shipped specs naming it stay
    shipped = "transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter"
    with pytest.raises(A.AdapterError, match="no registered class"):
        moescope.unregister_router(shipped)
    moescope.register_router(shipped, family="my-mixtral")
    assert moescope.unregister_router(shipped) == 1
    assert any(s.family == "mixtral" for s in A.all_specs())
    # a shipped family by name: moescope stops hooking it
    before = len(A.all_specs())
    assert moescope.unregister_router("mixtral") >= 1 and len(A.all_specs()) < before
    assert all(s.family != "mixtral" for s in A.all_specs())


def test_describe_names_the_new_fields() -> None:
    spec = S.RouterSpec("m", ("X",), ids=1, weights=0, ids_layout="routing_map", token_layout="seq_first",
                        logits_from="gate", probs="sigmoid")
    assert A.describe(spec) == ("forward hook: ids=output[1] ([T, E] routing map), weights=output[0], logits=output "
                                "of 'gate', sigmoid scores, seq-first tokens")
    kt = S.RouterSpec("d", ("X",), ids_layout="k_first", sentinel=-1)
    assert A.describe(kt) == ("forward hook: ids=output[2] [k, T], weights=output[1], logits=output[0], "
                              "sentinel=-1")
    fn = S.RouterSpec("f", ("X",), ids_fn=odd_ids)
    assert A.describe(fn) == "forward hook: ids_fn=odd_ids"


def test_no_warning_for_a_correct_spec(tmp_path: Path, registry: None) -> None:
    moescope.register_router(KFirstGate, ids_layout="k_first", sentinel=-1, n_experts="num_experts", top_k="k")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record(Model(KFirstGate()), tmp_path / "r")


# -- README "Custom routers": every worked example records what its router returned -----------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_examples() -> dict[str, str]:
    """The python blocks of README "### Custom routers" marked `# layout: NAME`, by NAME."""
    text = README.read_text().split("### Custom routers\n", 1)[1]
    text = re.split(r"^#{2,3} ", text, maxsplit=1, flags=re.M)[0]  # up to the next heading
    found = {}
    for code in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        m = re.match(r"# layout: (\w+)\n", code)
        if m:
            found[m.group(1)] = code
    return found


def test_readme_has_one_example_per_layout() -> None:
    assert sorted(readme_examples()) == sorted(["topk", "k_first", "routing_map", "dispatch", "logits_from",
                                                "ids_fn"])


class Harness(nn.Module):
    """input_ids [B, S] → embedding [B, S, 16] → the router, given [T, 16], [B, S, 16] or [S, B, 16]."""

    def __init__(self, router: nn.Module, shape: str) -> None:
        super().__init__()
        self.emb, self.router, self.shape = nn.Embedding(V, 16), router, shape

    def forward(self, input_ids: torch.Tensor) -> Any:
        h = self.emb(input_ids)  # [B, S, 16]
        x = {"tokens": h.reshape(-1, 16), "batch": h, "seq_first": h.transpose(0, 1)}[self.shape]
        return self.router(x)


@pytest.mark.parametrize("layout", ["topk", "k_first", "routing_map", "dispatch", "logits_from", "ids_fn"])
def test_readme_example_records_what_the_router_returned(layout: str, tmp_path: Path, registry: None) -> None:
    ns: dict[str, Any] = {"__name__": f"readme_custom_{layout}"}
    exec(compile(readme_examples()[layout], f"README.md (Custom routers, {layout})", "exec"), ns)
    (cls,) = [v for v in ns.values() if isinstance(v, type) and issubclass(v, nn.Module)
              and v.__module__ == ns["__name__"]]
    shape = {"dispatch": "batch", "routing_map": "seq_first"}.get(layout, "tokens")
    torch.manual_seed(0)
    model = Harness(cls(), shape)
    x = torch.randint(0, V, (B, SEQ), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a correct spec: no warning, no layer stopped
        with moescope.record(model, tmp_path / "r", tokens=1.0), torch.no_grad():
            out = model(x)
    n, k = 8, 2
    if layout in ("routing_map", "dispatch"):
        chosen = out[1] if layout == "routing_map" else out[0].reshape(-1, n, out[0].shape[-1]).any(-1)  # [T, E]
        want, dropped = chosen.sum(0), int((k - chosen.sum(-1)).sum())
        assert dropped > 0 or layout == "routing_map"  # the capacity cut real routes
    else:
        ids = {"topk": lambda: out[2], "k_first": lambda: out[2].t(), "logits_from": lambda: out[1],
               "ids_fn": lambda: out["assignment"].reshape(-1, k)}[layout]()  # [T, k]
        want, dropped = torch.bincount(ids[ids >= 0], minlength=n), int((ids < 0).sum())
        assert dropped > 0 or layout in ("topk", "logits_from")
    got = load(tmp_path / "r")
    assert got["tokens"].tolist() == want.tolist()
    st = stats(tmp_path / "r")
    assert (st["tokens"], st["dropped"]) == (B * SEQ, dropped)
    nulls = sum(r["experts"].count(None) for r in read(tmp_path / "r", "routing"))
    assert nulls == dropped  # the routing table and router_stats agree on every dropped slot


def test_dropped_slots_are_no_expert_in_the_analyses(tmp_path: Path, registry: None) -> None:
    """NULL routing slots: the trace validates, and coactivation, the cache what-if and the dashboard's token
    view never see an expert that was not reached."""
    from moescope.analysis import whatif
    from moescope.dashboard.data import DashboardData

    moescope.register_router(KFirstGate, ids_layout="k_first", sentinel=-1, n_experts="num_experts", top_k="k")
    torch.manual_seed(0)
    (out,), _, mask = record(Model(KFirstGate()), tmp_path / "r")
    ids = out[2].t()[mask.reshape(-1).bool()]  # [T_valid, k]
    tr = moescope.open(tmp_path)
    n_null, n_slots = tr.sql("SELECT count(*) - count(expert), count(*) FROM assignments").fetchall()[0]
    assert (n_null, n_slots) == (int((ids < 0).sum()), ids.numel())
    co = tr.coactivation()
    assert set(co.expert_a) | set(co.expert_b) <= {0, 1, 2, 3}
    pairs = co[(co.expert_a == 0) & (co.expert_b == 3)].n_ab.sum()  # tokens that reached both 0 and 3
    assert pairs == sum(1 for a, b in ids.tolist() if {a, b} == {0, 3})
    hits = whatif.cache_hit_rates(tr.cursor(), sizes=[1], policies=("lru",))
    assert int(hits["requests"].iloc[0]) == int((ids >= 0).sum())  # every reached expert is one request
    tok = DashboardData(tmp_path).token_routing("r", 0, 0)
    assert [e for row in tok["experts"] for e in row].count(-1) == int((out[2].t()[:SEQ] < 0).sum())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["k_first", "routing_map"])
def test_compiled_equals_eager(layout: str, tmp_path: Path, registry: None) -> None:
    """The new layouts add no data-dependent branch: a model compiled after record() writes the eager trace,
    with no recompile while the step changes."""
    from torch._dynamo.utils import counters

    if layout == "k_first":
        moescope.register_router(KFirstGate, ids_layout="k_first", sentinel=-1, n_experts="num_experts", top_k="k")
        make = lambda: Model(KFirstGate())  # noqa: E731
    else:
        moescope.register_router(MapRouter, ids_layout="routing_map", ids=1, weights=0, logits_from="gate",
                                 top_k="topk", n_experts="num_experts", token_layout="seq_first")
        make = lambda: Model(MapRouter(), seq_first=True)  # noqa: E731
    x, mask = inputs()
    traces = []
    for name, compiled in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = make().eval()
        with moescope.record(model, tmp_path / name, tokens=1.0) as rec, torch.no_grad():
            run = torch.compile(model) if compiled else model
            for step in range(4):
                rec.step = step
                run(x, attention_mask=mask)
                if step == 0:
                    warm = counters["stats"]["unique_graphs"]
            assert counters["stats"]["unique_graphs"] == warm  # no recompile after the first step
        traces.append({t: sorted(read(tmp_path / name, t), key=lambda r: [str(v) for v in r.values()])
                       for t in ("expert_load", "router_stats", "routing")})
    eager, comp = traces
    assert [r["tokens"] for r in comp["expert_load"]] == [r["tokens"] for r in eager["expert_load"]]
    assert [r["dropped"] for r in comp["router_stats"]] == [r["dropped"] for r in eager["router_stats"]]
    assert [r["experts"] for r in comp["routing"]] == [r["experts"] for r in eager["routing"]]
    assert sum(r["dropped"] for r in eager["router_stats"]) > 0


@pytest.mark.parametrize(("fields", "message"), [
    ({"logits_from": "gates"}, "spec 'ScoreRouter' has logits_from='gates' but ScoreRouter has no such submodule"),
    ({"ids_fn": "moescope:no_such_fn"}, "ids_fn 'moescope:no_such_fn' cannot be imported"),
])
def test_a_spec_that_cannot_apply_is_an_error_at_start(fields: dict[str, Any], message: str, tmp_path: Path,
                                                       registry: None) -> None:
    from moescope.capture.recorder import RecordError

    moescope.register_router(ScoreRouter, weights=0, ids=1, **fields)
    with pytest.raises(RecordError, match=re.escape(message)):
        moescope.record(Model(ScoreRouter()), tmp_path / "r").start()


def test_a_router_without_logits_gets_no_invented_statistics(tmp_path: Path, registry: None) -> None:
    """Dispatch masks without logits: prob_sum, entropy and the non-finite count are NULL (not 0, which the
    overconfidence rule would read as one-hot routing); the manifest says the layer reads no logits."""
    moescope.register_router(DispatchGate, ids_layout="dispatch", ids=0, weights=1, logits_are="none",
                             n_experts="num_gates", top_k=2)
    torch.manual_seed(3)
    record(Model(DispatchGate(), three_d=True), tmp_path / "r")
    got, st = load(tmp_path / "r"), stats(tmp_path / "r")
    assert np.isnan(got["prob_sum"]).all() and got["tokens"].sum() > 0
    assert st["nonfinite"] is None and all(math.isnan(st[c]) for c in ("entropy_sum", "lse_sum", "margin_sum"))
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["layers"][0]["logits"] is False
    health = moescope.open(tmp_path).health(run="r")
    assert set(health[health.rule == "overconfidence"].status) == {"SKIP"}
    assert not (health.status == "ERROR").any(), health[health.status == "ERROR"].message.tolist()


def inspect_model() -> nn.Module:
    """For `moescope inspect test_spec_vocabulary:inspect_model` (run in a subprocess: registrations stay there)."""
    moescope.register_router(KFirstGate, ids_layout="k_first", sentinel=-1, n_experts="num_experts", top_k="k")
    moescope.register_router(MapRouter, ids_layout="routing_map", ids=1, weights=0, logits_from="gate",
                             top_k="topk", n_experts="num_experts", token_layout="seq_first")
    root = nn.Module()
    root.a, root.b = Model(KFirstGate()), Model(MapRouter(), seq_first=True)
    return root


def test_inspect_shows_the_reading_of_each_router() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-m", "moescope", "inspect", "test_spec_vocabulary:inspect_model"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[1]: ln for ln in out.stdout.splitlines() if ln[:1].isdigit()}
    assert lines["a.block.router"].rstrip().endswith(
        "forward hook: ids=output[2] [k, T], weights=output[1], logits=output[0], sentinel=-1")
    assert lines["b.block.router"].rstrip().endswith(
        "forward hook: ids=output[1] ([T, E] routing map), weights=output[0], logits=output of 'gate', "
        "seq-first tokens")


def test_logits_found_absent_at_run_time_are_marked_too(tmp_path: Path, registry: None) -> None:
    """logits=None on a tuple output reads no logits, which only the calls show: the manifest marks it at close."""
    moescope.register_router(ScoreRouter, weights=0, ids=1, logits=None)
    torch.manual_seed(0)
    record(Model(ScoreRouter()), tmp_path / "r")
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["layers"][0]["logits"] is False
    assert np.isnan(load(tmp_path / "r")["prob_sum"]).all()
    health = moescope.open(tmp_path).health(run="r")
    assert not (health.status == "ERROR").any(), health[health.status == "ERROR"].message.tolist()


def test_scores_read_the_wrong_way_are_named() -> None:
    """Probabilities read as logits, or sigmoid scores read as softmax probabilities: one error naming the field."""
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    ids = logits.topk(2, -1).indices
    w = torch.ones(6, 2)
    spec = S.RouterSpec("r", ("X",))
    A.check_output(spec, (logits, w, ids), 4, 2, None)  # real logits: fine
    with pytest.raises(A.AdapterError, match=re.escape('holds probabilities (every row in [0, 1], summing to 1), '
                                                       'not logits: set logits_are = "probs"')):
        A.check_output(spec, (logits.softmax(-1), w, ids), 4, 2, None)
    probs = S.RouterSpec("r", ("X",), logits_are="probs")
    A.check_output(probs, (logits.softmax(-1), w, ids), 4, 2, None)
    with pytest.raises(A.AdapterError, match=re.escape('scores? set probs = "sigmoid"')):
        A.check_output(probs, (torch.sigmoid(logits), w, ids), 4, 2, None)
    sig = S.RouterSpec("r", ("X",), logits_are="probs", probs="sigmoid")
    A.check_output(sig, (torch.sigmoid(logits), w, ids), 4, 2, None)


@pytest.mark.slow
def test_a_stopped_layer_stays_stopped_when_compiled_later(tmp_path: Path, registry: None) -> None:
    moescope.register_router(KFirstGate, n_experts="num_experts", top_k="k")  # the naive [T, k] reading
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model(KFirstGate()).eval()
    x, mask = inputs()
    with pytest.warns(RuntimeWarning, match='set ids_layout = "k_first"'):
        with moescope.record(model, tmp_path / "r") as rec, torch.no_grad():
            model(x, attention_mask=mask)  # eager: the first-call check stops the layer
            compiled = torch.compile(model)
            for step in (1, 2):
                rec.step = step
                compiled(x, attention_mask=mask)
    torch._dynamo.reset()
    assert len(rec.disabled_layers) == 1
    assert not (tmp_path / "r" / "expert_load").exists()  # nothing recorded by the compiled forwards either

"""The flight recorder and `moescope explain` (issue 17 items 1-3): each cause planted in a tiny model, and the
explanation must name it with its numbers; the dump is compared with what the router itself returned."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from torch import nn  # noqa: E402
from toy_moe import ToyMoE  # noqa: E402

import moescope  # noqa: E402
from moescope.analysis.explain import explain, read_dump, select_dumps  # noqa: E402
from moescope.cli import main  # noqa: E402


class BiasRouter(nn.Module):
    """Softmax top-k router with a bias, returning (logits [T, E], weights [T, k], ids [T, k])."""

    def __init__(self, hidden: int = 16, n_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.proj = nn.Linear(hidden, n_experts, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(x)  # [T, E]
        w, ids = torch.topk(torch.softmax(logits.float(), -1), self.top_k, -1)  # [T, k]
        return logits, w, ids


moescope.register_router(BiasRouter, n_experts="n_experts", top_k="top_k", family="bias-router")


class BiasMoE(nn.Module):
    """Embedding → one BiasRouter layer (the experts are irrelevant to routing evidence)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.router = BiasRouter()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)  # [B, S, H]
        self.router(h.reshape(-1, 16))
        return h


def _quiet(fn):  # noqa: ANN001, ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def test_dump_on_demand_holds_what_the_router_returned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = ToyMoE().eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input rows, ids) of the first router call of each step
    router = m.blocks[1].router
    h = router.register_forward_hook(lambda mod, a, out: seen.append((a[0].detach().clone(), out[2].clone())))
    g = torch.Generator().manual_seed(1)
    with moescope.record(m, tmp_path / "r", flight_steps=3, flight_tokens=5) as rec, torch.no_grad():
        for step in range(5):
            rec.step = step
            m(torch.randint(0, 64, (2, 8), generator=g))
        path = rec.dump_flight()
    h.remove()
    d = read_dump(path)
    assert d.meta["layers"][1]["steps"] == [2, 3, 4]  # the ring keeps the last 3 steps
    ids = d.layer(1, "ids")  # [15, 2]: 5 sampled rows × 3 steps
    want = torch.cat([seen[s][1][:5] for s in (2, 3, 4)]).numpy()
    assert ids.shape == (15, 2) and (ids == want).all()
    assert (d.layer(1, "x") == torch.cat([seen[s][0][:5] for s in (2, 3, 4)]).numpy()).all()
    assert (d.layer(1, "ids_native") == d.layer(1, "ids_fp32")).all()  # float32 model: no flips
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["counters"]["flight_dumps"] == [path.name]


def test_inf_input_is_traced_to_its_position(tmp_path: Path) -> None:
    """Token 7's embedding holds Inf: the nonfinite alert dumps, and explain names the positions and the input."""
    torch.manual_seed(0)
    m = ToyMoE(n_layers=1).eval()
    with torch.no_grad():
        m.emb.weight[7, 0] = float("inf")
    x = torch.randint(8, 64, (2, 8))
    x[1, 3] = 7  # sequence 1, position 3
    with moescope.record(m, tmp_path / "r", flight_steps=2, flight_tokens=16, flush_every=1) as rec, torch.no_grad():
        for step in range(3):
            rec.step = step
            _quiet(lambda: m(x))
    dumps = select_dumps(tmp_path / "r")
    assert dumps[0].meta["reason"] == "nonfinite"
    found = {f.kind: f for f in explain(dumps[0])}
    f = found["nonfinite"]
    assert f.numbers["tokens"] == f.numbers["upstream"] == 2  # one bad token per step, 2 steps in the ring
    assert "seq 1 pos 3 (token 7)" in f.text and "router input" in f.text


def test_bf16_temperature_flips_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bf16 router whose logits are scaled ×2000 (a temperature that saturates bf16): near-ties flip in fp32."""
    torch.manual_seed(0)
    m = ToyMoE(n_layers=1).eval()
    with torch.no_grad():
        m.blocks[0].router.proj.weight.mul_(2000.0)
    m = m.to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    with moescope.record(m, tmp_path / "r", flight_steps=2, flight_tokens=64, precision_check=True,
                         flush_every=1) as rec, torch.no_grad():
        for step in range(2):
            rec.step = step
            m(torch.randint(0, 64, (4, 16), generator=g))
        rec.dump_flight()
    d = select_dumps(tmp_path / "r")[0]
    nat, f32 = d.layer(0, "ids_native"), d.layer(0, "ids_fp32")
    truth = int((nat != f32).any(-1).sum())  # sorted sets from the dump, recomputed here
    found = {f.kind: f for f in explain(d)}
    assert truth > 0 and found["precision"].numbers["flipped"] == truth
    assert "instead of bfloat16" in found["precision"].text
    assert found["logit_range"].severity == "problem" and "resolves steps of" in found["logit_range"].text
    # the per-flush metric saw flips as well, and the health rule warns
    tr = moescope.open(tmp_path / "r")
    flipped, sampled = tr.sql("SELECT sum(flipped), sum(sampled) FROM router_precision").fetchall()[0]
    assert sampled == 128 and flipped > 0
    h = tr.health()
    assert set(h.loc[h["rule"] == "precision", "status"]) == {"WARN"}
    assert main(["explain", str(tmp_path / "r")]) == 1
    assert "would route to other experts" in capsys.readouterr().out


def test_hot_bias_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = BiasMoE().eval()
    with torch.no_grad():
        m.router.proj.bias[3] = 10.0
    g = torch.Generator().manual_seed(3)
    with moescope.record(m, tmp_path / "r", flight_steps=2, flight_tokens=32, flush_every=2) as rec, torch.no_grad():
        for step in range(4):
            rec.step = step
            _quiet(lambda: m(torch.randint(0, 64, (8, 32), generator=g)))
    d = select_dumps(tmp_path / "r")[0]
    assert d.meta["reason"] in ("collapse", "dead_expert")
    found = {f.kind: f for f in explain(d)}
    assert found["bias"].numbers["expert"] == 3 and found["bias"].numbers["value"] == pytest.approx(10.0)
    assert "proj.bias[3] = +10" in found["bias"].text
    assert found["load"].numbers["experts"][0] == 3


def test_explain_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    m = ToyMoE().eval()
    with moescope.record(m, tmp_path / "r") as rec, torch.no_grad():
        m(torch.randint(0, 64, (2, 8)))
        with pytest.raises(moescope.capture.recorder.RecordError, match="flight_steps"):
            rec.dump_flight()
    assert main(["explain", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no flight dump" in err and err.count("\n") == 1


def test_dumps_and_precision_reroutes_are_not_counted_as_routing(tmp_path: Path) -> None:
    """Re-routing the flight sample (dump, precision check) must not run moescope's own hooks: counts stay exact."""
    torch.manual_seed(0)
    m = ToyMoE().eval()
    truth: dict[int, torch.Tensor] = {}
    step = {"now": 0}

    def own(mod: nn.Module, a: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> None:
        c = torch.bincount(out[2].reshape(-1), minlength=8)
        truth[step["now"]] = truth.get(step["now"], torch.zeros(8, dtype=torch.long)) + c

    h = m.blocks[0].router.register_forward_hook(own)
    g = torch.Generator().manual_seed(4)
    with moescope.record(m, tmp_path / "r", flight_steps=2, precision_check=True, flush_every=1) as rec, \
            torch.no_grad():
        for s in range(4):
            rec.step = step["now"] = s
            m(torch.randint(0, 64, (2, 8), generator=g))
            if s == 1:
                step["now"] = -1  # anything the dump runs through the router lands here, not in a step
                rec.dump_flight()
    h.remove()
    tr = moescope.open(tmp_path / "r")
    got = tr.sql("SELECT step, expert, tokens FROM expert_load WHERE layer = 0 ORDER BY step, expert").fetchall()
    want = [(s, e, int(truth[s][e])) for s in range(4) for e in range(8) if truth[s][e] > 0]
    assert [r for r in got if r[2] > 0] == want
    assert tr.sql("SELECT count(*) FROM router_precision").fetchall()[0][0] == 4 * 2  # a row per flush and layer


class SeqFirstRouter(nn.Module):
    """A sequence-first router (Megatron's token order): input [S, B, H], rows in [S·B] order."""

    def __init__(self) -> None:
        super().__init__()
        self.n_experts, self.top_k = 8, 2
        self.proj = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(x.reshape(-1, 16))  # [S*B, E]
        w, ids = torch.topk(torch.softmax(logits, -1), 2, -1)  # [S*B, k]
        return logits, w, ids


moescope.register_router(SeqFirstRouter, n_experts="n_experts", top_k="top_k", token_layout="seq_first",
                         family="seq-first-router")


class SeqFirstMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.router = SeqFirstRouter()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)  # [B, S, H]
        self.router(h.transpose(0, 1).contiguous())  # [S, B, H]
        return h


def test_seq_first_dump_rows_are_in_the_inputs_order(tmp_path: Path) -> None:
    """Input rows, ids and token ids of a dump describe the same tokens, also for a sequence-first router."""
    torch.manual_seed(0)
    m = SeqFirstMoE().eval()
    x = torch.randint(0, 64, (3, 5))  # B = 3, S = 5
    with moescope.record(m, tmp_path / "r", flight_steps=1, flight_tokens=15) as rec, torch.no_grad():
        rec.step = 0
        m(x)
        d = read_dump(rec.dump_flight())
    with torch.no_grad():
        h = m.emb(x).reshape(-1, 16)  # [B*S, H], batch-first
        ids = m.router.proj(h).softmax(-1).topk(2, -1).indices  # each token's experts, same order
    assert (d.layer(0, "token_ids") == x.reshape(-1).numpy()).all()
    assert (d.layer(0, "x") == h.numpy()).all()
    assert (d.layer(0, "ids") == ids.numpy()).all()


def test_precision_rows_once_per_step_with_the_sampled_tag(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = ToyMoE(n_layers=1).eval()
    g = torch.Generator().manual_seed(5)
    with moescope.record(m, tmp_path / "r", precision_check=True, flush_every=100) as rec, torch.no_grad():
        rec.step = 0
        m(torch.randint(0, 64, (2, 8), generator=g))
        rec.flush()
        rec.flush()  # a second flush in the same step must not route the same sample again
        rec.step = 1
        with rec.tag("eval"):
            m(torch.randint(0, 64, (2, 8), generator=g))
    rows = moescope.open(tmp_path / "r").sql(
        "SELECT step, tag, sampled FROM router_precision ORDER BY step").fetchall()
    assert rows == [(0, "", 16), (1, "eval", 16)]


def test_a_damaged_dump_is_exit_3_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    m = ToyMoE().eval()
    with moescope.record(m, tmp_path / "r", flight_steps=1) as rec, torch.no_grad():
        m(torch.randint(0, 64, (2, 8)))
        path = rec.dump_flight()
    (path / "evidence.safetensors").write_bytes(b"not safetensors")
    assert main(["explain", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert str(path / "evidence.safetensors") in err and err.count("\n") == 1


@pytest.mark.parametrize("mode", [{"stats": False}, {}, {"tokens": 1.0}], ids=["counts-only", "default", "rows"])
@pytest.mark.parametrize("sample", [5, 40], ids=["S<T", "S>T"])
def test_ring_holds_each_steps_router_call_exactly(tmp_path: Path, mode: dict, sample: int) -> None:
    """In every capture mode the packed ring (one copy per call) gives back the router's own input rows, logits,
    ids, weights and the step's token ids; with S > T it holds the T rows there are. The token ids are copies: the
    model is fed one input buffer rewritten in place every step, as static-buffer serving loops do."""
    torch.manual_seed(0)
    m = ToyMoE().eval()
    router = m.blocks[1].router
    seen: list[tuple[torch.Tensor, ...]] = []  # (x, logits, weights, ids) of each forward's call
    h = router.register_forward_hook(lambda mod, a, out: seen.append((a[0].clone(), *(t.clone() for t in out))))
    g = torch.Generator().manual_seed(1)
    buf = torch.zeros(2, 8, dtype=torch.long)  # one input buffer, rewritten in place each step
    fed: list[torch.Tensor] = []
    with moescope.record(m, tmp_path / "r", flight_steps=3, flight_tokens=sample, **mode) as rec, torch.no_grad():
        for step in range(4):
            rec.step = step
            buf.copy_(torch.randint(0, 64, (2, 8), generator=g))
            fed.append(buf.reshape(-1).clone())
            m(buf)
        d = read_dump(rec.dump_flight())
    h.remove()
    r = min(sample, 16)
    steps = (1, 2, 3)
    assert d.meta["layers"][1]["steps"] == list(steps) and d.meta["layers"][1]["rows"] == 3 * r
    for name, col in (("x", 0), ("logits", 1), ("weights", 2), ("ids", 3)):
        want = torch.cat([seen[s][col][:r] for s in steps]).numpy()
        assert (d.layer(1, name) == want).all(), name
    assert (d.layer(1, "token_ids") == torch.cat([fed[s][:r] for s in steps]).numpy()).all()
    assert (d.layer(1, "step") == [s for s in steps for _ in range(r)]).all()


class KnobRouter(BiasRouter):
    """A BiasRouter with numeric knobs on itself, its config and its block."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = 0.5  # found by name (flight.SETTINGS)
        self.config = type("Cfg", (), {"capacity": 1.25, "name": "not a number"})()


class KnobMoE(BiasMoE):
    def __init__(self) -> None:
        super().__init__()
        self.router = KnobRouter()
        self.router_jitter_noise = 0.01  # on the block: found by name, stored as parent.<name>
        self.aux_scale = 3.0  # named by the spec


def test_dump_keeps_the_settings_the_spec_names(tmp_path: Path) -> None:
    moescope.register_router(KnobRouter, n_experts="n_experts", top_k="top_k", family="knob",
                             settings=["config.capacity", "config.name", "config.absent", "parent.aux_scale"])
    try:
        m = KnobMoE().eval()
        with moescope.record(m, tmp_path / "r", flight_steps=1, flight_tokens=4) as rec, torch.no_grad():
            rec.step = 0
            m(torch.randint(0, 64, (2, 3)))
            d = read_dump(rec.dump_flight())
    finally:
        moescope.unregister_router(KnobRouter)
    assert d.meta["layers"][0]["settings"] == {"temperature": 0.5, "parent.router_jitter_noise": 0.01,
                                               "config.capacity": 1.25, "parent.aux_scale": 3.0}
    findings = explain(d)
    assert any(f.kind == "settings" and "config.capacity=1.25" in f.text for f in findings)


def test_a_ring_call_that_fails_leaves_no_half_written_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring's call copies the input rows first and the rest in the hot path: when the hot path fails there,
    the layer's capture stops (one warning) and the slot of that step is emptied, never dumped half old."""
    from moescope.capture.hotpath import HotPath

    real = HotPath.update
    fail = {"on": False}

    def update(self: HotPath, layer: int, ev: object, grid: object, probs: str = "softmax", flight: object = None
               ) -> None:
        if fail["on"] and flight is not None and layer == 1:
            raise RuntimeError("planted")
        real(self, layer, ev, grid, probs, flight)  # type: ignore[arg-type]

    monkeypatch.setattr(HotPath, "update", update)
    torch.manual_seed(0)
    m = ToyMoE().eval()
    with moescope.record(m, tmp_path / "r", flight_steps=3, flight_tokens=4) as rec, torch.no_grad():
        for step in range(3):
            rec.step = step
            fail["on"] = step == 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m(torch.randint(0, 64, (2, 8)))
            if step == 1:
                assert any("capture of layer 1" in str(w.message) and "planted" in str(w.message) for w in caught)
        d = read_dump(rec.dump_flight())
    by_layer = {i["layer"]: i for i in d.meta["layers"]}
    assert by_layer[0]["steps"] == [0, 1, 2]
    assert by_layer[1]["steps"] == [0]  # step 1's slot emptied; the layer stopped after it

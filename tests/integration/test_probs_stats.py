"""A router read through its probabilities (logits_are="probs"): entropy and prob_sum are exact, the z-loss is
unknown (logsumexp of log p is not the router's logits), and unknown is NULL — not 0, not an ERROR."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import moescope  # noqa: E402


class ProbRouter(nn.Module):
    """Returns (softmax probabilities [T, E], weights [T, k], ids [T, k]) and never its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.n_experts, self.top_k = 4, 2
        self.proj = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = torch.softmax(self.proj(x), -1)  # [T, E]
        w, ids = p.topk(2, -1)  # [T, k]
        return p, w, ids


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.router = ProbRouter()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        self.router(h.reshape(-1, 8))
        return h


def _record(path: Path, logits_are: str) -> tuple[moescope.Trace, tuple[torch.Tensor, ...]]:
    """One forward of Model recorded with ProbRouter read as `logits_are`; the trace and the router's own output."""
    moescope.register_router(ProbRouter, logits_are=logits_are, n_experts="n_experts", top_k="top_k")
    try:
        torch.manual_seed(0)
        m = Model().eval()
        x = torch.randint(0, 32, (4, 8))
        with moescope.record(m, path) as rec, torch.no_grad():
            rec.step = 0
            m(x)
        with torch.no_grad():
            out = m.router(m.emb(x).reshape(-1, 8))  # (probs [T, E], weights, ids [T, k]): not recorded
    finally:
        moescope.unregister_router(ProbRouter)
    return moescope.open(path), out


def test_probs_spec_leaves_z_loss_unknown(tmp_path: Path) -> None:
    tr, (p, _w, _ids) = _record(tmp_path / "r", "probs")
    ent, lse_sq, lse_max = tr.sql("SELECT entropy_sum, lse_sq_sum, lse_max FROM router_stats").fetchall()[0]
    assert ent == pytest.approx(float(torch.special.entr(p).sum()), rel=1e-5)
    assert lse_sq is None or math.isnan(lse_sq)
    assert lse_max is None or math.isnan(lse_max)
    h = tr.health()
    assert "ERROR" not in set(h["status"])  # NULL by design, not damage
    assert set(h.loc[h["rule"] == "z_loss", "status"]) == {"SKIP"}


def test_spec_reading_no_logits_is_not_damage(tmp_path: Path) -> None:
    """A spec reading no logits (DeepSpeed, Megatron, lucidrains) stores NULL logit statistics: exact counts, no
    ERROR finding from the integrity check, and the rules on logits SKIP."""
    tr, (_p, _w, ids) = _record(tmp_path / "r", "none")
    got = dict(tr.sql("SELECT expert, tokens FROM expert_load").fetchall())
    want = torch.bincount(ids.reshape(-1), minlength=4)
    assert [got.get(e, 0) for e in range(4)] == want.tolist()
    ent, nonfinite = tr.sql("SELECT entropy_sum, nonfinite FROM router_stats").fetchall()[0]
    assert (ent is None or math.isnan(ent)) and nonfinite is None
    h = tr.health()
    assert "ERROR" not in set(h["status"])
    assert set(h.loc[h["rule"].isin(["z_loss", "nonfinite"]), "status"]) == {"SKIP"}

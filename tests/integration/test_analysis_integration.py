"""The analysis layer on a trace written by the real recorder (a tiny toy MoE; needs torch)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import moescope  # noqa: E402
from moescope.analysis.health import COLUMNS  # noqa: E402


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from toy_moe import ToyMoE

    root = tmp_path_factory.mktemp("rec")
    torch.manual_seed(0)
    model = ToyMoE()
    with moescope.record(model, root / "toy", tokens=1.0) as rec:
        for step in range(6):
            rec.step = step
            with rec.tag("en" if step % 2 else "code"):
                model(torch.randint(0, 64, (2, 16)))
    return moescope.open(root)


def test_views_and_runs(recorded):
    tr = recorded
    assert tr.runs == ["toy"]
    run = tr.sql("SELECT model_class, n_layers, token_fraction, closed FROM runs").fetchall()
    assert run == [("ToyMoE", 2, 1.0, True)]
    assert tr.sql("SELECT n_experts, top_k FROM layer_info ORDER BY layer").fetchall() == [(8, 2), (8, 2)]
    # expert_load and the unnested routing agree on every assignment
    a = tr.sql("SELECT layer, expert, count(*) FROM assignments GROUP BY ALL ORDER BY ALL").fetchall()
    b = tr.sql("SELECT layer, expert, sum(tokens) FROM expert_load GROUP BY ALL HAVING sum(tokens) > 0 ORDER BY ALL").fetchall()
    assert [(x, y, int(z)) for x, y, z in a] == [(x, y, int(z)) for x, y, z in b]


def test_every_method_runs(recorded):
    tr = recorded
    lm = tr.load_metrics(window="all")
    assert len(lm) == 2 and lm["z_loss"].gt(0).all() and (lm["assignments"] == 2 * lm["tokens"]).all()
    assert tr.utilization()["utilization"].notna().all()
    assert len(tr.coactivation()) == 2 * 8 * 7
    assert len(tr.temporal_locality()) == 2 and len(tr.vocab_specialization(min_count=1)) == 2
    assert set(tr.domain_specialization()["tag"]) == {"en", "code"}
    assert len(tr.saturation(run="toy"))
    h = tr.health()
    assert list(h.columns) == COLUMNS and "ERROR" not in set(h["status"])
    d = tr.drift({"tag": "en"}, {"tag": "code"})
    assert d["unit"].iloc[0] == "sequence" and len(d) == 2

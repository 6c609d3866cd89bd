"""A counts-only recording (stats=False) never claims what it did not measure: logit rules SKIP, counts stay exact."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from toy_moe import ToyMoE  # noqa: E402

import moescope  # noqa: E402
from moescope.capture.alerts import default_rules  # noqa: E402


def test_stats_off_skips_logit_rules_and_keeps_exact_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = ToyMoE()
    x = torch.randint(0, 64, (4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with moescope.record(m, tmp_path / "r", stats=False, flush_every=5, alert_rules=default_rules()) as rec:
            for s in range(10):
                rec.step = s
                m(x)
    tr = moescope.open(tmp_path)
    (n_rows, n_measured), = tr.sql("SELECT count(*), count(nonfinite) FROM router_stats").fetchall()
    assert n_rows > 0 and n_measured == 0  # not measured is NULL, never 0 ("no NaN/Inf logits")
    h = tr.health(run="r")
    for rule in ("nonfinite", "z_loss", "overconfidence"):
        assert set(h[h["rule"] == rule]["status"]) == {"SKIP"}, rule
    (tokens,), = tr.sql("SELECT sum(tokens) FROM expert_load WHERE layer = 0").fetchall()
    k = next(mod.top_k for mod in m.modules() if hasattr(mod, "top_k"))
    assert tokens == 10 * 4 * 16 * k  # every token × k, every step

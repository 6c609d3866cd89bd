"""The dashboard's Flight page data and the readable-token / precision views (issue 17), on hand-built traces:
a flight dump written the way capture/flight.py writes one (safetensors + meta.json), with a planted cause."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("dash")
pytest.importorskip("safetensors")

from trace_helpers import flight_dump, layer_spec, load_frame, routing_frame  # noqa: E402

from moescope import dashboard as glue  # noqa: E402

D = glue.data


def _dump(run_dir: Path, name: str, step: int) -> Path:
    """A one-layer dump of 4 sampled tokens at `step`; token 42 (seq 0, pos 2) has NaN logits, finite input."""
    logits = [[1.0, 0.5, 0.2, 0.1], [0.3, 1.2, 0.1, 0.0], [np.nan] * 4, [0.9, 0.1, 0.8, 0.0]]  # [R, E]
    return flight_dump(run_dir, name, step, logits, [[0, 1], [1, 0], [0, 1], [0, 2]], token_ids=[40, 41, 42, 43],
                       alerts=[{"rule": "nonfinite", "status": "FAIL", "layer": 0, "message": "layer 0: 1 non-finite"}])


def _app_layout(root: Path, page: str, **query: str) -> str:
    from dash._get_app import app_context

    app = glue.create_app(root)
    token = app_context.set(app)
    try:
        return str(glue.app.page_module(page).layout(**query))
    finally:
        app_context.reset(token)
        app.moescope_data.stop_warming()  # the app warms its views on a thread; stop it between queries


def test_flight_dumps_and_findings(make_run: Any, trace_root: Path) -> None:
    run_dir = make_run("r", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(7, 0, [3, 3, 1, 1])]))
    make_run("quiet", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(7, 0, [2, 2, 2, 2])]))
    _dump(run_dir, "rank0-step00000007-alert", 7)
    bad = run_dir / "flight" / "rank0-step00000009-demand"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    data = D.DashboardData(trace_root)
    try:
        dumps = data.flight_dumps()
        assert list(dumps["name"]) == ["rank0-step00000007-alert", "rank0-step00000009-demand"]
        first = dumps.iloc[0]
        assert (first["run"], first["step"], first["reason"], first["layers"]) == ("r", 7, "alert", "0")
        assert first["alerts"] == "FAIL nonfinite: layer 0: 1 non-finite" and first["error"] == ""
        assert str(bad / "meta.json") in dumps.iloc[1]["error"]  # a damaged dump is listed, naming its file
        head, findings = data.flight_findings("r", "rank0-step00000007-alert")
        assert head.startswith("rank0-step00000007-alert: written at step 7 (alert")
        top = findings.iloc[0]
        assert (top["severity"], top["kind"]) == ("problem", "nonfinite")  # problems first
        assert "step 7 seq 0 pos 2 (token 42)" in top["text"] and "tokens=1, sampled=4, upstream=0" == top["numbers"]
        assert list(findings["severity"]) == sorted(findings["severity"], key=lambda s: s != "problem")
        with pytest.raises(KeyError, match="no flight dump 'nope'"):
            data.flight_findings("r", "nope")
    finally:
        data.close()
    text = _app_layout(trace_root, "flight")
    assert "fl-findings" in text and "step 7 seq 0 pos 2 (token 42)" in text and "ms-msg-error" not in text


def test_flight_page_without_dumps_says_how_to_record(make_run: Any, trace_root: Path) -> None:
    make_run("r", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(0, 0, [1, 1, 1, 1])]))
    data = D.DashboardData(trace_root)
    assert data.flight_dumps().empty
    data.close()
    text = _app_layout(trace_root, "flight")
    assert "fl-none" in text and "flight_steps=N" in text


def test_tokens_decode_with_the_runs_tokenizer(make_run: Any, trace_root: Path) -> None:
    rows = [{"pos": i, "token_id": t, "experts": [0, 1]} for i, t in enumerate([65, 66, 65, 65, 65, 65, 65])]
    make_run("bytes", layers=[layer_spec(0, 4, 2)], routing=routing_frame(rows),
             extra={"model": {"class": "M", "tokenizer": "bytes"}})
    make_run("ids", layers=[layer_spec(0, 4, 2)], routing=routing_frame(rows))
    data = D.DashboardData(trace_root)
    try:
        assert list(data.token_routing("bytes", 0, 0)["text"][:2]) == ["A", "B"]
        assert list(data.token_routing("ids", 0, 0)["text"][:2]) == ["#65", "#66"]  # no tokenizer: no guess
        assert D.token_text(65) == "#65" and D.token_text(65, data.decoder("bytes")) == "A"
        ex = data.expert_tokens("bytes").set_index("expert")
        assert ex.loc[0, "texts"] == ["A"] and ex.loc[2, "texts"] == []  # 'B' seen once: under min_count 5
    finally:
        data.close()
    text = _app_layout(trace_root, "tokens", run="ids")
    assert "tok-experts" in text and "#65" in text and "records no tokenizer" in text


def test_utilization_shows_precision_flip_rate(make_run: Any, trace_root: Path) -> None:
    prec = pd.DataFrame({"step": [0, 0, 10], "tag": ["", "", ""], "layer": [0, 1, 1], "sampled": [100, 100, 50],
                         "flipped": [0, 4, 1]})
    make_run("p", layers=[layer_spec(0, 4, 2), layer_spec(1, 4, 2)], router_precision=prec,
             expert_load=load_frame([(0, 0, [1, 1, 1, 1]), (0, 1, [1, 1, 1, 1])]))
    data = D.DashboardData(trace_root)
    try:
        p = data.precision("p").set_index("layer")
        assert p.loc[1, "flip_rate"] == pytest.approx(5 / 150) and p.loc[0, "flip_rate"] == 0
    finally:
        data.close()
    assert "util-precision" in _app_layout(trace_root, "utilization", run="p")

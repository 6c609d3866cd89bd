"""Builders of hand-built trace tables shared by the analysis tests (imported as `trace_helpers`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd


def layer_spec(layer: int, n_experts: int, top_k: int, module: str | None = None) -> dict[str, Any]:
    """One manifest `layers` entry."""
    return {"layer": layer, "module": module or f"layers.{layer}.moe.router", "n_experts": n_experts,
            "top_k": top_k, "router_kind": "softmax_topk"}


def load_frame(rows: Iterable[tuple[int, int, Sequence[float]]], tag: str = "",
               prob: Sequence[Sequence[float]] | None = None) -> pd.DataFrame:
    """expert_load rows from (step, layer, counts per expert); prob: optional prob_sum per expert per row."""
    out = []
    for i, (step, layer, counts) in enumerate(rows):
        for e, c in enumerate(counts):
            p = prob[i][e] if prob is not None else 0.0
            out.append({"step": step, "tag": tag, "layer": layer, "expert": e, "tokens": int(c),
                        "prob_sum": float(p), "weight_sum": 0.0})
    return pd.DataFrame(out)


def stats_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """router_stats rows from dicts with step, layer, tokens and any of the sums (the rest default to 0)."""
    cols = {"tag": "", "entropy_sum": 0.0, "lse_sq_sum": 0.0, "lse_sum": 0.0, "lse_max": 0.0, "margin_sum": 0.0,
            "nonfinite": 0, "dropped": 0}
    return pd.DataFrame([{**cols, **r} for r in rows])


def routing_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """routing rows from dicts with step, layer, seq, pos, experts (+ optional token_id, weights, tag)."""
    out = []
    for r in rows:
        experts = list(r["experts"])
        out.append({"step": r.get("step", 0), "tag": r.get("tag", ""), "layer": r.get("layer", 0),
                    "seq": r.get("seq", 0), "pos": r.get("pos", 0), "token_id": r.get("token_id", 0),
                    "experts": experts, "weights": r.get("weights", [1.0 / len(experts)] * len(experts)),
                    "entropy": 0.0, "lse": 0.0, "margin": 0.0})
    return pd.DataFrame(out)




def flight_dump(run_dir: Any, name: str, step: int, logits: Any, ids: Any, token_ids: Sequence[int] | None = None,
                n_experts: int = 4, reason: str = "alert", alerts: Sequence[dict[str, Any]] = ()) -> Any:
    """A one-layer flight dump written as capture/flight.py writes one (evidence.safetensors + meta.json) from
    logits [R, E] and dispatched ids [R, k]; router inputs are ones [R, 3], rows one sequence of R tokens at `step`."""
    import json
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import save_file

    logits, ids = np.asarray(logits, np.float32), np.asarray(ids, np.int64)
    rows = len(logits)
    folder = Path(run_dir) / "flight" / name
    folder.mkdir(parents=True)
    tok = np.asarray(token_ids if token_ids is not None else range(rows), np.int64)
    save_file({"layer0.x": np.ones((rows, 3), np.float32), "layer0.logits": logits, "layer0.ids": ids,
               "layer0.weights": np.full(ids.shape, 1.0 / ids.shape[1], np.float32), "layer0.token_ids": tok,
               "layer0.step": np.full(rows, step), "layer0.row": np.arange(rows), "layer0.seq_len": np.full(rows, rows)},
              str(folder / "evidence.safetensors"))
    meta = {"format": "moescope-flight", "version": 1, "reason": reason, "step": step, "rank": 0, "alerts": list(alerts),
            "layers": [{"layer": 0, "n_experts": n_experts, "top_k": int(ids.shape[1]), "param_dtype": "torch.float32",
                        "probs": "softmax", "steps": [step], "rows": rows}]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder

"""Trace format v1: the Arrow schemas of every table, the only contract between capture and analysis."""

from __future__ import annotations

import pyarrow as pa

FORMAT = "moescope-trace"
FORMAT_VERSION = 1
#: The folder of a run's flight dumps (capture/flight.py writes them, analysis/explain.py reads them).
FLIGHT_DIR = "flight"
#: Parquet key-value metadata key carrying the schema version in every file.
META_KEY = b"moescope.format_version"

_KEYS = [
    pa.field("run", pa.string()),
    pa.field("rank", pa.int16()),
    pa.field("step", pa.int64()),
    pa.field("tag", pa.string()),
    pa.field("layer", pa.int16()),
]

EXPERT_LOAD = pa.schema(
    _KEYS
    + [
        pa.field("expert", pa.int16()),
        pa.field("tokens", pa.int64()),  # assignments (a token counted once per slot that chose this expert)
        pa.field("prob_sum", pa.float64()),  # Σ over tokens of the router probability of this expert
        pa.field("weight_sum", pa.float64()),  # Σ over assignments of the gate weight the expert received
    ]
)

ROUTER_STATS = pa.schema(
    _KEYS
    + [
        pa.field("tokens", pa.int64()),
        pa.field("entropy_sum", pa.float64()),  # Σ_t H(p(t)) in nats
        pa.field("lse_sq_sum", pa.float64()),  # Σ_t logsumexp(logits_t)^2, the z-loss numerator
        pa.field("lse_sum", pa.float64()),  # Σ_t logsumexp(logits_t)
        pa.field("lse_max", pa.float64()),  # max_t logsumexp(logits_t): logit growth shows here first
        pa.field("margin_sum", pa.float64()),  # Σ_t p(1) - p(2)
        pa.field("nonfinite", pa.int64()),  # tokens with NaN/Inf router logits
        pa.field("dropped", pa.int64()),  # routes that reached no expert (sentinel ids, empty slots) + one-hot drops
    ]
)

ROUTING = pa.schema(
    _KEYS
    + [
        pa.field("seq", pa.int32()),
        pa.field("pos", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("experts", pa.list_(pa.int16())),  # slot order, as the router returned them
        # Half precision keeps a token row at ~7 bytes (top-2 of 8) instead of ~27; DuckDB reads these as FLOAT.
        pa.field("weights", pa.list_(pa.float16())),
        pa.field("entropy", pa.float16()),  # H(p(t)) in nats
        pa.field("lse", pa.float16()),  # logsumexp(logits_t)
        pa.field("margin", pa.float16()),  # p(1) - p(2)
    ]
)

EXPERT_SIMILARITY = pa.schema(
    [
        pa.field("run", pa.string()),
        pa.field("rank", pa.int16()),
        pa.field("step", pa.int64()),
        pa.field("layer", pa.int16()),
        pa.field("expert_a", pa.int16()),
        pa.field("expert_b", pa.int16()),
        pa.field("metric", pa.string()),
        pa.field("value", pa.float64()),
    ]
)

EXPERT_SPECTRA = pa.schema(
    [
        pa.field("run", pa.string()),
        pa.field("rank", pa.int16()),
        pa.field("step", pa.int64()),
        pa.field("layer", pa.int16()),
        pa.field("expert", pa.int16()),
        pa.field("matrix", pa.string()),
        pa.field("idx", pa.int32()),
        pa.field("sigma", pa.float64()),
    ]
)

#: Online alerts raised while recording (moescope.capture.alerts), one row per rule × layer × flushed window,
#: written at the flush that raised them.
ALERTS = pa.schema(
    [
        pa.field("run", pa.string()),
        pa.field("rank", pa.int16()),
        pa.field("step", pa.int64()),  # last step of the window (the flush that raised it)
        pa.field("step_start", pa.int64()),  # first step of the window
        pa.field("layer", pa.int16()),
        pa.field("rule", pa.string()),
        pa.field("status", pa.string()),  # WARN | FAIL
        pa.field("value", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("experts", pa.list_(pa.int16())),
        pa.field("message", pa.string()),
    ]
)

#: Precision sensitivity (record(..., precision_check=True)): at each flush the flight sample of the latest step
#: is routed again by the router in its own dtype and as a float32 copy (same inputs, same weights).
ROUTER_PRECISION = pa.schema(
    _KEYS
    + [
        pa.field("sampled", pa.int64()),  # tokens routed both ways
        pa.field("flipped", pa.int64()),  # of those, tokens whose set of experts differs in float32
    ]
)

TABLES: dict[str, pa.Schema] = {
    "expert_load": EXPERT_LOAD,
    "router_stats": ROUTER_STATS,
    "routing": ROUTING,
    "expert_similarity": EXPERT_SIMILARITY,
    "expert_spectra": EXPERT_SPECTRA,
    "alerts": ALERTS,
    "router_precision": ROUTER_PRECISION,
}

#: DuckDB column types for building empty views of tables a run did not write.
_DUCK = {
    pa.string(): "VARCHAR",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.list_(pa.int16()): "SMALLINT[]",
    pa.list_(pa.float32()): "FLOAT[]",
    pa.float16(): "FLOAT",
    pa.list_(pa.float16()): "FLOAT[]",
}


def duckdb_columns(table: str) -> list[tuple[str, str]]:
    """Return (name, DuckDB type) pairs for one trace table."""
    return [(f.name, _DUCK[f.type]) for f in TABLES[table]]

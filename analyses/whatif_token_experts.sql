-- What-if expert cache input: the token-level expert requests of the selected runs and layers, per run, layer
-- and rank in token order (step, tag, seq, pos): each stream is replayed against its own cache. One query for
-- every run × layer (a query per run-layer made a root of 1,000 runs a thousand scans).
-- Parameters: filter (Raw; the selection).

-- stage: whatif_token_experts
SELECT run, layer, rank, experts
FROM routing
WHERE {{filter}}
ORDER BY run, layer, rank, step, tag, seq, pos

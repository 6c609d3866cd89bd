-- What-if expert cache input: one run-layer's token-level expert requests, per rank in token order
-- (step, tag, seq, pos): each rank's request stream is replayed against its own cache.
-- Parameters: filter (Raw; one run and one layer).

-- stage: whatif_token_experts
SELECT rank, experts
FROM routing
WHERE {{filter}}
ORDER BY rank, step, tag, seq, pos

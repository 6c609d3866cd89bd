-- What-if expert cache input: one run-layer's token-level expert requests in token order
-- (step, rank, tag, seq, pos): the request stream the cache simulation replays.
-- Parameters: filter (Raw; one run and one layer).

-- stage: whatif_token_experts
SELECT experts
FROM routing
WHERE {{filter}}
ORDER BY step, rank, tag, seq, pos

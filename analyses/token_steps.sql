-- The steps that hold token-level routing rows, per run: what the routing-based analyses (co-activation,
-- temporal locality, vocabulary specialization, sequence-unit drift, the routing what-ifs) cover. With
-- record(tokens_every=N) token rows exist on every N-th step only, while expert_load covers every step.

-- stage: token_steps
SELECT DISTINCT run, step
FROM routing
WHERE {{filter}}

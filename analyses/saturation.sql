-- Router saturation: the same tokens routed at a checkpoint (selection a) and at the final model
-- (selection b), matched on layer, token_id and {{join_on}}; per run × step of a and layer,
-- saturation = mean over tokens of |TopK_a ∩ TopK_b| / k (1.0 = the router has settled; chance k/N).

-- stage: sa
SELECT run, step, tag, layer, seq, pos, token_id, experts
FROM routing
WHERE {{filter_a}}

-- stage: sb
SELECT run, step, tag, layer, seq, pos, token_id, experts
FROM routing
WHERE {{filter_b}}

-- stage: matched
SELECT a.run, a.step, a.layer, a.tag, a.seq, a.pos, a.experts AS ea, b.experts AS eb
FROM sa a
JOIN sb b ON a.layer = b.layer AND a.token_id = b.token_id AND {{join_on}}

-- stage: hits
SELECT m.run, m.step, m.layer, SUM(CASE WHEN x.expert = y.expert THEN 1 ELSE 0 END) AS hits
FROM matched m
CROSS JOIN UNNEST(m.ea) AS x(expert)
CROSS JOIN UNNEST(m.eb) AS y(expert)
GROUP BY m.run, m.step, m.layer

-- stage: slots
SELECT m.run, m.step, m.layer, CAST(COUNT(*) AS DOUBLE) AS slots
FROM matched m
CROSS JOIN UNNEST(m.ea) AS x(expert)
GROUP BY m.run, m.step, m.layer

-- stage: matched_tokens
SELECT run, step, layer, COUNT(*) AS tokens
FROM matched
GROUP BY run, step, layer

-- stage: saturation
SELECT t.run, t.step, t.layer, li.n_experts, li.top_k, t.tokens,
       h.hits / NULLIF(s.slots, 0) AS saturation,
       CAST(li.top_k AS DOUBLE) / li.n_experts AS chance
FROM matched_tokens t
JOIN hits h ON h.run = t.run AND h.step = t.step AND h.layer = t.layer
JOIN slots s ON s.run = t.run AND s.step = t.step AND s.layer = t.layer
JOIN layer_info li ON li.run = t.run AND li.layer = t.layer

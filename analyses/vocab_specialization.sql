-- Vocabulary specialization per run × layer × step window: for each token id seen at least
-- {{min_count}} times, the share of its occurrences routed to its most frequent expert (1.0 = always the
-- same expert; chance ≈ k/N), averaged over token ids (specialization) and over occurrences (weighted).

-- stage: rt
SELECT run, step, layer, token_id, experts
FROM routing
WHERE {{filter}}

-- stage: src_steps
SELECT DISTINCT run, step FROM rt

-- include: windows

-- stage: tw
SELECT r.run, r.layer, w.win, r.token_id, r.experts
FROM rt r
JOIN step_win w ON r.run = w.run AND r.step = w.step

-- stage: occ
SELECT run, layer, win, token_id, CAST(COUNT(*) AS DOUBLE) AS n
FROM tw
GROUP BY run, layer, win, token_id

-- stage: te
SELECT tw.run, tw.layer, tw.win, tw.token_id, a.expert, COUNT(*) AS c
FROM tw
CROSS JOIN UNNEST(tw.experts) AS a(expert)
GROUP BY tw.run, tw.layer, tw.win, tw.token_id, a.expert

-- stage: top_expert
SELECT run, layer, win, token_id, MAX(c) AS top_c
FROM te
GROUP BY run, layer, win, token_id

-- stage: per_token
SELECT o.run, o.layer, o.win, o.token_id, o.n AS occurrences, t.top_c / o.n AS top_share
FROM occ o
JOIN top_expert t ON t.run = o.run AND t.layer = o.layer AND t.win = o.win AND t.token_id = o.token_id
WHERE o.n >= {{min_count}}

-- stage: vocab_specialization
SELECT p.run, p.layer, p.win, w.window_start, w.window_end, li.n_experts, li.top_k,
       COUNT(*) AS token_ids,
       SUM(p.occurrences) AS tokens,
       AVG(p.top_share) AS specialization,
       SUM(p.top_share * p.occurrences) / SUM(p.occurrences) AS weighted_specialization,
       CAST(li.top_k AS DOUBLE) / li.n_experts AS chance
FROM per_token p
JOIN wins w ON w.run = p.run AND w.win = p.win
JOIN layer_info li ON li.run = p.run AND li.layer = p.layer
GROUP BY p.run, p.layer, p.win, w.window_start, w.window_end, li.n_experts, li.top_k

-- layer_info: N (n_experts) and k (top_k) per run × layer. The manifest's `layers` (table manifest_layers)
-- wins; where it is silent, N = max expert id + 1 seen in expert_load and k = assignments / tokens
-- (expert_load over router_stats), rounded; still unknown k is filled from the routing lists (engine.py), else 1.
-- N never goes below the largest expert id seen.

-- stage: seen_load
SELECT run, layer, MAX(expert) + 1 AS n_seen, SUM(CAST(tokens AS DOUBLE)) AS assignments
FROM expert_load
GROUP BY run, layer

-- stage: seen_tok
SELECT run, layer, SUM(CAST(tokens AS DOUBLE)) AS tokens
FROM router_stats
GROUP BY run, layer

-- stage: layer_keys
SELECT run, layer FROM manifest_layers
UNION
SELECT run, layer FROM seen_load
UNION
SELECT run, layer FROM seen_tok

-- stage: layer_info
SELECT k.run, k.layer,
       CAST(NULLIF(GREATEST(COALESCE(m.n_experts, 0), COALESCE(s.n_seen, 0)), 0) AS INTEGER) AS n_experts,
       CAST(COALESCE(m.top_k, CASE WHEN t.tokens > 0 THEN GREATEST(1, ROUND(s.assignments / t.tokens)) END) AS INTEGER) AS top_k,
       m.router_kind, m.module
FROM layer_keys k
LEFT JOIN manifest_layers m ON m.run = k.run AND m.layer = k.layer
LEFT JOIN seen_load s ON s.run = k.run AND s.layer = k.layer
LEFT JOIN seen_tok t ON t.run = k.run AND t.layer = k.layer

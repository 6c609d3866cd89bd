-- Load and router metrics per run × layer × step window (DESIGN.md "Metric catalogue"):
--   cv = std(c)/mean(c) (population std over the N experts), maxvio = max(c)/mean(c) - 1,
--   load_entropy = H(f)/ln N, gini = Σ_i Σ_j |c_i - c_j| / (2 N² mean(c)) computed from the sorted counts
--   as Σ_i (2i - N - 1) c_(i) / (N Σc), aux_loss = N Σ f_e P_e (Switch), z_loss = Σ lse² / T,
--   router_entropy = mean H(p)/ln N, router_margin = mean p(1) - p(2),
--   top_m_share = share of the m = max(k, floor(N/4)) busiest experts (the collapse rule reads it),
--   m90 = how many of the busiest experts carry 90% of the assignments.

-- include: utilization

-- stage: ranked
SELECT u.*,
       ROW_NUMBER() OVER (PARTITION BY run, layer, win ORDER BY assignments ASC, expert ASC) AS rank_asc,
       ROW_NUMBER() OVER (PARTITION BY run, layer, win ORDER BY assignments DESC, expert ASC) AS rank_desc,
       SUM(assignments) OVER (PARTITION BY run, layer, win ORDER BY assignments DESC, expert ASC
                              ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS cum_desc,
       SUM(assignments) OVER (PARTITION BY run, layer, win) AS total
FROM utilization u

-- stage: lm
SELECT run, layer, win, window_start, window_end, n_experts, top_k,
       MAX(tokens) AS tokens,
       SUM(assignments) AS assignments,
       STDDEV_POP(assignments) / NULLIF(AVG(assignments), 0) AS cv,
       MAX(assignments) / NULLIF(AVG(assignments), 0) - 1 AS maxvio,
       -SUM(CASE WHEN assignments > 0 THEN assignments / total * LN(assignments / total) ELSE 0 END)
           / NULLIF(LN(n_experts), 0) AS load_entropy,
       SUM((2 * rank_asc - n_experts - 1) * assignments) / NULLIF(n_experts * SUM(assignments), 0) AS gini,
       n_experts * SUM(load_share * mean_prob) AS aux_loss,
       MIN(utilization) AS min_utilization,
       MAX(utilization) AS max_utilization,
       MIN(CASE WHEN cum_desc >= 0.9 * total THEN rank_desc END) AS m90,
       GREATEST(top_k, FLOOR(n_experts / 4.0)) AS collapse_m,
       SUM(CASE WHEN rank_desc <= GREATEST(top_k, FLOOR(n_experts / 4.0)) THEN assignments ELSE 0 END)
           / NULLIF(SUM(assignments), 0) AS top_m_share
FROM ranked
GROUP BY run, layer, win, window_start, window_end, n_experts, top_k

-- stage: cell_keys
SELECT run, layer, win FROM lm
UNION
SELECT run, layer, win FROM router_w

-- stage: load_metrics
SELECT k.run, k.layer, k.win, w.window_start, w.window_end,
       li.n_experts, li.top_k,
       COALESCE(lm.tokens, r.tokens) AS tokens,
       lm.assignments,
       li.top_k * COALESCE(lm.tokens, r.tokens) / li.n_experts AS expected_per_expert,
       lm.cv, lm.maxvio, lm.load_entropy, lm.gini, lm.aux_loss,
       lm.min_utilization, lm.max_utilization, lm.m90, lm.collapse_m, lm.top_m_share,
       r.lse_sq_sum / NULLIF(r.tokens, 0) AS z_loss,
       r.lse_max,
       r.entropy_sum / NULLIF(r.tokens * LN(li.n_experts), 0) AS router_entropy,
       r.margin_sum / NULLIF(r.tokens, 0) AS router_margin,
       r.lse_sq_sum AS lse_sq_sum,
       r.nonfinite,
       r.dropped,
       -- dropped counts routes (slots) that reached no expert: its rate is per route, of tokens × k
       r.dropped / NULLIF(r.tokens * li.top_k, 0) AS drop_rate
FROM cell_keys k
JOIN wins w ON w.run = k.run AND w.win = k.win
JOIN layer_info li ON li.run = k.run AND li.layer = k.layer
LEFT JOIN lm ON lm.run = k.run AND lm.layer = k.layer AND lm.win = k.win
LEFT JOIN router_w r ON r.run = k.run AND r.layer = k.layer AND r.win = k.win

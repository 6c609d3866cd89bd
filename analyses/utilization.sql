-- Utilization per run × layer × step window × expert: N·f_e with f_e = c_e / (kT); 1.0 is the fair share.
-- c_e: assignments (expert_load.tokens), T: tokens routed (router_stats; Σc/k where router_stats is absent),
-- P_e: mean router probability = prob_sum / T. Experts with no rows count as zero (layer_experts densifies).

-- stage: el
SELECT run, layer, step, expert, tokens, prob_sum
FROM expert_load
WHERE {{filter}}

-- stage: rs
SELECT run, layer, step, tokens, entropy_sum, lse_sq_sum, lse_max, margin_sum, nonfinite, dropped
FROM router_stats
WHERE {{filter}}

-- stage: src_steps
SELECT DISTINCT run, step FROM el
UNION
SELECT DISTINCT run, step FROM rs

-- include: windows

-- stage: load_w
SELECT e.run, e.layer, w.win, e.expert,
       SUM(CAST(e.tokens AS DOUBLE)) AS c, SUM(e.prob_sum) AS prob_sum
FROM el e
JOIN step_win w ON e.run = w.run AND e.step = w.step
GROUP BY e.run, e.layer, w.win, e.expert

-- stage: router_w
SELECT r.run, r.layer, w.win,
       SUM(CAST(r.tokens AS DOUBLE)) AS tokens,
       SUM(r.entropy_sum) AS entropy_sum,
       SUM(r.lse_sq_sum) AS lse_sq_sum,
       MAX(r.lse_max) AS lse_max,
       SUM(r.margin_sum) AS margin_sum,
       SUM(r.nonfinite) AS nonfinite,
       SUM(r.dropped) AS dropped
FROM rs r
JOIN step_win w ON r.run = w.run AND r.step = w.step
GROUP BY r.run, r.layer, w.win

-- stage: cells
-- has_prob: the window recorded router probabilities at all (NULL prob_sum: a spec or importer that reads none);
-- only then does an expert without rows have P_e = 0, else P_e (and the aux loss) stay unknown, never 0
SELECT run, layer, win, SUM(c) AS assignments, COUNT(prob_sum) > 0 AS has_prob
FROM load_w
GROUP BY run, layer, win

-- stage: dense
SELECT c.run, c.layer, c.win, x.expert, li.n_experts, li.top_k,
       COALESCE(l.c, 0) AS c,
       CASE WHEN c.has_prob THEN COALESCE(l.prob_sum, 0) END AS prob_sum,
       COALESCE(NULLIF(r.tokens, 0), c.assignments / li.top_k) AS t
FROM cells c
JOIN layer_info li ON li.run = c.run AND li.layer = c.layer
JOIN layer_experts x ON x.run = c.run AND x.layer = c.layer
LEFT JOIN load_w l ON l.run = c.run AND l.layer = c.layer AND l.win = c.win AND l.expert = x.expert
LEFT JOIN router_w r ON r.run = c.run AND r.layer = c.layer AND r.win = c.win

-- stage: utilization
SELECT d.run, d.layer, d.win, w.window_start, w.window_end, d.expert,
       d.c AS assignments, d.t AS tokens, d.n_experts, d.top_k,
       d.c / NULLIF(d.top_k * d.t, 0) AS load_share,
       d.n_experts * d.c / NULLIF(d.top_k * d.t, 0) AS utilization,
       d.prob_sum / NULLIF(d.t, 0) AS mean_prob
FROM dense d
JOIN wins w ON w.run = d.run AND w.win = d.win

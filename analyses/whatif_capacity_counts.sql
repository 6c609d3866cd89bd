-- What-if capacity factor from per-step expert counts, for runs without token-level routing.
--
-- Within one capacity group the number of dropped assignments is sum_e max(0, c_e - capacity) whatever the
-- priority order, so with one forward pass per (rank, step, tag) and group 'batch' this is exact; where a step
-- sums several micro-batches it is a lower bound: sum_m max(0, c_m - cap_m) >= max(0, sum_m c_m - sum_m cap_m).
-- Which tokens lose which choice needs token-level routing, so those columns are NULL here.
-- Parameters: filter (Raw), layer_rows (Raw), factor_rows (Raw), window, n_windows.

-- stage: rs
SELECT run, rank, step, tag, layer, tokens, dropped
FROM router_stats
WHERE {{filter}}

-- stage: src_steps
SELECT DISTINCT run, step FROM rs

-- include: windows

-- stage: wc_layers
SELECT * FROM (VALUES {{layer_rows}}) AS v(run, layer, n_experts, top_k)

-- stage: wc_factors
SELECT * FROM (VALUES {{factor_rows}}) AS v(capacity_factor)

-- stage: wc_passes
SELECT run, rank, step, tag, layer, SUM(tokens) AS tokens
FROM rs
GROUP BY run, rank, step, tag, layer

-- stage: wc_loads
SELECT run, rank, step, tag, layer, expert, SUM(tokens) AS c
FROM expert_load
WHERE {{filter}} AND expert >= 0
GROUP BY run, rank, step, tag, layer, expert

-- stage: wc_caps
SELECT p.run, p.rank, p.step, p.tag, p.layer, p.tokens, f.capacity_factor,
       CEIL(f.capacity_factor * l.top_k * p.tokens / l.n_experts - 1e-9) AS capacity
FROM wc_passes p
JOIN wc_layers l ON l.run = p.run AND l.layer = p.layer
CROSS JOIN wc_factors f

-- stage: wc_over
SELECT c.run, c.step, c.layer, c.capacity_factor, c.tokens,
       SUM(x.c) AS assignments,
       SUM(CASE WHEN x.c > c.capacity THEN x.c - c.capacity ELSE 0 END) AS dropped
FROM wc_caps c
JOIN wc_loads x ON x.run = c.run AND x.rank = c.rank AND x.step = c.step AND x.tag = c.tag AND x.layer = c.layer
GROUP BY c.run, c.rank, c.step, c.tag, c.layer, c.capacity_factor, c.tokens

-- stage: wc_cells
SELECT o.run, o.layer, w.win, o.capacity_factor,
       SUM(o.tokens) AS tokens,
       SUM(o.assignments) AS assignments,
       SUM(o.dropped) AS dropped_assignments,
       SUM(o.dropped) * 1.0 / NULLIF(SUM(o.assignments), 0) AS drop_rate
FROM wc_over o
JOIN step_win w ON w.run = o.run AND w.step = o.step
GROUP BY o.run, o.layer, w.win, o.capacity_factor

-- stage: wc_router
SELECT r.run, r.layer, w.win,
       SUM(r.tokens) AS routed_tokens,
       -- router_stats.dropped counts routes: per route, like drop_rate
       CASE WHEN SUM(r.dropped) > 0 THEN SUM(r.dropped) * 1.0 / NULLIF(SUM(r.tokens) * MAX(l.top_k), 0) END
           AS reported_drop_rate
FROM rs r
JOIN step_win w ON w.run = r.run AND w.step = r.step
JOIN wc_layers l ON l.run = r.run AND l.layer = r.layer
GROUP BY r.run, r.layer, w.win

-- stage: whatif_capacity_counts
SELECT c.run, c.layer, c.win, w.window_start, w.window_end, c.capacity_factor,
       c.tokens, c.assignments, c.dropped_assignments, c.drop_rate,
       CAST(NULL AS DOUBLE) AS token_drop_rate,
       CAST(NULL AS DOUBLE) AS full_drop_rate,
       CAST(NULL AS DOUBLE) AS first_choice_drop_rate,
       p.routed_tokens, 1.0 AS coverage, p.reported_drop_rate
FROM wc_cells c
JOIN wins w ON w.run = c.run AND w.win = c.win
LEFT JOIN wc_router p ON p.run = c.run AND p.layer = c.layer AND p.win = c.win

-- What-if capacity factor, replayed on token-level routing (DESIGN.md "Systems what-ifs").
--
-- capacity = ceil(cf * k * T_group / N) assignments per expert per capacity group. Each expert's queue is
-- filled in priority order -- every first choice in token order, then every second choice, ... (DeepSpeed,
-- GShard) -- so second choices are dropped before first choices. The capacity group is one forward pass
-- (run, rank, step, tag, layer) for {{mode}} 'batch', one sequence of it for 'sequence', and runs of
-- {{group_size}} consecutive tokens in (seq, pos) order for 'tokens'.
-- drop_rate counts dropped assignments; token_drop_rate tokens that lost any choice; full_drop_rate tokens
-- that lost every choice (they skip the layer); first_choice_drop_rate tokens that lost their first choice.
-- reported_drop_rate is router_stats.dropped (routes) / (tokens × k) where the model reported drops
-- (else NULL).
-- Parameters: filter (Raw), mode, group_size, layer_rows (Raw: (run, layer, n_experts, top_k) tuples),
-- factor_rows (Raw: (capacity_factor) tuples), window, n_windows.

-- stage: rs
SELECT run, layer, step, tokens, dropped
FROM router_stats
WHERE {{filter}}

-- stage: src_steps
SELECT DISTINCT run, step FROM rs

-- include: windows

-- stage: wc_layers
SELECT * FROM (VALUES {{layer_rows}}) AS v(run, layer, n_experts, top_k)

-- stage: wc_factors
SELECT * FROM (VALUES {{factor_rows}}) AS v(capacity_factor)

-- stage: wc_asg
SELECT run, rank, step, tag, layer, seq, pos, expert,
       -- token index within its forward pass, and which choice (1st, 2nd, ...) the slot holds
       DENSE_RANK() OVER (PARTITION BY run, rank, step, tag, layer ORDER BY seq, pos) - 1 AS idx,
       ROW_NUMBER() OVER (PARTITION BY run, rank, step, tag, layer, seq, pos ORDER BY slot) AS choice
FROM assignments
WHERE {{filter}} AND expert >= 0

-- stage: wc_grouped
SELECT a.*,
       CASE WHEN {{mode}} = 'batch' THEN 0
            WHEN {{mode}} = 'sequence' THEN a.seq
            ELSE CAST(FLOOR(a.idx / {{group_size}}) AS BIGINT)
       END AS grp
FROM wc_asg a

-- stage: wc_queued
SELECT g.*,
       -- every token has exactly one first choice, so this counts the group's tokens
       SUM(CASE WHEN g.choice = 1 THEN 1 ELSE 0 END)
           OVER (PARTITION BY g.run, g.rank, g.step, g.tag, g.layer, g.grp) AS group_tokens,
       ROW_NUMBER() OVER (PARTITION BY g.run, g.rank, g.step, g.tag, g.layer, g.grp, g.expert
                          ORDER BY g.choice, g.idx) AS queue_pos
FROM wc_grouped g

-- stage: wc_judged
SELECT q.run, q.rank, q.step, q.tag, q.layer, q.seq, q.pos, q.choice, f.capacity_factor,
       -- the 1e-9 keeps float noise (1.1 * 2 * 8 / 4 = 4.4000000000000004) from adding a slot
       CASE WHEN q.queue_pos > CEIL(f.capacity_factor * l.top_k * q.group_tokens / l.n_experts - 1e-9)
            THEN 1 ELSE 0 END AS dropped
FROM wc_queued q
JOIN wc_layers l ON l.run = q.run AND l.layer = q.layer
CROSS JOIN wc_factors f

-- stage: wc_tokens
SELECT j.run, j.layer, j.step, j.capacity_factor,
       COUNT(*) AS n_asg,
       SUM(j.dropped) AS n_dropped,
       MAX(CASE WHEN j.choice = 1 THEN j.dropped ELSE 0 END) AS first_dropped
FROM wc_judged j
GROUP BY j.run, j.rank, j.step, j.tag, j.layer, j.seq, j.pos, j.capacity_factor

-- stage: wc_cells
SELECT t.run, t.layer, w.win, t.capacity_factor,
       COUNT(*) AS tokens,
       SUM(t.n_asg) AS assignments,
       SUM(t.n_dropped) AS dropped_assignments,
       SUM(t.n_dropped) * 1.0 / SUM(t.n_asg) AS drop_rate,
       AVG(CASE WHEN t.n_dropped > 0 THEN 1.0 ELSE 0.0 END) AS token_drop_rate,
       AVG(CASE WHEN t.n_dropped = t.n_asg THEN 1.0 ELSE 0.0 END) AS full_drop_rate,
       AVG(t.first_dropped * 1.0) AS first_choice_drop_rate
FROM wc_tokens t
JOIN step_win w ON w.run = t.run AND w.step = t.step
GROUP BY t.run, t.layer, w.win, t.capacity_factor

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

-- stage: whatif_capacity
SELECT c.run, c.layer, c.win, w.window_start, w.window_end, c.capacity_factor,
       c.tokens, c.assignments, c.dropped_assignments, c.drop_rate, c.token_drop_rate, c.full_drop_rate,
       c.first_choice_drop_rate, p.routed_tokens, c.tokens * 1.0 / NULLIF(p.routed_tokens, 0) AS coverage, p.reported_drop_rate
FROM wc_cells c
JOIN wins w ON w.run = c.run AND w.win = c.win
LEFT JOIN wc_router p ON p.run = c.run AND p.layer = c.layer AND p.win = c.win

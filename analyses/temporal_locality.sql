-- Temporal locality per run × layer × step window: over consecutive kept tokens of a sequence
-- (pos and pos + 1), the share whose first choice is the same expert (first_choice) and the share
-- that share any expert (any_expert). Chance levels (1/N and 1 - C(N-k,k)/C(N,k)) are added by Python.

-- stage: rt
SELECT run, rank, step, tag, layer, seq, pos, experts
FROM routing
WHERE {{filter}}

-- stage: nb
SELECT run, step, layer, pos, experts,
       LAG(experts) OVER (PARTITION BY run, rank, step, tag, layer, seq ORDER BY pos) AS prev_experts,
       LAG(pos) OVER (PARTITION BY run, rank, step, tag, layer, seq ORDER BY pos) AS prev_pos
FROM rt

-- stage: per_step
SELECT run, step, layer,
       CAST(COUNT(*) AS DOUBLE) AS pairs,
       SUM(CASE WHEN experts[1] = prev_experts[1] THEN 1 ELSE 0 END) AS same_first,
       -- list_has_any is DuckDB's name for arrays_overlap (Spark, Trino); moescope/analysis/dialects.py translates it
       SUM(CASE WHEN list_has_any(experts, prev_experts) THEN 1 ELSE 0 END) AS share_any
FROM nb
WHERE prev_pos = pos - 1
GROUP BY run, step, layer

-- stage: src_steps
SELECT DISTINCT run, step FROM per_step

-- include: windows

-- stage: temporal_locality
SELECT p.run, p.layer, w.win, ws.window_start, ws.window_end, li.n_experts, li.top_k,
       SUM(p.pairs) AS pairs,
       SUM(p.same_first) / SUM(p.pairs) AS first_choice,
       SUM(p.share_any) / SUM(p.pairs) AS any_expert
FROM per_step p
JOIN step_win w ON w.run = p.run AND w.step = p.step
JOIN wins ws ON ws.run = w.run AND ws.win = w.win
JOIN layer_info li ON li.run = p.run AND li.layer = p.layer
GROUP BY p.run, p.layer, w.win, ws.window_start, ws.window_end, li.n_experts, li.top_k

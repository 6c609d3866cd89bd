-- Co-activation per run × layer × step window over every ordered pair of experts (a, b), a ≠ b:
--   p_b_given_a = N(a,b) / N(a)  (of the tokens that chose a, the share that also chose b),
--   lift = P(a,b) / (P(a) P(b)) = N(a,b) T / (N(a) N(b))  (1.0 = independent).
-- Tokens are first counted per distinct expert list (at most N!/(N-k)! of them), so the pair
-- expansion runs over a tiny table instead of every token.

-- stage: combos
SELECT run, step, layer, experts, CAST(COUNT(*) AS DOUBLE) AS n
FROM routing
WHERE {{filter}}
GROUP BY run, step, layer, experts

-- stage: src_steps
SELECT DISTINCT run, step FROM combos

-- include: windows

-- stage: cw
SELECT c.run, c.layer, w.win, c.experts, SUM(c.n) AS n
FROM combos c
JOIN step_win w ON c.run = w.run AND c.step = w.step
GROUP BY c.run, c.layer, w.win, c.experts

-- stage: cell_tokens
SELECT run, layer, win, SUM(n) AS tokens
FROM cw
GROUP BY run, layer, win

-- stage: singles
SELECT cw.run, cw.layer, cw.win, a.expert, SUM(cw.n) AS n_a
FROM cw
CROSS JOIN UNNEST(cw.experts) AS a(expert)
GROUP BY cw.run, cw.layer, cw.win, a.expert

-- stage: pair_counts
SELECT cw.run, cw.layer, cw.win, a.expert AS expert_a, b.expert AS expert_b, SUM(cw.n) AS n_ab
FROM cw
CROSS JOIN UNNEST(cw.experts) AS a(expert)
CROSS JOIN UNNEST(cw.experts) AS b(expert)
WHERE a.expert <> b.expert
GROUP BY cw.run, cw.layer, cw.win, a.expert, b.expert

-- stage: coactivation
SELECT t.run, t.layer, t.win, w.window_start, w.window_end,
       xa.expert AS expert_a, xb.expert AS expert_b,
       t.tokens,
       COALESCE(sa.n_a, 0) AS n_a,
       COALESCE(sb.n_a, 0) AS n_b,
       COALESCE(p.n_ab, 0) AS n_ab,
       COALESCE(p.n_ab, 0) / NULLIF(sa.n_a, 0) AS p_b_given_a,
       COALESCE(p.n_ab, 0) * t.tokens / NULLIF(sa.n_a * sb.n_a, 0) AS lift
FROM cell_tokens t
JOIN wins w ON w.run = t.run AND w.win = t.win
JOIN layer_experts xa ON xa.run = t.run AND xa.layer = t.layer
JOIN layer_experts xb ON xb.run = t.run AND xb.layer = t.layer AND xb.expert <> xa.expert
LEFT JOIN singles sa ON sa.run = t.run AND sa.layer = t.layer AND sa.win = t.win AND sa.expert = xa.expert
LEFT JOIN singles sb ON sb.run = t.run AND sb.layer = t.layer AND sb.win = t.win AND sb.expert = xb.expert
LEFT JOIN pair_counts p ON p.run = t.run AND p.layer = t.layer AND p.win = t.win
                       AND p.expert_a = xa.expert AND p.expert_b = xb.expert

-- Domain specialization per run × layer × step window × tag × expert:
--   share = the tag's assignments to e / the tag's tokens (the share of its tokens routed to e; chance k/N),
--   specialization = share / chance (1.0 = no preference), expert_tag_share = share of e's load from this tag.

-- stage: el
SELECT run, layer, step, tag, expert, tokens
FROM expert_load
WHERE {{filter}}

-- stage: rs
SELECT run, layer, step, tag, tokens
FROM router_stats
WHERE {{filter}}

-- stage: src_steps
SELECT DISTINCT run, step FROM el
UNION
SELECT DISTINCT run, step FROM rs

-- include: windows

-- stage: tag_load
SELECT e.run, e.layer, w.win, e.tag, e.expert, SUM(CAST(e.tokens AS DOUBLE)) AS c
FROM el e
JOIN step_win w ON e.run = w.run AND e.step = w.step
GROUP BY e.run, e.layer, w.win, e.tag, e.expert

-- stage: tag_tokens
SELECT r.run, r.layer, w.win, r.tag, SUM(CAST(r.tokens AS DOUBLE)) AS tokens
FROM rs r
JOIN step_win w ON r.run = w.run AND r.step = w.step
GROUP BY r.run, r.layer, w.win, r.tag

-- stage: tag_cells
SELECT run, layer, win, tag, SUM(c) AS assignments
FROM tag_load
GROUP BY run, layer, win, tag

-- stage: expert_tot
SELECT run, layer, win, expert, SUM(c) AS c
FROM tag_load
GROUP BY run, layer, win, expert

-- stage: ds
SELECT a.run, a.layer, a.win, a.tag, x.expert, li.n_experts, li.top_k,
       COALESCE(l.c, 0) AS assignments,
       COALESCE(NULLIF(t.tokens, 0), a.assignments / li.top_k) AS tokens,
       CAST(li.top_k AS DOUBLE) / li.n_experts AS chance,
       COALESCE(l.c, 0) / NULLIF(et.c, 0) AS expert_tag_share
FROM tag_cells a
JOIN layer_info li ON li.run = a.run AND li.layer = a.layer
JOIN layer_experts x ON x.run = a.run AND x.layer = a.layer
LEFT JOIN tag_load l ON l.run = a.run AND l.layer = a.layer AND l.win = a.win AND l.tag = a.tag AND l.expert = x.expert
LEFT JOIN tag_tokens t ON t.run = a.run AND t.layer = a.layer AND t.win = a.win AND t.tag = a.tag
LEFT JOIN expert_tot et ON et.run = a.run AND et.layer = a.layer AND et.win = a.win AND et.expert = x.expert

-- stage: domain_specialization
SELECT d.run, d.layer, d.win, w.window_start, w.window_end, d.tag, d.expert, d.n_experts, d.top_k,
       d.assignments, d.tokens,
       d.assignments / NULLIF(d.tokens, 0) AS share,
       d.chance,
       d.assignments / NULLIF(d.tokens, 0) / d.chance AS specialization,
       d.expert_tag_share
FROM ds d
JOIN wins w ON w.run = d.run AND w.win = d.win

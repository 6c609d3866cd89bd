-- Clone candidates: every unordered expert pair at each (run, layer)'s latest similarity snapshot,
-- with the largest value over the metrics {{metrics}}; the clones rule flags those above its threshold.

-- stage: sim
SELECT run, step, layer, metric,
       LEAST(expert_a, expert_b) AS expert_a, GREATEST(expert_a, expert_b) AS expert_b,
       MAX(value) AS value
FROM expert_similarity
WHERE {{filter}} AND expert_a <> expert_b AND metric IN ({{metrics}})
GROUP BY run, step, layer, metric, LEAST(expert_a, expert_b), GREATEST(expert_a, expert_b)

-- stage: latest
SELECT run, layer, MAX(step) AS step
FROM sim
GROUP BY run, layer

-- stage: clones
SELECT s.run, s.step, s.layer, s.metric, s.expert_a, s.expert_b, s.value
FROM sim s
JOIN latest l ON l.run = s.run AND l.layer = s.layer AND l.step = s.step

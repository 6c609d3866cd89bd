-- Expert × expert similarity per run, checkpoint step, layer and metric (written by snapshot_experts).

-- stage: similarity
SELECT run, step, layer, expert_a, expert_b, metric, value
FROM expert_similarity
WHERE {{filter}}

-- Drift input: the expert-load distribution of one selection, per layer × expert (assignments).

-- stage: drift_load
SELECT layer, expert, SUM(CAST(tokens AS DOUBLE)) AS c
FROM expert_load
WHERE {{filter}}
GROUP BY layer, expert

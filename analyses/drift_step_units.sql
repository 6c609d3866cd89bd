-- Drift bootstrap units where no token-level routing exists: per (run, step) × layer × expert from expert_load.

-- stage: drift_step_units
SELECT run, step, layer, expert, SUM(CAST(tokens AS DOUBLE)) AS c
FROM expert_load
WHERE {{filter}}
GROUP BY run, step, layer, expert

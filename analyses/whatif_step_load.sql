-- What-if placement input: assignments per run, step, layer and expert, summed over ranks and tags (every
-- data-parallel rank sends its tokens to the same expert-parallel group).
-- Parameters: filter (Raw; run and step range).

-- stage: whatif_step_load
SELECT run, step, layer, expert, SUM(tokens) AS tokens
FROM expert_load
WHERE {{filter}} AND expert >= 0
GROUP BY run, step, layer, expert

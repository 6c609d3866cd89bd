-- Precision sensitivity per run × layer (record(..., precision_check=True)): of the tokens sampled at each
-- flush and routed again by the router in its own dtype and as a float32 copy, how many changed experts.
-- The precision rule WARNs above its rate.

-- stage: precision
SELECT run, layer,
       SUM(sampled) AS sampled,
       SUM(flipped) AS flipped,
       CAST(SUM(flipped) AS DOUBLE) / NULLIF(SUM(sampled), 0) AS flip_rate,
       MIN(step) AS step_start,
       MAX(step) AS step_end
FROM router_precision
WHERE {{filter}}
GROUP BY run, layer
ORDER BY run, layer

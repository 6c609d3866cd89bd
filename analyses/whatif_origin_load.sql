-- What-if all-to-all input: token-level assignments per run, step, layer, origin device and expert. A token's
-- origin is its data-parallel device, sequences dealt round-robin: seq mod D.
-- Parameters: filter (Raw; run and step range), devices.

-- stage: whatif_origin_load
SELECT run, step, layer, MOD(seq, {{devices}}) AS origin, expert, COUNT(*) AS n
FROM assignments
WHERE {{filter}} AND expert >= 0
GROUP BY run, step, layer, MOD(seq, {{devices}}), expert

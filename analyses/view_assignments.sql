-- The `assignments` view: routing unnested, one row per token × layer × slot.
-- slot is 0-based in the router's slot order (slot 0 = first choice); expert and weight are that slot's.
-- This view is the one DuckDB-specific spelling here (multiple UNNEST in one SELECT list zip the lists);
-- Spark writes it with posexplode / arrays_zip, Trino with UNNEST ... WITH ORDINALITY.

-- stage: assignments
SELECT run, rank, step, tag, layer, seq, pos, token_id,
       UNNEST(range(len(experts))) AS slot,
       UNNEST(experts) AS expert,
       UNNEST(weights) AS weight,
       entropy, lse, margin
FROM routing

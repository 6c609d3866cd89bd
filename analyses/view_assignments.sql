-- The `assignments` view: routing unnested, one row per token × layer × slot.
-- slot is 0-based in the router's slot order (slot 0 = first choice); expert and weight are that slot's.
-- This view is the one DuckDB-specific spelling here (multiple UNNEST in one SELECT list zip the lists; a
-- portable UNNEST of slot numbers with list indexing was 40x slower on DuckDB). engine=spark does not define
-- it: routing's weights are half floats, which Spark's Parquet reader rejects (moescope/analysis/spark.py).

-- stage: assignments
SELECT run, rank, step, tag, layer, seq, pos, token_id,
       UNNEST(range(len(experts))) AS slot,
       UNNEST(experts) AS expert,
       UNNEST(weights) AS weight,
       entropy, lse, margin
FROM routing

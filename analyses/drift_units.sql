-- Drift bootstrap units from token-level routing: per whole sequence (run, rank, step, tag, seq) × layer × expert,
-- the assignments and the sequence's token count, so resampling keeps a sequence's tokens together.

-- stage: ru
SELECT run, rank, step, tag, seq, layer, experts
FROM routing
WHERE {{filter}}

-- stage: drift_units
SELECT r.run, r.rank, r.step, r.tag, r.seq, r.layer, a.expert, CAST(COUNT(*) AS DOUBLE) AS c
FROM ru r
CROSS JOIN UNNEST(r.experts) AS a(expert)
GROUP BY r.run, r.rank, r.step, r.tag, r.seq, r.layer, a.expert

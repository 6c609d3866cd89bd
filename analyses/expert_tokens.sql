-- What each expert takes, per run × layer × step window × expert: the token ids routed to it most, ranked by
-- the share of each token id's occurrences that went to this expert (token ids seen at least {{min_count}} times;
-- chance k/N: a router that ignored the token), the {{top}} best kept. The per-token counts are the stages of
-- vocab_specialization.sql (one definition of "a token id's occurrences" and "its assignments to an expert");
-- ids that are not an expert of the layer (a dropped slot, an id >= N) are never counted as one.

-- include: vocab_specialization

-- stage: expert_token
SELECT e.run, e.layer, e.win, e.expert, e.token_id, e.c AS assignments, o.n AS occurrences,
       e.c / o.n AS share
FROM te e
JOIN occ o ON o.run = e.run AND o.layer = e.layer AND o.win = e.win AND o.token_id = e.token_id
JOIN layer_experts x ON x.run = e.run AND x.layer = e.layer AND x.expert = e.expert
WHERE o.n >= {{min_count}}

-- stage: expert_seen
SELECT run, layer, win, expert, COUNT(*) AS token_ids_seen
FROM expert_token
GROUP BY run, layer, win, expert

-- stage: expert_ranked
SELECT run, layer, win, expert, token_id, assignments, occurrences, share,
       ROW_NUMBER() OVER (PARTITION BY run, layer, win, expert
                          ORDER BY share DESC, occurrences DESC, token_id) AS place
FROM expert_token

-- stage: expert_tokens
SELECT r.run, r.layer, r.win, w.window_start, w.window_end, li.n_experts, li.top_k, r.expert, r.place,
       r.token_id, r.assignments, r.occurrences, r.share,
       CAST(li.top_k AS DOUBLE) / li.n_experts AS chance,
       s.token_ids_seen
FROM expert_ranked r
JOIN wins w ON w.run = r.run AND w.win = r.win
JOIN layer_info li ON li.run = r.run AND li.layer = r.layer
JOIN expert_seen s ON s.run = r.run AND s.layer = r.layer AND s.win = r.win AND s.expert = r.expert
WHERE r.place <= {{top}}
ORDER BY r.run, r.layer, r.win, r.expert, r.place

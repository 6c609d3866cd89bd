-- Shared stages: step windows. The including file defines `src_steps` (distinct run, step) first.
-- {{window}} > 0: fixed windows of that many steps aligned to multiples of it;
-- otherwise each run's observed step range is cut into {{n_windows}} equal parts (3 = thirds, 1 = all).

-- stage: span
SELECT run, MIN(step) AS lo, MAX(step) AS hi
FROM src_steps
GROUP BY run

-- stage: step_win
SELECT s.run, s.step,
       CASE WHEN {{window}} > 0
            THEN CAST(FLOOR(s.step / CAST(NULLIF({{window}}, 0) AS DOUBLE)) AS BIGINT)
            ELSE CAST(FLOOR({{n_windows}} * (s.step - p.lo) / (p.hi - p.lo + 1.0)) AS BIGINT)
       END AS win
FROM src_steps s
JOIN span p ON s.run = p.run

-- stage: wins
SELECT run, win, MIN(step) AS window_start, MAX(step) AS window_end
FROM step_win
GROUP BY run, win

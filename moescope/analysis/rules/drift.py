"""Drift thresholds: the settings `moescope check --reference` and `Trace.drift` flag a layer by."""

from __future__ import annotations

from dataclasses import dataclass

from .base import limit


@dataclass
class DriftConfig:
    """Drift flags a layer when JS > max(js_min, bootstrap quantile) and TV > tv_min."""

    js_min: float = limit(0.1, 0, 1)
    tv_min: float = limit(0.05, 0, 1)
    n_boot: int = limit(200, 1, integer=True, doc="bootstrap resamples (≥ 1)")
    quantile: float = limit(0.95, 0, 1, lo_open=True, hi_open=True)
    seed: int = limit(0, 0, integer=True)
    max_units: int = limit(20_000, 2, integer=True)

    def check(self) -> str | None:
        """No cross-field constraints."""
        return None

"""The health-rule registry: each rule defined once (name, config with defaults and ranges, metric, evaluation).

`Trace.health()`, the online alerts, `moescope.toml` loading, `check`, `report` and the dashboard's threshold
lines all read `REGISTRY`. Pure Python and numpy: importing it pulls in neither duckdb nor torch.

Where to add a rule: a module here defining its config dataclass (fields with `limit(...)` ranges) and an
evaluate function, registered with `register(RuleSpec(...))`; one import line below; a known-answer test;
a row in moescope.example.toml.
"""

from __future__ import annotations

# Importing a rule module registers its rules: import order is report order (isort must keep it).
from . import load  # noqa: F401  (dead_expert, load_cv, maxvio, collapse)

# isort: split
from . import router  # noqa: F401  (z_loss, nonfinite)

# isort: split
from . import overconfidence  # noqa: F401

# isort: split
from . import similarity  # noqa: F401  (clones)

# isort: split
from . import precision  # noqa: F401  (precision sensitivity)

# isort: split
from .base import (
    COLUMNS,
    REGISTRY,
    STATUS_ORDER,
    Cell,
    Range,
    RangeError,
    RuleConfig,
    RuleSpec,
    Status,
    Window,
    as_float,
    check_ranges,
    finding,
    register,
    rules,
    severity,
    skip_reason,
    window_label,
    worst,
)
from .drift import DriftConfig
from .load import CollapseRule, DeadExpertRule, LoadCVRule, MaxVioRule
from .overconfidence import OverconfidenceRule
from .router import NonFiniteRule, ZLossRule
from .similarity import SIMILARITY_METRICS, ClonesRule
from .values import cell_from_counts, cell_values, collapse_m, utilization

__all__ = [
    "COLUMNS",
    "REGISTRY",
    "SIMILARITY_METRICS",
    "STATUS_ORDER",
    "Cell",
    "ClonesRule",
    "CollapseRule",
    "DeadExpertRule",
    "DriftConfig",
    "LoadCVRule",
    "MaxVioRule",
    "NonFiniteRule",
    "OverconfidenceRule",
    "Range",
    "RangeError",
    "RuleConfig",
    "RuleSpec",
    "Status",
    "Window",
    "ZLossRule",
    "as_float",
    "cell_from_counts",
    "cell_values",
    "check_ranges",
    "collapse_m",
    "finding",
    "register",
    "rules",
    "severity",
    "skip_reason",
    "utilization",
    "window_label",
    "worst",
]

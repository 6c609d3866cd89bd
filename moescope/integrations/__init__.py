"""Training-loop integrations: `moescope.integrations.lightning` (MoEScopeCallback), `moescope.integrations.hf`
(MoEScopeTrainerCallback), and `metrics_from_tables`, the per-layer load scalars of a flush for your own logger
(pass `on_flush=` to `moescope.record`). Importing this package needs neither Lightning nor transformers."""

from ._scalars import metrics_from_tables

__all__ = ["metrics_from_tables"]

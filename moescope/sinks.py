"""`moescope.sinks` is `moescope.integrations.sinks`: WandB, MLflow, TensorBoard, Prometheus (README: Metric sinks)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("moescope.integrations.sinks")

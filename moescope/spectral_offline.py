"""Old import path kept working: `moescope.spectral_offline` is `moescope.capture.spectral_maths` (moved by the redesign; docs/ARCHITECTURE.md)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("moescope.capture.spectral_maths")

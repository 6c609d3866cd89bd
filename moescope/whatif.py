"""Old import path kept working: `moescope.whatif` is `moescope.analysis.whatif` (moved by the redesign; docs/ARCHITECTURE.md)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("moescope.analysis.whatif")

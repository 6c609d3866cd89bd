"""Old import path kept working: `moescope.spectral` is `moescope.capture.spectral` (moved by the redesign; docs/ARCHITECTURE.md)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("moescope.capture.spectral")

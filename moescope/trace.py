"""Old import path kept working: `moescope.trace` is `moescope.format.writer` (moved by the redesign; docs/ARCHITECTURE.md)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("moescope.format.writer")

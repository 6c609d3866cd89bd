"""Old import path kept working: `moescope.schema` is `moescope.format.schema` (moved by the redesign; docs/ARCHITECTURE.md)."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("moescope.format.schema")

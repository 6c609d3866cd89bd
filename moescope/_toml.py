"""TOML reading on every supported Python: tomllib (3.11+) or its backport tomli (3.10, declared in pyproject)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by tests/unit/test_packaging.py with a patched version_info
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
loads = tomllib.loads

__all__ = ["TOMLDecodeError", "loads", "tomllib"]

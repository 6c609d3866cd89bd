"""Locating the declarative content folders (hooks/, analyses/, dashboard/) in a wheel or a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def content_dir(name: str) -> Path:
    """Return the folder `name` from the installed wheel, else from the source checkout."""
    for candidate in (_PKG / "_content" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"moescope content folder {name!r} not found (broken install?)")

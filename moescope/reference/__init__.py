"""The bundled reference MoE: a small Mixtral-style decoder (model), stdlib text data (data), demo scenarios.

`model` has no moescope imports on purpose: it stands for "your model", which knows nothing of the tool.
Everything here needs torch; import the submodules directly (`from moescope.reference.model import MoEModel`).
"""

from __future__ import annotations

__all__ = ["data", "model", "scenarios"]

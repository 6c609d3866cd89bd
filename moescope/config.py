"""Health-rule configuration: the `HealthConfig` dataclass and `load_config(path)` for moescope.toml.

    [health]                 # applies to every rule unless the rule sets its own
    window = "thirds"        # "thirds" (default), "all", or a width in steps, e.g. 500
    min_tokens = 50          # load rules SKIP where expected assignments per expert kT/N is below this

    [rules.dead_expert]      # one table per rule; every rule takes enabled = true/false and window = ...
    fail_below = 0.05
    [rules.maxvio]
    warn_above = 1.0
    fail_above = 3.0

    [drift]
    js_min = 0.1

    [check]                  # read by `moescope check`
    fail_on = "fail"

A pyproject.toml works too, with the same tables under [tool.moescope]. Unknown tables, rules or keys
raise ConfigError naming the key and the nearest valid one, so a typo never silently disables a rule.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Window = int | str | None


class ConfigError(ValueError):
    """A moescope.toml problem; the message is one line naming the file and the key."""


@dataclass
class Rule:
    """Fields every rule has: enabled, and a step window overriding [health].window (None = inherit)."""

    enabled: bool = True
    window: Window = None


@dataclass
class DeadExpertRule(Rule):
    """FAIL when an expert's utilization N·f_e over a window is below `fail_below`."""

    fail_below: float = 0.05


@dataclass
class LoadCVRule(Rule):
    """WARN when the load CV std(c)/mean(c) exceeds `warn_above` (FAIL above `fail_above` when set)."""

    warn_above: float = 0.5
    fail_above: float | None = None


@dataclass
class MaxVioRule(Rule):
    """WARN when MaxVio = max(c)/mean(c) − 1 exceeds `warn_above`, FAIL above `fail_above`."""

    warn_above: float = 1.0
    fail_above: float | None = 3.0


@dataclass
class CollapseRule(Rule):
    """FAIL when the m = max(k, N/4) busiest experts carry at least `share` of the assignments."""

    share: float = 0.9


@dataclass
class ZLossRule(Rule):
    """WARN when a window's router z-loss is more than `growth` times the run's first window."""

    growth: float = 10.0


@dataclass
class NonFiniteRule(Rule):
    """FAIL when more than `fail_above` tokens had NaN/Inf router logits in a window."""

    fail_above: int = 0


@dataclass
class ClonesRule(Rule):
    """WARN when an expert pair's similarity (any of `metrics`) exceeds `warn_above` at the latest snapshot."""

    warn_above: float = 0.8
    metrics: list[str] = field(default_factory=lambda: ["subspace_overlap", "cka"])


@dataclass
class DriftConfig:
    """Drift flags a layer when JS > max(js_min, bootstrap quantile) and TV > tv_min."""

    js_min: float = 0.1
    tv_min: float = 0.05
    n_boot: int = 200
    quantile: float = 0.95
    seed: int = 0
    max_units: int = 20_000


@dataclass
class CheckConfig:
    """Settings of `moescope check` that may live in moescope.toml."""

    fail_on: str = "fail"
    reference: str | None = None


#: Rule name -> its dataclass, in the order findings are reported.
RULES: dict[str, type[Rule]] = {
    "dead_expert": DeadExpertRule,
    "load_cv": LoadCVRule,
    "maxvio": MaxVioRule,
    "collapse": CollapseRule,
    "z_loss": ZLossRule,
    "nonfinite": NonFiniteRule,
    "clones": ClonesRule,
}


@dataclass
class HealthConfig:
    """Every health rule's thresholds, window and switch, plus drift and check settings (defaults: DESIGN.md)."""

    window: Window = None
    min_tokens: int = 50
    dead_expert: DeadExpertRule = field(default_factory=DeadExpertRule)
    load_cv: LoadCVRule = field(default_factory=LoadCVRule)
    maxvio: MaxVioRule = field(default_factory=MaxVioRule)
    collapse: CollapseRule = field(default_factory=CollapseRule)
    z_loss: ZLossRule = field(default_factory=ZLossRule)
    nonfinite: NonFiniteRule = field(default_factory=NonFiniteRule)
    clones: ClonesRule = field(default_factory=ClonesRule)
    drift: DriftConfig = field(default_factory=DriftConfig)
    check: CheckConfig = field(default_factory=CheckConfig)

    def rule(self, name: str) -> Rule:
        """The settings of rule `name`."""
        if name not in RULES:
            raise ConfigError(f"unknown rule {name!r}{_hint(name, RULES)}")
        return getattr(self, name)

    def window_of(self, name: str) -> Window:
        """The step window rule `name` uses (its own, else [health].window)."""
        w = self.rule(name).window
        return self.window if w is None else w


def _hint(key: str, valid: Any) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(sorted(valid))})"


def _coerce(where: str, key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check one value against the field's type (read off its default and annotation)."""
    if key == "window":
        if value is None or value in ("thirds", "all") or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ConfigError(f"{where}.window: expected \"thirds\", \"all\" or a positive number of steps, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}.{key}: expected a list of strings, got {value!r}")
    if "float" in annotation:
        if value is None and "None" in annotation:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if "int" in annotation:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if "str" in annotation:
        if isinstance(value, str) or (value is None and "None" in annotation):
            return value
        raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def _fill(obj: Any, table: Any, where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    valid = {f.name: f for f in fields(obj)}
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}{_hint(key, valid)}")
        f = valid[key]
        setattr(obj, key, _coerce(where, key, value, getattr(obj, key), str(f.type)))


def config_from_dict(data: dict[str, Any], source: str = "moescope.toml") -> HealthConfig:
    """Build a HealthConfig from parsed TOML (tables health, rules, drift, check); raises ConfigError."""
    cfg = HealthConfig()
    for section, body in data.items():
        if section == "health":
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: [health] must be a table")
            for key, value in body.items():
                if key not in ("window", "min_tokens"):
                    raise ConfigError(f"{source}: unknown key 'health.{key}'{_hint(key, ['window', 'min_tokens'])}")
                setattr(cfg, key, _coerce(f"{source}: health", key, value, getattr(cfg, key), "int" if key == "min_tokens" else ""))
            if cfg.min_tokens < 0:
                raise ConfigError(f"{source}: health.min_tokens must be ≥ 0")
        elif section == "rules":
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: [rules] must hold one table per rule")
            for name, rule_body in body.items():
                if name not in RULES:
                    raise ConfigError(f"{source}: unknown rule 'rules.{name}'{_hint(name, RULES)}")
                _fill(getattr(cfg, name), rule_body, f"{source}: rules.{name}")
        elif section == "drift":
            _fill(cfg.drift, body, f"{source}: drift")
        elif section == "check":
            _fill(cfg.check, body, f"{source}: check")
            if cfg.check.fail_on not in ("fail", "warn"):
                raise ConfigError(f"{source}: check.fail_on must be \"fail\" or \"warn\", got {cfg.check.fail_on!r}")
        else:
            raise ConfigError(
                f"{source}: unknown table [{section}]{_hint(section, ['health', 'rules', 'drift', 'check'])}"
            )
    return cfg


def load_config(path: str | os.PathLike[str] | None) -> HealthConfig:
    """Read moescope.toml (or pyproject.toml's [tool.moescope]) into a HealthConfig; None gives the defaults."""
    if path is None:
        return HealthConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None
    if p.name == "pyproject.toml":
        data = data.get("tool", {}).get("moescope", {})
    return config_from_dict(data, str(p))

"""Health-rule configuration: `HealthConfig` and `load_config(path)` for moescope.toml.

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

A pyproject.toml works too, with the same tables under [tool.moescope]. The rules, their settings, defaults
and allowed ranges come from the rule registry (`moescope.analysis.rules`): nothing about a rule is written
here. Unknown tables, rules or keys raise ConfigError naming the key and the nearest valid one, so a typo
never silently disables a rule; a value outside its range (NaN, inf, a share above 1, a FAIL limit below
the WARN limit, ...) raises ConfigError naming the key and the allowed range.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._toml import tomllib
from .analysis.rules import (
    REGISTRY,
    ClonesRule,
    CollapseRule,
    DeadExpertRule,
    DriftConfig,
    LoadCVRule,
    MaxVioRule,
    NonFiniteRule,
    OverconfidenceRule,
    RangeError,
    RuleConfig,
    Window,
    ZLossRule,
    check_ranges,
)
from .analysis.rules.base import limit

#: Old name of the rule config base class.
Rule = RuleConfig
#: Rule name -> its config dataclass, in report order (read off the registry).
RULES: dict[str, type[RuleConfig]] = {name: spec.config for name, spec in REGISTRY.items()}
#: The tables a moescope.toml may hold.
TABLES = ("health", "rules", "drift", "check")
FAIL_ON = ("fail", "warn")

__all__ = [
    "RULES", "ClonesRule", "CollapseRule", "ConfigError", "DeadExpertRule", "DriftConfig", "HealthConfig",
    "LoadCVRule", "MaxVioRule", "NonFiniteRule", "OverconfidenceRule", "Rule", "RuleConfig", "Window",
    "ZLossRule", "as_config", "config_from_dict", "default_config_path", "load_config",
]


class ConfigError(ValueError):
    """A moescope.toml problem; the message is one line naming the file and the key."""


@dataclass
class CheckConfig:
    """Settings of `moescope check` that may live in moescope.toml."""

    fail_on: str = "fail"
    reference: str | None = None

    def check(self) -> str | None:
        """fail_on must be one of FAIL_ON."""
        if self.fail_on not in FAIL_ON:
            return f'fail_on must be "fail" or "warn", got {self.fail_on!r}'
        return None


def _default_rules() -> dict[str, RuleConfig]:
    return {name: spec.defaults() for name, spec in REGISTRY.items()}


@dataclass
class HealthConfig:
    """Every health rule's settings (`cfg.rules[name]`, also `cfg.<name>`), [health] defaults, drift and check."""

    window: Window = None
    min_tokens: int = limit(50, 0, integer=True)
    rules: dict[str, RuleConfig] = field(default_factory=_default_rules)
    drift: DriftConfig = field(default_factory=DriftConfig)
    check: CheckConfig = field(default_factory=CheckConfig)

    def __getattr__(self, name: str) -> Any:
        # cfg.maxvio etc.: the rule's settings (only called for names that are not regular attributes).
        rules = self.__dict__.get("rules")
        if rules is not None and name in rules:
            return rules[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in REGISTRY and "rules" in self.__dict__:
            self.rules[name] = value
        else:
            super().__setattr__(name, value)

    def rule(self, name: str) -> RuleConfig:
        """The settings of rule `name`."""
        if name not in self.rules:
            raise ConfigError(f"unknown rule {name!r}{_hint(name, self.rules)}")
        return self.rules[name]

    def window_of(self, name: str) -> Window:
        """The step window rule `name` uses (its own, else [health].window)."""
        w = self.rule(name).window
        return self.window if w is None else w

    def copy(self) -> HealthConfig:
        """A deep copy (the rule settings are not shared)."""
        return copy.deepcopy(self)

    def validate(self, source: str = "config") -> HealthConfig:
        """Range-check every setting; raises ConfigError naming the first bad key and its allowed range."""
        try:
            _check_window(self.window, "health.window")
            check_ranges(_Health(self.min_tokens), "health")
            for name, rc in self.rules.items():
                if name not in REGISTRY:
                    raise RangeError(f"unknown rule 'rules.{name}'{_hint(name, REGISTRY)}")
                _check_window(rc.window, f"rules.{name}.window")
                check_ranges(rc, f"rules.{name}")
            check_ranges(self.drift, "drift")
            check_ranges(self.check, "check")
        except RangeError as e:
            raise ConfigError(f"{source}: {e}") from None
        return self


@dataclass
class _Health:
    """The numeric [health] settings, for their range check."""

    min_tokens: int = limit(50, 0, integer=True)


def _check_window(value: Any, key: str) -> None:
    if value is None or value in ("thirds", "all") or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    raise RangeError(f'{key} = {value!r}: expected "thirds", "all" or a positive number of steps')


def _hint(key: str, valid: Any) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(sorted(valid))})"


def _coerce(where: str, key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check one value's type against the field's (read off its default and annotation); ranges come later."""
    if key == "window":
        return value  # checked with the ranges
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}.{key}: expected a list of strings, got {value!r}")
    if "float" in annotation:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if "int" in annotation:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if "str" in annotation:
        if isinstance(value, str):
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
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected tables [health], [rules.NAME], [drift], [check]")
    for section, body in data.items():
        if section == "health":
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: [health] must be a table")
            for key, value in body.items():
                if key not in ("window", "min_tokens"):
                    raise ConfigError(f"{source}: unknown key 'health.{key}'{_hint(key, ['window', 'min_tokens'])}")
                setattr(cfg, key, _coerce(f"{source}: health", key, value, getattr(cfg, key),
                                          "int" if key == "min_tokens" else ""))
        elif section == "rules":
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: [rules] must hold one table per rule")
            for name, rule_body in body.items():
                if name not in REGISTRY:
                    raise ConfigError(f"{source}: unknown rule 'rules.{name}'{_hint(name, REGISTRY)}")
                _fill(cfg.rules[name], rule_body, f"{source}: rules.{name}")
        elif section == "drift":
            _fill(cfg.drift, body, f"{source}: drift")
        elif section == "check":
            _fill(cfg.check, body, f"{source}: check")
        else:
            raise ConfigError(f"{source}: unknown table [{section}]{_hint(section, TABLES)}")
    return cfg.validate(source)


def load_config(path: str | os.PathLike[str] | None) -> HealthConfig:
    """Read moescope.toml (or pyproject.toml's [tool.moescope]) into a validated HealthConfig; None gives the defaults."""
    if path is None:
        return HealthConfig()
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a TOML file must be UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None
    if p.name == "pyproject.toml":
        data = data.get("tool", {}).get("moescope", {})
    return config_from_dict(data, str(p))


#: The config file commands pick up from the working directory when none is given.
DEFAULT_CONFIG = "moescope.toml"


def default_config_path() -> str | None:
    """./moescope.toml when it exists (what `check` and the dashboard read without --config), else None."""
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def as_config(config: HealthConfig | str | os.PathLike[str] | None) -> HealthConfig:
    """A validated HealthConfig from a HealthConfig, a moescope.toml path or None (the defaults)."""
    if isinstance(config, HealthConfig):
        return config.validate()
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise ConfigError(f"config must be a moescope.toml path or a HealthConfig, got {type(config).__name__}")

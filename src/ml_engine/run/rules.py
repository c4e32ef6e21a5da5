"""Checks of user-set config values, before any work starts, reported as one line each."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml_engine.errors import UserError
from ml_engine.run.helpers import is_finite_number


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """``key`` (dotted path, skipped when absent) must satisfy ``accepts``, told as ``expected``."""

    key: str
    accepts: Callable[[Any], bool]
    expected: str

    def refusal(self, value: Any, name: str | None = None) -> str | None:
        """None when ``value`` passes, else the one-line reason, naming it ``name`` (the key
        unless given: a server names its request field)."""
        if self.accepts(value):
            return None
        return f"{name or self.key}={value!r} is not valid; expected {self.expected}"


def rules_by_key(rules: Iterable[Rule]) -> dict[str, Rule]:
    """The rules indexed by the config key they check."""
    return {rule.key: rule for rule in rules}


def positive_number(key: str) -> Rule:
    return Rule(key, lambda v: is_finite_number(v) and v > 0, "a number > 0")


def non_negative_number(key: str) -> Rule:
    return Rule(key, lambda v: is_finite_number(v) and v >= 0, "a number ≥ 0")


def fraction(key: str) -> Rule:
    return Rule(key, lambda v: is_finite_number(v) and 0 <= v < 1, "a number in [0, 1)")


def open_fraction(key: str) -> Rule:
    return Rule(key, lambda v: is_finite_number(v) and 0 < v < 1, "a number in (0, 1)")


def int_at_least(key: str, low: int) -> Rule:
    return Rule(key, lambda v: _is_int(v) and v >= low, f"an integer ≥ {low}")


def int_in_range(key: str, low: int, high: int) -> Rule:
    return Rule(key, lambda v: _is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]")


def one_of(key: str, choices: Iterable[Any]) -> Rule:
    allowed = tuple(choices)
    return Rule(key, lambda v: v in allowed, "one of " + ", ".join(map(str, allowed)))


def boolean(key: str) -> Rule:
    # isinstance, not ``in (True, False)``: 1 == True would let 0 and 1 through
    return Rule(key, lambda v: isinstance(v, bool), "true or false")


def optional(rule: Rule) -> Rule:
    return Rule(rule.key, lambda v: v is None or rule.accepts(v), rule.expected + " or null")


def check_config(cfg: DictConfig, rules: Iterable[Rule]) -> None:
    """Raise a UserError naming the first value that breaks its rule."""
    for rule in rules:
        value = OmegaConf.select(cfg, rule.key, default=None, throw_on_missing=False)
        if value is None and OmegaConf.select(cfg, rule.key, default="__absent__") == "__absent__":
            continue
        refusal = rule.refusal(value)
        if refusal:
            raise UserError(refusal)

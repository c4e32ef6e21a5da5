"""An Optuna search space from Hydra's sweep syntax (``hydra.sweeper.params`` and the command
line): ``choice(a, b)``, ``range(1, 8, 2)``, ``interval(0.1, 1.0)``, ``tag(log, interval(…))``;
``tag(int, interval(1, 4))`` for integers (Hydra reads every interval's bounds as floats).

The same syntax hydra-optuna-sweeper read, so configs written for it keep working. A choice of
values Optuna cannot store (lists, dicts) is stored as its override text, ``[16,32,64]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ml_engine.errors import UserError

ACCEPTED = (
    "choice(a, b, …), range(start, stop[, step]), interval(low, high), tag(log, interval(…)), "
    "tag(int, interval(…))"
)


@dataclass
class SearchSpace:
    """What a sweep searches (``distributions``) and what every job gets as is (``fixed``)."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """A job's command line: the fixed overrides, then one per searched param."""
        return [*self.fixed, *(f"{key}={value}" for key, value in params.items())]

    def grid(self) -> dict[str, list[Any]]:
        """Every value of every param, for the grid sampler: choices and ranges only."""
        grid = {}
        for key, distribution in self.distributions.items():
            if not isinstance(distribution, CategoricalDistribution):
                raise UserError(
                    f"the grid sampler needs a finite set of values, and {key} is an interval; "
                    "give it as choice(…) or range(…)"
                )
            grid[key] = list(distribution.choices)
        return grid


def _storable(value: Any) -> Any:
    """Optuna stores None, bool, int, float and str; anything else as its override text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return Override._get_value_element_as_str(value)


def _number(value: Any, key: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{key}: interval bounds must be numbers, got {value!r}")
    return value


def distribution_of(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override."""
    key = override.get_key_element()
    value = override.value()
    if isinstance(value, ChoiceSweep):
        choices = [_storable(v) for v in override.sweep_iterator(transformer=Transformer.encode)]
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, IntervalSweep):
        low, high = _number(value.start, key), _number(value.end, key)
        log = "log" in value.tags
        if log and low <= 0:
            raise UserError(f"{key}: a log interval needs a low bound > 0, got {low}")
        if low >= high:
            raise UserError(f"{key}: interval({low}, {high}) is empty; the low bound comes first")
        if "int" in value.tags:
            if low != int(low) or high != int(high):
                raise UserError(f"{key}: tag(int, interval({low}, {high})) needs whole bounds")
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise UserError(f"{override.input_line}: not a search the sweeper knows; accepted: {ACCEPTED}")


def _params_lines(params: Mapping[str, Any] | None) -> list[str]:
    return [f"{key}={value}" for key, value in (params or {}).items()]


def parse_search_space(
    params: Mapping[str, Any] | None, arguments: Sequence[str], parser: OverridesParser
) -> SearchSpace:
    """``hydra.sweeper.params`` then the command line's own overrides (the command line wins
    for a key given in both). Comma lists (``a=1,2``) are searched as ``choice(1, 2)``."""
    try:
        overrides = parser.parse_overrides(_params_lines(params) + list(arguments))
    except Exception as error:
        raise UserError(f"hydra.sweeper.params: {str(error).splitlines()[0]}") from None
    space = SearchSpace()
    for override in overrides:
        key = override.get_key_element()
        space.distributions.pop(key, None)
        space.fixed = [line for line in space.fixed if line.split("=", 1)[0] != key]
        if override.is_sweep_override():
            space.distributions[key] = distribution_of(override)
        else:
            space.fixed.append(override.input_line)
    if not space.distributions:
        raise UserError(
            "the Optuna sweeper has nothing to search: hydra.sweeper.params and the command line "
            f"name no param; accepted: {ACCEPTED}"
        )
    return space

"""Small helpers the whole package shares; stdlib only, so a model-work child process that
imports them stays light."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from typing import Any


def is_real_number(value: Any) -> bool:
    """An int or float, NaN and infinities included (``True`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real int or float that is neither NaN nor infinite (``True`` is not a number here)."""
    return is_real_number(value) and math.isfinite(value)


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (JSON-safe)."""
    return float(value) if is_finite_number(value) else None


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an error's message ('' when it has none)."""
    text = str(exc)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def error_summary(exc: BaseException, max_chars: int | None = None) -> str:
    """``Type: first line`` of an error, or the type alone when the message is empty; a line
    longer than ``max_chars`` is cut, ending in "..."."""
    line = first_line(exc)
    if max_chars is not None and len(line) > max_chars:
        line = line[: max_chars - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def import_callable(ref: Callable[..., Any] | str) -> Callable[..., Any]:
    """``"package.module:function"`` → the function (a callable is returned as it is)."""
    if callable(ref):
        return ref
    module_name, _, function_name = ref.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


# the user's own OMP_WAIT_POLICY ("" when unset), kept by the entrypoint before it sets PASSIVE
USER_OMP_WAIT_POLICY = "ML_ENGINE_USER_OMP_WAIT_POLICY"


def keep_user_omp_policy() -> None:
    """Remember the user's OMP_WAIT_POLICY once, at the outermost entrypoint, before it is
    changed for torch; nested processes inherit the remembered value."""
    os.environ.setdefault(USER_OMP_WAIT_POLICY, os.environ.get("OMP_WAIT_POLICY", ""))


def with_user_omp_policy(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the user's own OMP_WAIT_POLICY back, for llama.cpp's processes.

    PASSIVE suits torch's threads on a shared machine, but llama.cpp decodes one token in a
    few milliseconds and its OpenMP threads wait between graphs: sleeping there halves the
    generation rate on an idle machine (tg128 80 vs 169 t/s, llama-bench on the 111M q4_k_m
    bench model, 2 cores), and libgomp's default spins only briefly, less when oversubscribed.
    """
    user = env.get(USER_OMP_WAIT_POLICY)
    if user is None:
        return env
    env = dict(env)
    if user:
        env["OMP_WAIT_POLICY"] = user
    else:
        env.pop("OMP_WAIT_POLICY", None)
    return env

"""Search to a target: the most precise quantization that reaches a speed, then the least
hardware that still does.

The target is ``llm.target``: a rate to reach (``tokens_per_s`` of ``metric``, by default
``gen/tokens_per_s``) and optional quality bounds (``max_kld``: mean KL divergence from the base
file in nats; ``max_ppl_increase_pct``: PPL(Q)/PPL(base) - 1 in %; both apply when both are
given, neither means speed only). Quality is a property of the file and deterministic; speed is
measured and noisy, so a setting meets the speed target when its mean does.

The search measures only what it needs, trusting two monotonic relations and then checking them
on the neighbour it relies on: speed rises as precision falls, and quality falls with it. So the
quantizations (most precise first) are binary searched for the first one that reaches the speed
while meeting quality; a quantization whose quality misses sends the search to the more precise
half without further measurement. Each probe measures the configured thread count first and
tries the thread candidates (fewest first) only where that one misses the speed. On a build that
offloads to a GPU, the quantizations are searched with every layer offloaded, then the fewest
``n_gpu_layers`` (0 … n_layer+1) that still meet the target are binary searched; on a CPU-only
build offload does not apply and the search is quantization × threads.

This module is the pure part (no Hydra, no llama.cpp): ``target_sweeper`` measures each setting
as an ordinary generate job and hands the results in through ``measure``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm import models
from ml_engine.llm.quantize import (
    QUANTIZATIONS,
    SOURCE_PRECISIONS,
    gains_precision,
    is_float,
    precision_rank,
)
from ml_engine.llm.threads import physical_core_count
from ml_engine.run.helpers import is_finite_number

# every layer offloaded, while the quantizations are searched on a build that offloads
ALL_LAYERS = -1
CPU_ONLY_NOTE = "GPU offload does not apply (CPU-only llama.cpp build)"
SPEED, KLD, PPL = "tokens_per_s", "max_kld", "max_ppl_increase_pct"


@dataclass(frozen=True)
class Target:
    tokens_per_s: float
    metric: str = "gen/tokens_per_s"
    unit: str = "tok/s"
    max_kld: float | None = None
    max_ppl_increase_pct: float | None = None

    @property
    def speed_only(self) -> bool:
        return self.max_kld is None and self.max_ppl_increase_pct is None

    def describe(self) -> str:
        parts = [f"{self.metric} ≥ {self.tokens_per_s:g} {self.unit}"]
        if self.max_kld is not None:
            parts.append(f"KLD ≤ {self.max_kld:g} nats")
        if self.max_ppl_increase_pct is not None:
            parts.append(f"PPL increase ≤ {self.max_ppl_increase_pct:g} %")
        return ", ".join(parts)


@dataclass(frozen=True)
class Setting:
    """What one job runs. ``quantization`` None: a ``llm.model.path`` file as it is (its type
    is one we do not name, or it could not be read: the job says why); ``n_threads`` None: the
    configured count (``llm.n_threads``, null meaning the physical cores)."""

    quantization: str | None
    n_threads: int | None
    n_gpu_layers: int

    def overrides(self) -> list[str]:
        values = [] if self.quantization is None else [f"llm.quantization={self.quantization}"]
        if self.n_threads is not None:
            values.append(f"llm.n_threads={self.n_threads}")
        return [*values, f"llm.n_gpu_layers={self.n_gpu_layers}"]


@dataclass(frozen=True)
class Probe:
    """One measured setting, as its job recorded it."""

    setting: Setting
    speed: float | None
    speed_std: float | None = None
    kld: float | None = None  # 0 for the base file itself (the reference)
    ppl_ratio: float | None = None  # 1 for the base
    quantization: str | None = None  # what ran (a file's own type when the setting names none)
    n_threads_used: int | None = None
    n_layer: int | None = None
    file: str | None = None
    cached: bool = False
    job: str | None = None

    @property
    def ppl_increase_pct(self) -> float | None:
        return None if self.ppl_ratio is None else (self.ppl_ratio - 1.0) * 100.0

    @property
    def label(self) -> str:
        threads = self.n_threads_used if self.n_threads_used is not None else self.setting.n_threads
        name = self.quantization or self.setting.quantization or "(file as is)"
        shown = threads if threads else "default"
        return f"{name} n_gpu_layers={self.setting.n_gpu_layers} n_threads={shown}"


@dataclass(frozen=True)
class Miss:
    """A constraint a probe misses: its value, the limit, and the shortfall relative to it."""

    constraint: str
    value: float | None
    limit: float

    @property
    def relative(self) -> float:
        if self.value is None:
            return math.inf  # not measured: as far from the target as can be
        if self.constraint == SPEED:
            return (self.limit - self.value) / self.limit
        if self.limit == 0:
            return math.inf if self.value > 0 else 0.0
        return (self.value - self.limit) / self.limit

    def describe(self, unit: str) -> str:
        if self.value is None:
            return f"{self.constraint}: not measured"
        gap = abs(self.value - self.limit)
        if self.constraint == SPEED:
            return (
                f"misses tokens_per_s={self.limit:g} by {gap:.4g} {unit} "
                f"({self.value:.4g} {unit}, {100 * self.relative:.3g} % short)"
            )
        if self.constraint == KLD:
            return f"misses max_kld={self.limit:g} by {gap:.3g} nats (KLD {self.value:.3g})"
        return (
            f"misses max_ppl_increase_pct={self.limit:g} by {gap:.3g} points "
            f"(PPL +{self.value:.3g} %)"
        )


def misses(probe: Probe, target: Target) -> list[Miss]:
    found = []
    if probe.speed is None or probe.speed < target.tokens_per_s:
        found.append(Miss(SPEED, probe.speed, target.tokens_per_s))
    found += quality_misses(probe, target)
    return found


def quality_misses(probe: Probe, target: Target) -> list[Miss]:
    found = []
    if target.max_kld is not None and (probe.kld is None or probe.kld > target.max_kld):
        found.append(Miss(KLD, probe.kld, target.max_kld))
    pct, limit = probe.ppl_increase_pct, target.max_ppl_increase_pct
    if limit is not None and (pct is None or pct > limit):
        found.append(Miss(PPL, pct, limit))
    return found


def meets(probe: Probe, target: Target) -> bool:
    return not misses(probe, target)


def shortfall(probe: Probe, target: Target) -> float:
    """How far a probe is from the target: its largest relative miss (0 when it meets it)."""
    return max((m.relative for m in misses(probe, target)), default=0.0)


@dataclass
class Verdict:
    target: Target
    offload: bool
    winner: Probe | None
    closest: Probe | None
    probes: list[Probe]
    notes: list[str] = field(default_factory=list)

    @property
    def meets(self) -> bool:
        return self.winner is not None


MEETS, QUALITY_MISS, SPEED_MISS = "meets", "quality", "speed"


class TargetSearch:
    """The search itself; ``measure(setting)`` runs one job and returns its probe."""

    def __init__(
        self,
        target: Target,
        quantizations: Sequence[str | None],
        thread_candidates: Sequence[int],
        *,
        offload: bool,
        measure: Callable[[Setting], Probe],
        default_threads: int | None = None,
    ) -> None:
        self.target, self.quantizations = target, list(quantizations)
        self.thread_candidates = sorted(set(thread_candidates))
        self.offload, self.measure, self.default_threads = offload, measure, default_threads
        self.probes: dict[Setting, Probe] = {}
        self.notes: list[str] = []

    def _probe(self, setting: Setting) -> Probe:
        if setting not in self.probes:
            self.probes[setting] = self.measure(setting)
        return self.probes[setting]

    def _other_threads(self, first: Probe) -> list[int]:
        """Thread candidates besides the count the first probe ran with, fewest first."""
        used = {first.n_threads_used, self.default_threads} - {None}
        return [t for t in self.thread_candidates if t not in used]

    def _try(self, quantization: str | None, n_gpu_layers: int) -> tuple[str, Probe]:
        """One quantization: the configured threads, then (only where those miss the speed
        and quality is met) the other candidates, fewest first, until one meets the target."""
        first = self._probe(Setting(quantization, self.default_threads, n_gpu_layers))
        if quality_misses(first, self.target):
            return QUALITY_MISS, first
        if meets(first, self.target):
            return MEETS, first
        for threads in self._other_threads(first):
            probe = self._probe(Setting(quantization, threads, n_gpu_layers))
            if meets(probe, self.target):
                return MEETS, probe
        return SPEED_MISS, first

    def _search_quantizations(self, n_gpu_layers: int) -> Probe | None:
        lo, hi, found = 0, len(self.quantizations) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            status, probe = self._try(self.quantizations[mid], n_gpu_layers)
            if status == MEETS:
                found, hi = probe, mid - 1
            elif status == QUALITY_MISS:  # every less precise one misses it too
                hi = mid - 1
            else:  # every more precise one is slower
                lo = mid + 1
        return self._verify(found, n_gpu_layers)

    def _verify(self, found: Probe | None, n_gpu_layers: int) -> Probe | None:
        """The binary search trusted that speed rises as precision falls: the more precise
        neighbour of the answer must miss (usually measured already; if not, it is now). Where
        it meets after all, the answer moves up until one misses."""
        while found is not None:
            index = self.quantizations.index(found.setting.quantization)
            if index == 0:
                break
            status, probe = self._try(self.quantizations[index - 1], n_gpu_layers)
            if status != MEETS:
                break
            self.notes.append(
                f"{probe.label} meets the target although the binary search passed it "
                "(speed did not rise as precision fell): the answer moved to it"
            )
            found = probe
        return found

    def _fewest_layers(self, found: Probe) -> Probe:
        """Binary search over n_gpu_layers 0 … n_layer+1 (all) for the fewest that meet the
        target, with the winner's threads; the quantization search measured 'all' already."""
        if found.n_layer is None:
            self.notes.append("the model's layer count is unknown: n_gpu_layers stays at all")
            return found
        q, threads, top = found.setting.quantization, found.setting.n_threads, found.n_layer + 1
        best = replace(found, setting=Setting(q, threads, top))
        self.probes[best.setting] = best
        lo, hi = 0, top
        while lo < hi:
            mid = (lo + hi) // 2
            probe = self._probe(Setting(q, threads, mid))
            if meets(probe, self.target):
                best, hi = probe, mid
            else:
                lo = mid + 1
        return best

    def probe_budget(self, n_layer: int | None = None) -> int:
        """The most jobs the search runs where speed and quality are monotonic in precision:
        a binary search over the quantizations and one neighbour checked, each with every
        thread candidate at worst, then (offloading) a binary search over the layers."""
        tries = math.floor(math.log2(max(len(self.quantizations), 1))) + 2
        others = [t for t in self.thread_candidates if t != self.default_threads]
        jobs = min(tries, len(self.quantizations)) * (1 + len(others))
        if self.offload and n_layer is not None:
            jobs += math.ceil(math.log2(n_layer + 2))
        return jobs

    def run(self) -> Verdict:
        if not self.quantizations:
            raise UserError("llm.target.quantizations is empty; expected at least one name")
        layers = ALL_LAYERS if self.offload else 0
        found = self._search_quantizations(layers)
        if found is not None and self.offload:
            found = self._fewest_layers(found)
        probes = list(self.probes.values())
        closest = None if found is not None else _closest(probes, self.target)
        return Verdict(self.target, self.offload, found, closest, _unique(probes), self.notes)


def _unique(probes: list[Probe]) -> list[Probe]:
    """Each measured job once (the 'all layers' alias shares its job with the -1 probe)."""
    seen, unique = set(), []
    for probe in probes:
        key = probe.job or id(probe)
        if key not in seen:
            seen.add(key)
            unique.append(probe)
    return unique


def _closest(probes: list[Probe], target: Target) -> Probe | None:
    """The probe with the smallest largest relative miss (ties: the earlier, more precise)."""
    return min(probes, key=lambda p: shortfall(p, target), default=None)


# ---- the target and the candidates, from the composed config


def _number(value: Any) -> bool:
    return is_finite_number(value) and not isinstance(value, bool)


def parse_target(node: Mapping[str, Any], metrics: Mapping[str, str]) -> Target:
    """``llm.target`` checked before anything is measured; ``metrics`` maps each row field to
    its unit (``metrics.METRICS``). One line names what is wrong."""
    speed = node.get("tokens_per_s")
    if speed is None:
        raise UserError(
            "llm.target.tokens_per_s is required: the speed to reach, e.g. "
            "llm.target.tokens_per_s=30"
        )
    if not _number(speed) or speed <= 0:
        raise UserError(f"llm.target.tokens_per_s={speed!r} is not valid; expected a number > 0")
    metric = node.get("metric") or "gen/tokens_per_s"
    rates = sorted(name for name, unit in metrics.items() if unit == "tok/s")
    if metric not in rates:
        raise UserError(
            f"llm.target.metric={metric!r} is not a rate this job reports; accepted: "
            + ", ".join(rates)
        )
    bounds = {}
    for key, unit in ((KLD, "nats"), (PPL, "%")):
        value = node.get(key)
        if value is not None and (not _number(value) or value < 0):
            raise UserError(
                f"llm.target.{key}={value!r} is not valid; expected a number ≥ 0 ({unit}) or null"
            )
        bounds[key] = None if value is None else float(value)
    return Target(float(speed), metric, metrics[metric], bounds[KLD], bounds[PPL])


def _int_list(key: str, values: Any) -> list[int]:
    good = (
        isinstance(values, Sequence)
        and not isinstance(values, str)
        and len(values) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    )
    if not good:
        raise UserError(f"{key}={values!r} is not valid; expected a list of integers ≥ 1, or null")
    return sorted(set(values))


def thread_candidates(values: Any, cores: int | None = None) -> list[int]:
    """``llm.target.n_threads``, or 1, 2, 4, … up to the physical cores this process may run
    on (what ``llm.n_threads: null`` runs), and that count itself."""
    if values is not None:
        return _int_list("llm.target.n_threads", values)
    cores = cores or physical_core_count()
    powers = [2**i for i in range(cores.bit_length()) if 2**i <= cores]
    return sorted({*powers, cores})


def _named_quantizations(values: Any) -> list[str]:
    names = list(QUANTIZATIONS)
    good = (
        isinstance(values, Sequence)
        and not isinstance(values, str)
        and len(values) > 0
        and all(v in names for v in values)
    )
    if not good:
        raise UserError(
            f"llm.target.quantizations={values!r} is not valid; expected a list among "
            + ", ".join(names)
            + ", or null"
        )
    return sorted(set(values), key=precision_rank)


def _check_against_file(names: list[str], own: str, path: Path, allow_requantize: bool) -> None:
    """Refused before measuring what the job would refuse anyway (models.ensure_model_file)."""
    for name in names:
        if name == own:
            continue
        more_precise = own in QUANTIZATIONS and precision_rank(name) < precision_rank(own)
        if gains_precision(name, own) or more_precise:
            raise UserError(
                f"llm.target.quantizations: {name} would hold more than {path} ({own}) does; "
                f"list {own} and smaller ones"
            )
        if not is_float(own) and not allow_requantize:
            raise UserError(
                f"llm.target.quantizations: {path} is already quantized ({own}); {name} made from "
                "it is quantized twice: give the f32/f16/bf16 original as llm.model.path, or set "
                "llm.allow_requantize=true"
            )


def quantization_candidates(
    values: Any, model_cfg: Mapping[str, Any], models_dir: Path, allow_requantize: bool
) -> list[str | None]:
    """Most precise first: ``llm.target.quantizations``, or every quantization of the model that
    is on disk or can be made (from an f32/f16/bf16 file, the embedded model's own, or from a
    quantized ``llm.model.path`` only with ``allow_requantize``). A model with none at all gets
    its default one, whose job then says in one line how to obtain the file."""
    if models.is_file_model(model_cfg):
        return _file_candidates(values, model_cfg, models_dir, allow_requantize)
    if values is not None:
        return list(_named_quantizations(values))
    if model_cfg.get("source") == models.EMBEDDED:
        own = str(model_cfg.get("base_quantization", "f32"))
        return [q for q in QUANTIZATIONS if precision_rank(q) >= precision_rank(own)]
    present = set(models.available_quantizations(model_cfg, models_dir))
    sources = [q for q in SOURCE_PRECISIONS if q in present]
    if sources:
        best = min(precision_rank(q) for q in sources)
        present |= {q for q in QUANTIZATIONS if precision_rank(q) >= best}
    if not present:
        return [models.default_quantization(model_cfg)]
    return sorted(present, key=precision_rank)


def _file_candidates(
    values: Any, model_cfg: Mapping[str, Any], models_dir: Path, allow_requantize: bool
) -> list[str | None]:
    path = models.given_file(model_cfg)
    try:
        own: str | None = models.read_gguf_facts(path).quantization if path.is_file() else None
    except (OSError, ValueError, KeyError, IndexError):
        own = None
    if own is None:
        # missing or unreadable: one job with the file as it is gives the user llama.cpp's reason
        return [None]
    if values is not None:
        names = _named_quantizations(values)
        _check_against_file(names, own, path, allow_requantize)
        return list(names)
    if own not in QUANTIZATIONS:
        return [None]  # a type we do not produce (iq4_xs, …): it runs only as it is
    if not is_float(own) and not allow_requantize:
        return [own]  # any other type of it would be quantized twice
    rank = precision_rank(own)
    return [q for q in QUANTIZATIONS if q == own or precision_rank(q) > rank]

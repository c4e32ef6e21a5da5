"""The target search's probes as an Optuna study, and its Pareto front.

The search, not Optuna, picks what to measure, so each probe is told to the study after the fact
(``study.add_trial`` of a finished trial over fixed distributions): a COMPLETE trial per measured
setting, a FAIL trial for a job that failed. The study lives in ``hydra.sweeper.storage`` (by
default ``<sweep dir>/optuna.journal``) under ``hydra.sweeper.study_name`` (``llm_target``), so
``optuna-dashboard`` browses it and a re-run with the same storage and name adds to it.

Single-objective (``llm.target.objectives: [speed]``) a trial's value is the searched rate;
multi-objective (``[speed, kld]``) it is (rate, mean KLD), maximized and minimized, and the
sweep dir gets ``pareto.md``, the settings no other trial of the study beats on both (Optuna's
``study.best_trials``), fastest first, and the study's pictures (``study/``, Pareto front
included: ``ml_engine.run.study_plots``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError
from ml_engine.llm.quantize import QUANTIZATIONS
from ml_engine.llm.target_search import Probe, Setting, Target, meets
from ml_engine.llm.threads import physical_core_count
from ml_engine.run.files import write_text_atomic
from ml_engine.run.helpers import is_finite_number
from ml_engine.run.optuna_study import open_storage

SPEED, KLD = "speed", "kld"
OBJECTIVES = (SPEED, KLD)  # the order of a trial's values
DIRECTIONS = {SPEED: "maximize", KLD: "minimize"}
DEFAULT_STUDY = "llm_target"
JOURNAL = "optuna.journal"
PARETO_TABLE = "pareto.md"
# drawn by ml_engine.run.study_plots, with the study's other pictures
PARETO_PLOT, PARETO_PAGE = "study/pareto_front.png", "study/pareto_front.html"
# a llm.model.path file run as it is, of a type we do not produce (iq4_xs, …): its own name is
# the trial's user attr ``quantization``, while the parameter keeps one fixed set of choices
AS_IS = "as_is"
QUANTIZATION_CHOICES = (*QUANTIZATIONS, AS_IS)


def parse_objectives(value: Any) -> tuple[str, ...]:
    """``llm.target.objectives``: ``[speed]`` (null too) or ``[speed, kld]``; one line else."""
    if value is None:
        return (SPEED,)
    names = [value] if isinstance(value, str) else value
    good = (
        isinstance(names, Sequence)
        and SPEED in names
        and all(isinstance(n, str) and n in OBJECTIVES for n in names)
    )
    if not good:
        raise UserError(
            f"llm.target.objectives={value!r} is not valid; expected [speed] (the searched rate, "
            "maximized) or [speed, kld] (and mean KLD, minimized: a Pareto front)"
        )
    return tuple(n for n in OBJECTIVES if n in names)


def _quantization(probe_or_setting: Probe | Setting) -> str:
    if isinstance(probe_or_setting, Probe):
        name = probe_or_setting.quantization or probe_or_setting.setting.quantization
    else:
        name = probe_or_setting.quantization
    return name if name in QUANTIZATIONS else AS_IS


def trial_params(
    quantization: str, n_threads: int | None, n_gpu_layers: int, n_layer: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parameters and their distributions. Optuna refuses a parameter whose distribution
    changes kind (or, categorical, choices) within a study, so the quantization choices are
    every name we know and the integer bounds only widen to hold the value."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    params: dict[str, Any] = {"quantization": quantization, "n_gpu_layers": n_gpu_layers}
    dists: dict[str, Any] = {
        "quantization": CategoricalDistribution(QUANTIZATION_CHOICES),
        "n_gpu_layers": IntDistribution(-1, max(n_gpu_layers, (n_layer or -1) + 1, 0)),
    }
    if n_threads is not None:  # unknown for a job that failed with the default count
        params["n_threads"] = n_threads
        dists["n_threads"] = IntDistribution(1, max(n_threads, physical_core_count()))
    return params, dists


def probe_attrs(probe: Probe, target: Target) -> dict[str, Any]:
    """What the study keeps beside the values: the figures, where they came from, the verdict."""
    return {
        "status": "ok",
        "metric": target.metric,
        "tokens_per_s": probe.speed,
        "tokens_per_s_std": probe.speed_std,
        "kl_mean": probe.kld,
        "ppl_ratio": probe.ppl_ratio,
        "quantization": probe.quantization or probe.setting.quantization,
        "n_threads_requested": probe.setting.n_threads,
        "cached": probe.cached,
        "meets": meets(probe, target),
        "job": probe.job,
        "file": probe.file,
    }


def _finite(value: Any) -> float | None:
    return float(value) if is_finite_number(value) and not isinstance(value, bool) else None


@dataclass
class TargetStudy:
    """The opened study of one search: what it records and the front it writes."""

    study: Any  # optuna.Study
    url: str
    objectives: tuple[str, ...]

    @property
    def name(self) -> str:
        return str(self.study.study_name)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def record(self, probe: Probe, target: Target) -> Any:
        """A measured setting: COMPLETE with its values, or FAIL where one is missing (no rate
        recorded, or no KLD where the study minimizes it: the quality step did not run)."""
        import optuna

        threads = probe.n_threads_used or probe.setting.n_threads
        params, dists = trial_params(
            _quantization(probe), threads, probe.setting.n_gpu_layers, probe.n_layer
        )
        figures = {SPEED: _finite(probe.speed), KLD: _finite(probe.kld)}
        values = [figures[name] for name in self.objectives]
        attrs = probe_attrs(probe, target)
        state = optuna.trial.TrialState.COMPLETE
        if any(v is None for v in values):
            missing = [n for n, v in zip(self.objectives, values, strict=True) if v is None]
            state, values = optuna.trial.TrialState.FAIL, None
            attrs["reason"] = f"not measured: {', '.join(missing)}"
        return self._add(state, params, dists, values, attrs)

    def record_failure(self, setting: Setting, job: str | None, error: str) -> Any:
        """A job that failed: a FAIL trial of the setting it was to measure, with its reason."""
        import optuna

        params, dists = trial_params(
            _quantization(setting), setting.n_threads, setting.n_gpu_layers
        )
        attrs = {"status": "failed", "error": error, "job": job}
        return self._add(optuna.trial.TrialState.FAIL, params, dists, None, attrs)

    def _add(
        self,
        state: Any,
        params: dict[str, Any],
        dists: dict[str, Any],
        values: list[float] | None,
        attrs: dict[str, Any],
    ) -> Any:
        import optuna

        trial = optuna.trial.create_trial(
            state=state, params=params, distributions=dists, values=values, user_attrs=attrs
        )
        self.study.add_trial(trial)
        return trial

    def pareto_trials(self) -> list[Any]:
        """Optuna's Pareto front of the whole study, fastest first (then lowest KLD)."""
        front = list(self.study.best_trials)
        return sorted(front, key=lambda t: (-t.values[0], t.values[1], t.number))

    def write_pareto(self, sweep_dir: Path, unit: str, metric: str) -> list[Path]:
        """``pareto.md`` (the front as a table, fastest first) and the study's pictures in
        ``study/`` (``pareto_front.html``/``.png``: every trial, the front highlighted)."""
        from ml_engine.run.study_plots import write_study_plots

        front = self.pareto_trials()
        completed = [t for t in self.study.trials if t.state.name == "COMPLETE"]
        names = [f"{metric} ({unit})", "mean KLD (nats)"]
        pictures = write_study_plots(sweep_dir, self.url, self.name, names)
        table = pareto_markdown(front, len(completed), self, unit, metric, sweep_dir)
        write_text_atomic(sweep_dir / PARETO_TABLE, table)
        return [sweep_dir / PARETO_TABLE, *(p for p in pictures if p.name.startswith("pareto"))]


def pareto_markdown(
    front: Sequence[Any],
    n_complete: int,
    study: TargetStudy,
    unit: str,
    metric: str,
    sweep_dir: Path,
) -> str:
    header = ["trial", "quantization", "n_threads", "n_gpu_layers", metric, "KLD", "PPL %"]
    header += ["cached", "job"]
    rows = [_pareto_row(trial, unit, sweep_dir) for trial in front]
    lines = [
        f"# Pareto front: study {study.name}",
        "",
        f"{metric} up, mean KLD down: the {len(front)} of {n_complete} measured settings of the "
        f"study (`{study.url}`) that no other beats on both, fastest first.",
        "",
        f"![Pareto front]({PARETO_PLOT}) ([interactive]({PARETO_PAGE}))",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *rows,
    ]
    return "\n".join(lines) + "\n"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if is_finite_number(value) else "n/a"


def _job_cell(job: str | None, sweep_dir: Path) -> str:
    """This sweep's jobs by their number, as search.md names them; an earlier sweep's (a shared
    study) by their whole path."""
    if not job:
        return ""
    path = Path(job)
    return path.name if path.parent.resolve() == sweep_dir.resolve() else str(path)


def _pareto_row(trial: Any, unit: str, sweep_dir: Path) -> str:
    attrs, params = trial.user_attrs, trial.params
    std = attrs.get("tokens_per_s_std")
    speed = f"{_number(trial.values[0], '.1f')}" + (
        f" ± {_number(std, '.1f')}" if std is not None else ""
    )
    ratio = attrs.get("ppl_ratio")
    pct = (ratio - 1.0) * 100.0 if is_finite_number(ratio) else None
    cells = [
        trial.number,
        attrs.get("quantization") or params.get("quantization"),
        params.get("n_threads", "default"),
        params.get("n_gpu_layers"),
        f"{speed} {unit}",
        _number(trial.values[1], ".3g"),
        _number(pct, "+.2f"),
        "yes" if attrs.get("cached") else "",
        _job_cell(attrs.get("job"), sweep_dir),
    ]
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def open_target_study(
    storage: str | None,
    study_name: str | None,
    sweep_dir: Path,
    objectives: tuple[str, ...],
    metric: str,
) -> TargetStudy:
    """The study to record in, created or added to. A storage that cannot be opened, or a
    study of that name with other objectives or another searched rate, is one line."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" noise
    url = storage or str(sweep_dir / JOURNAL)
    name = study_name or DEFAULT_STUDY
    wanted = [DIRECTIONS[o] for o in objectives]
    study = optuna.create_study(
        study_name=name, storage=open_storage(url), directions=wanted, load_if_exists=True
    )
    found = [d.name.lower() for d in study.directions]
    if found != wanted:
        raise UserError(
            f"hydra.sweeper.study_name={name} in {url} is a study to {', '.join(found)}; this "
            f"search's objectives {list(objectives)} {', '.join(wanted)}: name another study"
        )
    # values of two rates in one study would be compared as one
    recorded = study.user_attrs.get("metric")
    if recorded is None:
        study.set_user_attr("metric", metric)
    elif recorded != metric:
        raise UserError(
            f"hydra.sweeper.study_name={name} in {url} records {recorded}; this search measures "
            f"llm.target.metric={metric}: name another study"
        )
    return TargetStudy(study, url, objectives)

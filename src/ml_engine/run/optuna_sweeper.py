"""``hydra/sweeper=optuna``: an ask-and-tell Optuna sweeper on current Optuna.

Each batch of ``n_jobs`` trials is asked from the study, launched through the configured
launcher (basic, submitit_local, SLURM) as ordinary jobs, and told from the jobs' records
(``job.json``: ok, pruned or failed). The study lives in a storage, by default
``<sweep dir>/optuna.journal``, so that:

- a job in another process finds its trial and reports per-epoch values (pruning);
- running the same command again continues the study: ``n_trials`` counts finished trials
  (complete, pruned, failed), a trial whose sweep was killed mid-run is marked failed and its
  params are run again, and ``+sweep.retry_failed=true`` runs failed trials' params again;
- several sweeps (workers) share one study through ``hydra.sweeper.storage`` + ``study_name``:
  each asks only for what the study still needs, with a reseeded sampler.

Configs written for hydra-optuna-sweeper keep working: the same ``params`` syntax
(``search_space.py``), ``direction`` (a list for several objectives), ``sampler``, ``storage``,
``study_name``, ``n_trials``, ``n_jobs``, and ``optimization_results.yaml`` in the sweep dir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.trial import TrialState

from ml_engine.errors import UserError
from ml_engine.run.files import JOB_RECORD, read_job_record, write_json_atomic
from ml_engine.run.optuna_study import (
    DEFAULT_JOURNAL,
    exclusive_lock,
    is_journal,
    open_storage,
    sqlite_file,
)
from ml_engine.run.optuna_trial import PRUNER_KEY, TRIAL_KEY, make_pruner
from ml_engine.run.search_space import SearchSpace, parse_search_space

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")
# why a failed trial failed (a user attr): its job failed, or its sweep was killed mid-run
FAILURE, JOB_FAILED, KILLED = "failure", "job", "killed"
RETRY_OF = "retry_of"  # the trial whose params a trial runs again
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def directions_of(direction: Any, directions: Any) -> list[str]:
    """``direction: maximize`` or ``directions: [maximize, minimize]`` (hydra-optuna-sweeper
    took a list in ``direction`` too)."""
    chosen = directions if directions is not None else direction
    if isinstance(chosen, (list, tuple, ListConfig)):
        names = [str(d) for d in chosen]
    else:
        names = [str(chosen)]
    wrong = [name for name in names if name not in DIRECTIONS]
    if wrong or not names:
        raise UserError(
            f"hydra.sweeper.direction={wrong[0] if wrong else names!r} is not a direction; "
            f"accepted: {', '.join(DIRECTIONS)} (a list of them for several objectives)"
        )
    return names


def _alive_here(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the sweep that asked for a running trial may still be running: it runs on
    another host (unknowable), or its process on this host is alive."""
    attrs = trial.user_attrs
    if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
        return True
    try:
        os.kill(int(attrs["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any = None,
        direction: Any = "minimize",
        directions: Any = None,
        storage: Any = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        params: Any = None,
        pruner: Any = "none",
        trial: Any = None,  # a job's own trial number: set on jobs' configs, not the sweep's
        **unknown: Any,
    ) -> None:
        if unknown:
            raise UserError(
                f"hydra.sweeper: unknown key {sorted(unknown)[0]!r}; accepted: sampler, "
                "direction, directions, storage, study_name, n_trials, n_jobs, params, pruner"
            )
        self.sampler_config = sampler
        self.directions = directions_of(direction, directions)
        self.storage_url = str(storage) if storage else None
        self.study_name = study_name
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        if self.n_trials < 1:
            raise UserError(f"hydra.sweeper.n_trials={n_trials} must be at least 1")
        self.params = OmegaConf.to_container(params) if OmegaConf.is_config(params) else params
        self.pruner_spec = pruner
        if len(self.directions) > 1 and pruner not in (None, "none"):
            raise UserError(
                f"hydra.sweeper.pruner={pruner}: Optuna prunes single-objective studies only, "
                f"and this one has {len(self.directions)} directions; set hydra.sweeper.pruner=none"
            )
        self.pruner = make_pruner(pruner)
        if OmegaConf.is_config(self.pruner_spec):  # a job's config holds the spec, not the object
            self.pruner_spec = OmegaConf.to_container(self.pruner_spec)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.retry_failed = bool(OmegaConf.select(config, "sweep.retry_failed", default=False))

    # ---- the study --------------------------------------------------------------------------

    def _sampler(self, space: SearchSpace) -> optuna.samplers.BaseSampler:
        """The configured sampler; the grid sampler gets its grid from the search space."""
        config = self.sampler_config
        if config is None:
            return optuna.samplers.TPESampler()
        if isinstance(config, optuna.samplers.BaseSampler):
            return config
        config = OmegaConf.to_container(config) if OmegaConf.is_config(config) else dict(config)
        target = str(config.get("_target_", ""))
        if target.endswith("GridSampler"):
            config.update(_partial_=False, search_space=space.grid())
        return _build("sampler", config)

    def open_study(self, space: SearchSpace) -> optuna.Study:
        # a refused sweep (a bad sampler setting, a storage that cannot be opened or read)
        # leaves no dir
        sampler = self._sampler(space)
        given = self.storage_url is not None
        url = self.storage_url or str(self.sweep_dir / DEFAULT_JOURNAL)
        if not given:  # the default journal lives in the sweep dir
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(url)
        if given:  # other workers share the study: the same seed proposes the same
            sampler.reseed_rng()
        name = self.study_name or str(self.config.get("task_name", "study"))
        self.storage_url, self.study_name = url, name
        try:
            study = optuna.create_study(
                storage=storage,
                sampler=sampler,
                pruner=self.pruner,
                study_name=name,
                directions=self.directions,
                load_if_exists=True,
            )
        except ValueError as error:
            if not isinstance(error, json.JSONDecodeError):  # a study with other directions
                raise UserError(f"hydra.sweeper.study_name={name}: {error}") from None
            raise _unreadable(url, error) from None
        except Exception as error:  # a journal or database that is not Optuna's, or corrupt
            raise _unreadable(url, error) from None
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        if [d.name.lower() for d in study.directions] != self.directions:
            have = [d.name.lower() for d in study.directions]
            raise UserError(
                f"study {name!r} in {url} optimizes {have}, and this sweep asks for "
                f"{self.directions}; use another hydra.sweeper.study_name"
            )
        return study

    # ---- resuming ---------------------------------------------------------------------------

    def recover(self, study: optuna.Study) -> None:
        """Trials of a killed sweep → failed, their params run again; with
        ``+sweep.retry_failed=true`` failed jobs' params run again too."""
        storage = study._storage
        killed = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if not _alive_here(t)]
        for trial in killed:
            storage.set_trial_user_attr(trial._trial_id, FAILURE, KILLED)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            log.warning("trial %d was running when its sweep was killed: run again", trial.number)
        for sweep_dir in {t.user_attrs.get("sweep_dir", str(self.sweep_dir)) for t in killed}:
            numbers = {t.number for t in killed if t.user_attrs.get("sweep_dir") == sweep_dir}
            _mark_killed_records(Path(sweep_dir), numbers)
        retried = self._retried(study)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            reason = trial.user_attrs.get(FAILURE)
            wanted = reason == KILLED or (reason == JOB_FAILED and self.retry_failed)
            if wanted and trial.number not in retried and trial.params:
                study.enqueue_trial(
                    trial.params, user_attrs={RETRY_OF: trial.number}, skip_if_exists=False
                )
                retried.add(trial.number)

    def _retried(self, study: optuna.Study) -> set[int]:
        """Failed trials whose params were queued (a waiting trial) or run again already."""
        queued = {t.user_attrs.get(RETRY_OF) for t in study.get_trials(deepcopy=False)}
        return {number for number in queued if number is not None}

    def counted(self, study: optuna.Study) -> int:
        """Finished trials that count towards ``n_trials``: complete and pruned ones, and failed
        ones unless they were killed or their params run again."""
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get(RETRY_OF) for t in trials}
        count = 0
        for trial in trials:
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                count += 1
            elif trial.state == TrialState.FAIL:
                reason = trial.user_attrs.get(FAILURE)
                count += reason != KILLED and trial.number not in retried
        return count

    # ---- the loop ---------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = parse_search_space(self.params, arguments, parser)
        study = self.open_study(space)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        self.recover(study)
        returns: list[Sequence[JobReturn]] = []
        next_job = self._next_job_number()
        while True:
            with self._ask_lock():  # two workers counting at once would both ask the last trial
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                wanted = self.n_trials - self.counted(study) - running
                if isinstance(study.sampler, optuna.samplers.GridSampler):  # a walked grid ends
                    wanted = min(wanted, _unvisited(study))
                batch = min(self.n_jobs, wanted)
                trials = [self._ask(study, space, next_job + i) for i in range(batch)]
            if not trials:
                break
            done = self.counted(study)
            log.info(
                "study %s: %d of %d trials finished, launching trial %s",
                self.study_name,
                done,
                self.n_trials,
                ", ".join(str(trial.number) for trial in trials),
            )
            jobs = [self._job_overrides(space, trial) for trial in trials]
            results = self.launcher.launch(jobs, initial_job_idx=next_job)
            for trial, result in zip(trials, results, strict=True):
                self._tell(study, trial, result)
            next_job += len(trials)
            returns.append(results)
        self._write_results(study)
        return returns

    @contextlib.contextmanager
    def _ask_lock(self) -> Iterator[None]:
        """Held while counting and asking, by every worker of a study in a file (journal,
        SQLite); a database server's study is asked without it."""
        url = str(self.storage_url)
        path = Path(url) if is_journal(url) else sqlite_file(url)
        if path is None:
            yield
            return
        with exclusive_lock(path.with_name(path.name + ".ask.lock")):
            yield

    def _next_job_number(self) -> int:
        """Job dirs of an earlier run of this sweep keep their numbers: new jobs follow."""
        numbers = [int(p.name) for p in self.sweep_dir.iterdir() if p.name.isdigit()]
        return max(numbers, default=-1) + 1

    def _ask(self, study: optuna.Study, space: SearchSpace, job: int) -> optuna.Trial:
        trial = study.ask(fixed_distributions=space.distributions)
        attrs = {"host": socket.gethostname(), "pid": os.getpid(), "job": job}
        attrs["sweep_dir"] = str(self.sweep_dir)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return trial

    def _job_overrides(self, space: SearchSpace, trial: optuna.Trial) -> list[str]:
        # hydra.* overrides reach the job's HydraConfig, not its task overrides or job.json
        return [
            *space.overrides(trial.params),
            f"hydra.sweeper.storage={self.storage_url}",
            f"hydra.sweeper.study_name={self.study_name}",
            f"hydra.sweeper.{TRIAL_KEY}={trial.number}",
        ]

    def _tell(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> None:
        if result.status == JobStatus.FAILED:  # the job ended the sweep (StopSweep)
            trial.set_user_attr(FAILURE, JOB_FAILED)
            study.tell(trial, state=TrialState.FAIL)
            _ = result.return_value  # re-raises the job's error
        record = read_job_record(Path(result.hydra_cfg.hydra.runtime.output_dir)) or {}
        status = record.get("status")
        if status == "pruned":
            _tell_state(study, trial, TrialState.PRUNED)
            return
        values = _values(result.return_value)
        if status != "ok" or values is None or len(values) != len(self.directions):
            if status == "ok" and values is not None:
                log.error(
                    "trial %d: %d values for %d directions (optimized_metric and "
                    "hydra.sweeper.direction must list as many)",
                    trial.number,
                    len(values),
                    len(self.directions),
                )
            trial.set_user_attr(FAILURE, JOB_FAILED)
            _tell_state(study, trial, TrialState.FAIL)
            return
        try:
            study.tell(trial, values)
        except RuntimeError as error:  # the grid sampler calls study.stop() on the last cell
            if "Study.stop" not in str(error):
                raise

    def _write_results(self, study: optuna.Study) -> None:
        """``optimization_results.yaml``, as hydra-optuna-sweeper wrote it: the best trial's
        params and value (several objectives: every Pareto-optimal trial), complete trials only."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.warning("no trial completed: no optimization_results.yaml")
            return
        results: dict[str, Any] = {"name": "optuna"}
        if len(self.directions) == 1:
            results.update(best_params=study.best_params, best_value=study.best_value)
            results["best_trial"] = study.best_trial.number
        else:
            results["solutions"] = [
                {"trial": t.number, "params": t.params, "values": t.values}
                for t in study.best_trials
            ]
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        log.info("best: %s", results.get("best_params") or f"{len(study.best_trials)} trials")


def _mark_killed_records(sweep_dir: Path, numbers: set[int]) -> None:
    """A killed trial's job left a ``running`` record: it says ``failed`` now."""
    if not numbers:
        return
    for path in sweep_dir.glob(f"*/{JOB_RECORD}"):
        record = read_job_record(path.parent)
        if record and record.get("status") == "running" and record.get("trial") in numbers:
            record.update(
                status="failed",
                error=f"killed: the sweep stopped during trial {record['trial']}; "
                "its params ran again",
            )
            write_json_atomic(path, record)


def _unreadable(url: str, error: Exception) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return UserError(
        f"hydra.sweeper.storage={url}: cannot read its studies ({type(error).__name__}: "
        f"{reason}); is it a corrupt journal or another program's database?"
    )


def _tell_state(study: optuna.Study, trial: optuna.Trial, state: TrialState) -> None:
    try:
        study.tell(trial, state=state)
    except RuntimeError as error:  # the grid sampler calls study.stop() on the last cell
        if "Study.stop" not in str(error):
            raise


def _unvisited(study: optuna.Study) -> int:
    """Grid cells no trial took yet (running ones count as taken)."""
    sampler = study.sampler
    return len(sampler._get_unvisited_grid_ids(study))


def _build(what: str, config: dict[str, Any]) -> Any:
    """``instantiate`` with a setting the class does not take as one line naming the accepted."""
    import inspect

    from hydra.utils import get_class, instantiate

    target = config.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception:
        raise UserError(
            f"hydra.sweeper.{what}._target_={target!r} is not a class; e.g. "
            "optuna.samplers.TPESampler (or hydra/sweeper/sampler=tpe|random|grid|cmaes|nsgaii)"
        ) from None
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = [k for k in config if not k.startswith("_") and k not in accepted]
    if unknown:
        raise UserError(
            f"hydra.sweeper.{what}.{unknown[0]} is not a setting of {cls.__name__}; accepted: "
            f"{', '.join(accepted)} (remove it with ~hydra.sweeper.{what}.{unknown[0]})"
        )
    try:
        return instantiate(config)
    except Exception as error:
        cause = error.__cause__ or error
        raise UserError(f"hydra.sweeper.{what}: {str(cause).splitlines()[0]}") from None


def _values(value: Any) -> list[float] | None:
    """A job's returned value(s) as finite floats, or None (Optuna fails NaN trials)."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


__all__ = ["PRUNER_KEY", "OptunaSweeper"]

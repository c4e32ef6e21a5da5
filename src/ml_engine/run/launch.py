"""The one path every Hydra entrypoint runs through: resolvers, job wrapper, error reporting."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml_engine.errors import UserError
from ml_engine.run.distributed import is_rank_zero, shared_run_dir_override
from ml_engine.run.files import (
    JOB_RECORD,
    redact_override,
    save_resolved_config,
    write_json_atomic,
)
from ml_engine.run.group_options import check_group_options, missing_extra_message
from ml_engine.run.helpers import (
    error_summary,
    finite_or_none,
    first_line,
    import_callable,
    is_real_number,
    keep_user_omp_policy,
)
from ml_engine.run.locations import CONFIG_DIR, PROJECT_ROOT
from ml_engine.run.optuna_trial import PRUNED_AT, trial_number
from ml_engine.run.rules import Rule, check_config

log = logging.getLogger(__name__)

# Files of a run's work: a refused run's dir holding one is kept.
WORK_SUFFIXES = frozenset({".ckpt", ".gguf"})

Task = Callable[[DictConfig], dict[str, Any]]
# "package.module:function": imported only once the config composed, so config mistakes are
# reported in a second instead of after torch and Lightning have loaded.
TaskRef = Task | str


def register_resolvers() -> None:
    """``${run_id:}``: a short random id, fixed for the process, that keeps run dirs unique."""
    if not OmegaConf.has_resolver("run_id"):
        run_id = uuid.uuid4().hex[:6]
        OmegaConf.register_new_resolver("run_id", lambda: run_id)


def full_errors_requested() -> bool:
    """The user asked for tracebacks (``HYDRA_FULL_ERROR=1``), remembered across the internal
    override of that variable and inherited by child processes (DDP ranks)."""
    user_choice = "1" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "0"
    return os.environ.setdefault("ML_ENGINE_TRACEBACK", user_choice) == "1"


def _condense_hydra_message(message: str) -> str:
    """Hydra's multi-line composition errors → one line naming what is accepted."""
    options = re.search(r"Available options in '([^']+)':\n((?:\s+\S+\n?)+)", message)
    missing = re.search(r"Could not find '([^']+)'", message)
    if options and missing:
        group = options.group(1)
        accepted = ", ".join(options.group(2).split())
        name = missing.group(1).split("/")[-1]
        needs_extra = missing_extra_message(group, name)
        if needs_extra:  # e.g. hydra/launcher=slurm's submitit_slurm without the plugin
            return needs_extra
        return f"unknown {group} '{name}'; accepted: {accepted}"
    if missing:
        return f"config '{missing.group(1)}' not found"
    not_in_struct = re.search(r"Key '([^']+)' is not in struct", message)
    if not_in_struct:
        named = re.search(r"full_key: (\S+)", message) or re.match(
            r"Could not override '([^']+)'", message
        )
        key = named.group(1) if named else not_in_struct.group(1)
        return f"no config key '{key}' (check the spelling; to add a new key use +{key}=...)"
    return first_line(message) or message


def describe_error(exc: BaseException) -> str:
    """One line for the user: what went wrong and, where known, what is accepted."""
    from hydra.errors import HydraException

    if isinstance(exc, UserError):
        return str(exc)
    if type(exc).__name__ == "MissingMandatoryValue":
        key = getattr(exc, "full_key", None) or "a value"
        return f"{key} is required: add {key}=<value> to the command"
    message = str(exc)
    if isinstance(exc, HydraException) or type(exc).__module__.startswith("omegaconf"):
        if exc.__cause__ is not None:  # instantiate() wraps the real error: report that one
            return describe_error(exc.__cause__)
        return _condense_hydra_message(message)
    if type(exc).__name__ == "MisconfigurationException":  # Lightning: bad accelerator etc.
        return first_line(message) or type(exc).__name__
    return error_summary(exc)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [redact_override(override) for override in HydraConfig.get().overrides.task]


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | list[float] | None:
    """The value a sweeper optimizes: ``metrics[cfg.optimized_metric]`` (NaN when the job
    measured it as NaN or infinite); a list of values for a list of metrics (several
    objectives).

    In a sweep, a metric the job does not report is a UserError naming the ones it does:
    a NaN for every job would leave the sweeper searching noise.
    """
    keys = cfg.get("optimized_metric")
    if not keys:
        return None
    if OmegaConf.is_list(keys) or isinstance(keys, (list, tuple)):
        return [_metric_value(str(key), metrics) for key in keys]
    return _metric_value(str(keys), metrics)


def _metric_value(key: str, metrics: dict[str, Any]) -> float:
    value = metrics.get(key)
    # None: collect_metrics' word for a metric measured as NaN or infinite (a diverged loss)
    if _is_multirun() and (key not in metrics or not (value is None or is_real_number(value))):
        numbers = sorted(name for name, v in metrics.items() if is_real_number(v))
        available = ", ".join(numbers) or "(none)"
        if key in metrics:
            raise UserError(
                f"optimized_metric={key!r} is {value!r}, not a number; "
                f"numeric metrics of this job: {available}"
            )
        raise UserError(
            f"optimized_metric={key!r} is not among this job's metrics; available: {available}"
        )
    number = finite_or_none(value)
    return math.nan if number is None else number


def run_job(task: TaskRef, cfg: DictConfig, rules: Sequence[Rule] = ()) -> Any:
    """Run one job; in a sweep a failure becomes a ``failed`` record instead of ending the sweep.

    Every job leaves ``job.json`` in its output dir (status, error, overrides, wall time,
    metrics): the sweep summary is built from these files. A sweep job's record says
    ``running`` while it runs (a sweep killed mid-job leaves it so: a rerun runs that job
    again) and ``pruned`` when its trial was stopped early (metrics ``pruned_at_epoch``).
    """
    output_dir = Path(cfg.paths.output_dir)
    started = time.perf_counter()
    record: dict[str, Any] = {"overrides": _task_overrides(), "status": "ok", "error": None}
    trial = trial_number() if _is_multirun() else None
    if trial is not None:
        record["trial"] = trial
    if _is_multirun() and _is_rank_zero():
        write_json_atomic(output_dir / JOB_RECORD, {**record, "status": "running", "metrics": {}})
    try:
        if _is_rank_zero():
            save_resolved_config(cfg, output_dir)
        check_config(cfg, rules)
        metrics = import_callable(task)(cfg)
    except Exception as exc:
        record.update(status="failed", error=describe_error(exc), metrics={})
        record["wall_s"] = round(time.perf_counter() - started, 3)
        if _is_rank_zero():
            write_json_atomic(output_dir / JOB_RECORD, record)
        if not _is_multirun():
            raise
        log.error("job failed: %s", record["error"])
        if full_errors_requested():
            traceback.print_exc()
        return math.nan
    if metrics.get(PRUNED_AT) is not None:
        record["status"] = "pruned"
    record.update(metrics=metrics, wall_s=round(time.perf_counter() - started, 3))
    if _is_rank_zero():
        write_json_atomic(output_dir / JOB_RECORD, record)
    return optimized_value(cfg, metrics)


def _is_rank_zero() -> bool:
    return is_rank_zero()


def is_config_mistake(exc: BaseException) -> bool:
    """A mistake in what the user asked for, as opposed to a failure of the work itself."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (
        isinstance(exc, (UserError, HydraException, OmegaConfBaseException))
        or type(exc).__name__ == "MisconfigurationException"
    )


def _run_dir_of(cfg: DictConfig) -> Path | None:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # the config is what failed: there may be no resolvable run dir
        return None


def is_fresh_run_dir(run_dir: Path | None, task_name: str) -> bool:
    """Whether ``run_dir`` holds only what Hydra put there for this job: ``.hydra/`` and an
    empty ``<task>.log``. Checked when the job starts; a dir the user pointed a run at
    (``hydra.run.dir=<an earlier run>``, a shared torchrun dir another rank made) is not fresh."""
    if run_dir is None or not run_dir.is_dir():
        return False
    for entry in run_dir.iterdir():
        if entry.name == f"{task_name}.log" and entry.is_file() and entry.stat().st_size == 0:
            continue
        if entry.name != ".hydra":
            return False
    return True


def remove_refused_run_dir(run_dir: Path | None) -> None:
    """Delete the run dir of a run refused before its work, and its empty ``runs/`` and task
    folders: the runs folder is left as it was. The caller knows the dir was fresh when the job
    started (:func:`is_fresh_run_dir`), so only this run's files go: its bookkeeping and what
    its loggers made before the refusal (TensorBoard opens its event file before Lightning
    sets the data up). A checkpoint or model file in it would be work: then it stays."""
    if run_dir is None or not run_dir.is_dir() or not _is_rank_zero():
        return
    if any(path.suffix in WORK_SUFFIXES for path in run_dir.rglob("*")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in (run_dir.parent, run_dir.parent.parent):
        try:
            parent.rmdir()
        except OSError:  # not empty: other runs live there
            return


class StopSweep(BaseException):
    """Ends a sweep at the job that raised it. Hydra records any ``Exception`` of a job and
    starts the next one (the basic sweeper only looks at failures after the whole batch), so,
    like Ctrl-C, this one is a ``BaseException``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def launch(
    task: TaskRef,
    config_name: str,
    rules: Sequence[Rule] = (),
    before_compose: Sequence[Callable[[], object] | str] = (),
) -> None:
    """Hydra's main for ``task``, with every error ending in one line and exit status 1.

    Hydra is made to raise (``HYDRA_FULL_ERROR=1`` internally) so that its multi-line reports
    can be condensed; the user's own ``HYDRA_FULL_ERROR=1`` still gets the full traceback.
    Group options are checked before Hydra creates a run dir; a single run refused for a
    config mistake once it started removes the run dir Hydra made for it (sweep jobs keep
    their record; a dir that held anything when the job started is never removed).
    ``before_compose`` hooks run before Hydra composes (e.g. plugin networks adding config
    options), so the harness needs no knowledge of any task.
    """
    import hydra

    os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
    # torch's OpenMP threads spin while they wait for each other (libgomp's default): when
    # another process holds a core, every step then waits out a descheduled peer. Measured on
    # the shared 2-core machine: 60 training steps of experiment=shakespeare_char took 65-105 s
    # spinning, 9 s sleeping. Read once, when torch loads, which happens after this line.
    # (llama.cpp's worker processes get the user's own value back: run/helpers.py)
    keep_user_omp_policy()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    register_resolvers()
    show_traceback = full_errors_requested()
    os.environ["HYDRA_FULL_ERROR"] = "1"

    failures: list[tuple[BaseException, Path | None]] = []

    def hydra_task(cfg: DictConfig) -> float | None:
        run_dir = _run_dir_of(cfg)
        fresh = is_fresh_run_dir(run_dir, str(cfg.get("task_name", config_name)))
        try:
            return run_job(task, cfg, rules)
        except Exception as exc:
            if _is_multirun():  # run_job keeps a job's own failure: this one ends the sweep
                raise StopSweep(exc) from exc
            # single run: reported below as one line, not by Hydra
            failures.append((exc, run_dir if fresh else None))
            return None

    for hook in before_compose:
        import_callable(hook)()
    main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    try:
        check_group_options(sys.argv[1:], CONFIG_DIR)
        shared_dir = shared_run_dir_override(sys.argv[1:])
        if shared_dir is not None:  # torchrun/srun: every process of the run in one dir
            sys.argv.append(shared_dir)
        main(hydra_task)()
        if failures:
            exc, fresh_run_dir = failures[0]
            if is_config_mistake(exc):
                remove_refused_run_dir(fresh_run_dir)
            raise exc
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (Exception, StopSweep) as exc:
        error = exc.error if isinstance(exc, StopSweep) else exc
        if show_traceback:
            raise error from None
        print(f"error: {describe_error(error)}", file=sys.stderr)
        sys.exit(1)

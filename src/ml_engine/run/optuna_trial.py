"""A sweep job's own Optuna trial, for reporting intermediate values (pruning).

The sweeper asks for the trial and tells its result; the job only reports. It finds its trial
through the hydra overrides the sweeper gives every job (``hydra.sweeper.storage``,
``hydra.sweeper.study_name``, ``hydra.sweeper.trial``), so a job in another process
(``hydra/launcher=submitit_local``, SLURM) reaches the same study.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

# the hydra.sweeper key that carries a job's trial number (set only by the Optuna sweeper)
TRIAL_KEY = "trial"
# the hydra.sweeper key whose value says whether trials are pruned
PRUNER_KEY = "pruner"
PRUNERS = ("none", "median", "hyperband")
# the metric a pruned job reports: the epoch its trial was stopped after
PRUNED_AT = "pruned_at_epoch"


def _sweeper_config() -> Any:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().get("sweeper")


def trial_number() -> int | None:
    """This job's trial number in an Optuna sweep, else None."""
    sweeper = _sweeper_config()
    number = OmegaConf.select(sweeper, TRIAL_KEY, default=None) if sweeper is not None else None
    return int(number) if number is not None else None


def pruning_requested() -> bool:
    """Whether this job runs in an Optuna sweep whose pruner is not ``none``."""
    sweeper = _sweeper_config()
    if sweeper is None or trial_number() is None:
        return False
    pruner = OmegaConf.select(sweeper, PRUNER_KEY, default=None)
    return pruner not in (None, "none")


def make_pruner(spec: Any) -> Any:
    """The study's pruner from ``hydra.sweeper.pruner``: a name or a ``_target_`` config.

    ``median``: a trial stops when its value at an epoch is worse than the median of the
    earlier trials' values at that epoch, once 2 trials completed and from the second epoch on
    (Optuna's own default waits for 5 trials: too many for the sweeps people run here).
    ``hyperband``: Optuna's Hyperband over epochs, its largest budget the longest trial seen.
    """
    import optuna

    if spec is None or spec == "none":
        return optuna.pruners.NopPruner()
    if spec == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if spec == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if OmegaConf.is_dict(spec) or isinstance(spec, dict):
        from hydra.utils import instantiate

        return instantiate(spec)
    if isinstance(spec, optuna.pruners.BasePruner):
        return spec
    from ml_engine.errors import UserError

    raise UserError(
        f"hydra.sweeper.pruner={spec!r} is not a pruner; accepted: {', '.join(PRUNERS)} or a "
        "_target_ config of an optuna.pruners class"
    )


def current_trial() -> Any:
    """This job's ``optuna.Trial`` (report / should_prune), or None outside an Optuna sweep."""
    number = trial_number()
    if number is None:
        return None
    import optuna

    from ml_engine.run.optuna_study import open_storage

    sweeper = _sweeper_config()
    storage = open_storage(str(sweeper.storage))
    study = optuna.load_study(
        study_name=str(sweeper.study_name), storage=storage, pruner=make_pruner(sweeper.pruner)
    )
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.Trial(study, trial_id)

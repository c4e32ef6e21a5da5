"""Hydra's entry for the Optuna searches (``hparams_search=mnist_optuna`` and others).

Hydra's Optuna sweeper, made safe for a study that several sweeps share through
``hydra.sweeper.storage``: the storage is opened once under a lock (a new SQLite file would
otherwise be created twice by two workers starting at once), a URL that cannot be opened is one
line, and each worker's sampler is reseeded, so workers started with the same config do not
propose the same trials. Without a storage it is Hydra's sweeper unchanged. (Hydra instantiates
sweepers only from the ``hydra_plugins`` namespace package, hence this module.)
"""

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from ml_engine.run.optuna_study import open_storage


class SharedStudyOptunaSweeper(OptunaSweeper):
    def __init__(self, sampler: Any, storage: Any = None, **kwargs: Any) -> None:
        if storage:
            storage = str(storage)
            open_storage(storage)
            sampler.reseed_rng()  # a fixed seed would make every worker sample the same
        super().__init__(sampler=sampler, storage=storage, **kwargs)

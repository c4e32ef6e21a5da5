"""Hydra's entry for the Optuna searches (``hydra/sweeper=optuna``, ``hparams_search=*``).

Hydra instantiates only sweepers whose class is defined under the ``hydra_plugins`` namespace
package (it checks the class's module), hence these subclasses; the sweeper itself is
``ml_engine.run.optuna_sweeper``.
"""

from ml_engine.run.optuna_sweeper import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    pass


class SharedStudyOptunaSweeper(_OptunaSweeper):
    """The name configs written before the project's own sweeper used."""

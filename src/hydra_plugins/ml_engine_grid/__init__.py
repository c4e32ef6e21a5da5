"""Hydra's entry for the resuming grid sweeper (``hydra/sweeper=grid``, every entrypoint's
default). Hydra instantiates only sweepers whose class is defined under the ``hydra_plugins``
namespace package, hence this subclass of ``ml_engine.run.grid_sweeper.ResumingGridSweeper``."""

from ml_engine.run.grid_sweeper import ResumingGridSweeper as _ResumingGridSweeper


class ResumingGridSweeper(_ResumingGridSweeper):
    pass

"""Hydra's entry for ``hparams_search=llm_target``.

Hydra instantiates a sweeper only when its class lives under the ``hydra_plugins`` namespace
package (``hydra.core.plugins.Plugins`` scans it and refuses other module names), so the search
is registered here as a subclass of ``ml_engine.llm.target_sweeper.TargetSweeper``, which holds
all of it.
"""

from ml_engine.llm.target_sweeper import TargetSweeper


class TargetSearchSweeper(TargetSweeper):
    """``hydra.sweeper._target_: hydra_plugins.ml_engine_target_search.TargetSearchSweeper``"""

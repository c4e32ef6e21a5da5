"""The value rules of the training tasks (train, eval, predict), checked once per job.

The server checks its training requests against the same rules (server/routes_ml.py).
"""

from __future__ import annotations

from ml_engine.run.rules import (
    Rule,
    fraction,
    int_at_least,
    non_negative_number,
    one_of,
    optional,
    positive_number,
)
from ml_engine.training.choices import INVERT_CHOICES, SOURCES, TORCH_DEVICES, invert_mode

TRAIN_RULES: tuple[Rule, ...] = (
    optional(int_at_least("seed", 0)),
    positive_number("model.optimizer.lr"),
    non_negative_number("model.optimizer.weight_decay"),
    fraction("model.net.dropout"),
    fraction("model.label_smoothing"),
    int_at_least("datamodule.batch_size", 1),
    int_at_least("datamodule.eval_batch_size", 1),
    int_at_least("datamodule.num_workers", 0),
    one_of("datamodule.source", SOURCES),
    optional(int_at_least("trainer.max_epochs", -1)),
    int_at_least("callbacks.early_stopping.patience", 0),
)

PREDICT_RULES: tuple[Rule, ...] = (
    int_at_least("batch_size", 1),
    Rule("invert", lambda v: invert_mode(v) is not None, "one of " + ", ".join(INVERT_CHOICES)),
    one_of("device", TORCH_DEVICES),
)

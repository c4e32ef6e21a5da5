"""The value rules of the training tasks (train, eval, predict), checked once per job.

The server checks its training requests against the same rules (server/routes_ml.py).
"""

from __future__ import annotations

from ml_engine.run.rules import (
    Rule,
    boolean,
    fraction,
    int_at_least,
    non_negative_number,
    one_of,
    open_fraction,
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
    boolean("model.channels_last"),
    int_at_least("datamodule.batch_size", 1),
    int_at_least("datamodule.eval_batch_size", 1),
    int_at_least("datamodule.num_workers", 0),
    one_of("datamodule.source", SOURCES),
    open_fraction("datamodule.val_fraction"),
    # datamodule=text and the causal language models
    int_at_least("datamodule.block_size", 1),
    optional(int_at_least("datamodule.max_chars", 2)),
    optional(int_at_least("datamodule.train_batches", 1)),
    int_at_least("model.sample_tokens", 0),
    int_at_least("model.net.n_layer", 1),
    int_at_least("model.net.n_head", 1),
    int_at_least("model.net.n_head_kv", 1),
    int_at_least("model.net.n_embd", 2),
    int_at_least("model.net.n_ff", 1),
    positive_number("model.net.norm_eps"),
    positive_number("model.net.rope_theta"),
    optional(int_at_least("trainer.max_epochs", -1)),
    optional(int_at_least("trainer.max_steps", -1)),
    int_at_least("callbacks.early_stopping.patience", 0),
)

PREDICT_RULES: tuple[Rule, ...] = (
    int_at_least("batch_size", 1),
    Rule("invert", lambda v: invert_mode(v) is not None, "one of " + ", ".join(INVERT_CHOICES)),
    one_of("device", TORCH_DEVICES),
)

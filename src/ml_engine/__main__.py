"""``ml-engine <task> [key=value ...]`` and ``python -m ml_engine <task> ...``.

The same entrypoints as the repo's ``train.py``, ``eval.py``, ``predict.py``, ``export.py``,
``generate.py``, ``quantize.py`` and ``serve.py``, for an installed package (configs packaged,
outputs under the current dir).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ml_engine.llm.quant_budget import QUANTIZE_BUDGET_RULES
from ml_engine.llm.rules import GENERATE_RULES
from ml_engine.run.rules import Rule
from ml_engine.training.lm.export import EXPORT_RULES
from ml_engine.training.rules import PREDICT_RULES, TRAIN_RULES

# installed plugin networks become model/net=<name> options before the config composes, and
# presets may ask for ${fastest_precision:...}
_TRAINING_HOOKS = (
    "ml_engine.training.registry:register_network_configs",
    "ml_engine.training.precision:register_precision_resolver",
)


@dataclass(frozen=True)
class Entrypoint:
    task: str  # "package.module:function", imported once the config composed
    config_name: str
    rules: tuple[Rule, ...]
    summary: str
    before_compose: tuple[str, ...] = ()


ENTRYPOINTS: dict[str, Entrypoint] = {
    "train": Entrypoint(
        "ml_engine.training.train:train",
        "train",
        TRAIN_RULES,
        "train a network",
        _TRAINING_HOOKS,
    ),
    "eval": Entrypoint(
        "ml_engine.training.evaluate:evaluate",
        "eval",
        TRAIN_RULES,
        "test a checkpoint (ckpt_path=...)",
        _TRAINING_HOOKS,
    ),
    "predict": Entrypoint(
        "ml_engine.training.vision.predict:predict",
        "predict",
        PREDICT_RULES,
        "predict digits (ckpt_path=... input=<image|folder>)",
        _TRAINING_HOOKS,
    ),
    "export": Entrypoint(
        "ml_engine.training.lm.export:export",
        "export",
        EXPORT_RULES,
        "a language-model checkpoint as a GGUF (ckpt_path=...)",
    ),
    "generate": Entrypoint(
        "ml_engine.llm.generate:generate",
        "generate",
        GENERATE_RULES,
        "benchmark local GGUF generation",
    ),
    "quantize": Entrypoint(
        "ml_engine.llm.quant_budget:quantize_budget",
        "quantize_budget",
        QUANTIZE_BUDGET_RULES,
        "per-tensor quantization types to a size budget (budget=4.5bpw)",
    ),
    "serve": Entrypoint("ml_engine.server.serve:serve", "serve", (), "REST API and web UI"),
}


def usage() -> str:
    lines = ["usage: ml-engine <task> [group=option ...] [key=value ...] [-m] [--help]", "tasks:"]
    lines += [f"  {name:<9} {entry.summary}" for name, entry in ENTRYPOINTS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch ``argv[0]`` (the task) to its Hydra entrypoint with the remaining arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    entry = ENTRYPOINTS.get(name)
    if entry is None:
        print(f"error: unknown task '{name}'; accepted: {', '.join(ENTRYPOINTS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"ml-engine {name}", *rest]  # Hydra reads its overrides from sys.argv
    launch_task(name)


def launch_task(name: str) -> None:
    """Run task ``name`` with the overrides in ``sys.argv`` (the root scripts call this)."""
    from ml_engine.run.launch import launch

    entry = ENTRYPOINTS[name]
    launch(entry.task, entry.config_name, entry.rules, entry.before_compose)


if __name__ == "__main__":
    main()

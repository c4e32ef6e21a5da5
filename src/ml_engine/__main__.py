"""``ml-engine <task> [key=value ...]`` and ``python -m ml_engine <task> ...``.

The same entrypoints as the repo's ``train.py``, ``eval.py``, ``predict.py``, ``generate.py``
and ``serve.py``, for an installed package (configs packaged, outputs under the current dir).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ml_engine.validation import PREDICT_RULES, TRAIN_RULES, Rule


@dataclass(frozen=True)
class Entrypoint:
    task: str  # "package.module:function", imported once the config composed
    config_name: str
    rules: tuple[Rule, ...]
    summary: str


ENTRYPOINTS: dict[str, Entrypoint] = {
    "train": Entrypoint("ml_engine.train:train", "train", TRAIN_RULES, "train a network"),
    "eval": Entrypoint(
        "ml_engine.evaluate:evaluate", "eval", TRAIN_RULES, "test a checkpoint (ckpt_path=...)"
    ),
    "predict": Entrypoint(
        "ml_engine.predict:predict",
        "predict",
        PREDICT_RULES,
        "predict digits (ckpt_path=... input=<image|folder>)",
    ),
    "generate": Entrypoint(
        "ml_engine.llm.generate:generate", "generate", (), "benchmark local GGUF generation"
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
    from ml_engine.cli import launch

    sys.argv = [f"ml-engine {name}", *rest]  # Hydra reads its overrides from sys.argv
    launch(entry.task, config_name=entry.config_name, rules=entry.rules)


if __name__ == "__main__":
    main()

"""Build the packaged default model, ``src/ml_engine/llm/models_data/shakespeare-char-f16.gguf``
(``llm/model=shakespeare``): a character-level llama trained by this project on the bundled
tinyshakespeare, so that ``generate.py`` and ``serve.py`` write text on a first run; beside it
its importance matrix (``shakespeare-char-f16.imatrix.gguf``).

    python bench/build_default_model.py                  # trains (about 100 s on 2 cores), exports
    python bench/build_default_model.py --run <run dir>  # exports a run of TRAIN_COMMAND

How it was made goes into the file itself (``ml_engine.*`` keys, ``general.description``):
the training command, its val loss, precision, wall time, torch version, the corpus's sha256
and the git commit. ``tests/llm/test_packaged_model.py`` reads them and retrains with that
command to check that the file is what the command makes (val loss within noise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import ROOT

# the command, exactly as recorded in the file (a rebuild appends only paths.log_dir)
TRAIN_COMMAND = "python train.py experiment=shakespeare_char"
OUTPUT = ROOT / "src" / "ml_engine" / "llm" / "models_data" / "shakespeare-char-f16.gguf"
NAME = "shakespeare"


def train(log_dir: Path) -> Path:
    """Run TRAIN_COMMAND into ``log_dir``; the run dir it printed last."""
    command = [sys.executable, *TRAIN_COMMAND.split()[1:], f"paths.log_dir={log_dir}"]
    result = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    last = [line for line in result.stdout.splitlines() if line.startswith("run_dir: ")][-1]
    return ROOT / last.removeprefix("run_dir: ")


def provenance(run_dir: Path) -> dict[str, str | float]:
    """What the run says of itself, as GGUF keys."""
    import torch
    from omegaconf import OmegaConf

    record: dict[str, Any] = json.loads((run_dir / "job.json").read_text())
    metrics = record["metrics"]
    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    corpus = ROOT / "src" / "ml_engine" / "training" / "lm" / "corpora" / "tinyshakespeare.txt"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    val_loss = float(metrics["val/loss_best"])
    return {
        "general.description": (
            f"A 1.9M-parameter character-level llama trained by ml-engine on the bundled "
            f"tinyshakespeare with `{TRAIN_COMMAND}` (val loss {val_loss:.4f} nats/char). "
            "It continues text in the style of the corpus; it is no instruction or chat model."
        ),
        "ml_engine.train_command": TRAIN_COMMAND,
        "ml_engine.val_loss": val_loss,
        "ml_engine.train_wall_s": float(metrics.get("wall_s") or 0.0),
        "ml_engine.trainer_precision": str(cfg.trainer.precision),
        "ml_engine.seed": float(cfg.seed),
        "ml_engine.torch_version": torch.__version__,
        "ml_engine.corpus": corpus.name,
        "ml_engine.corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "ml_engine.git_commit": commit,
    }


def export(run_dir: Path, output: Path) -> Path:
    from ml_engine.training.checkpoints import checked_checkpoint, module_from_checkpoint
    from ml_engine.training.lm.export import write_gguf
    from ml_engine.training.lm.module import CausalLMModule

    ckpt, checkpoint = checked_checkpoint(
        str(run_dir / "checkpoints" / "best.ckpt"),
        runs_dir=run_dir.parent,
        expected=CausalLMModule,
        use="build_default_model.py",
    )
    module = module_from_checkpoint(ckpt, checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    # f16: 3.8 MB, every quantization of generate.py's sweeps is made from it as from an export
    path = write_gguf(module, output, name=NAME, quantization="f16", metadata=provenance(run_dir))
    write_matrix(module, checkpoint, path)
    return path


def write_matrix(module: Any, checkpoint: dict[str, Any], path: Path) -> Path:
    """The importance matrix beside the file (``<stem>.imatrix.gguf``), as export.py collects it
    (training split, 512 windows, the embeddings' entry from the loss's gradient), so that
    ``generate.py quantize.imatrix=auto`` on the packaged model has one to gate with."""
    from ml_engine.llm.imatrix import matrix_beside, write_imatrix
    from ml_engine.training.lm.imatrix_hooks import importance_from_checkpoint

    matrix = importance_from_checkpoint(
        module, checkpoint, n_chunks=512, process_output=True, embeddings=True
    )
    return write_imatrix(matrix_beside(path), matrix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help=f"a run dir of `{TRAIN_COMMAND}`")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ml-engine-default-model-") as folder:
        run_dir = args.run or train(Path(folder))
        path = export(run_dir, args.output)
        print(f"gguf: {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

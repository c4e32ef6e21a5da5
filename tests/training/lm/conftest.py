"""One trained language model for the session, as a user makes it: ``python train.py
experiment=shakespeare_char`` shrunk to seconds, then ``python export.py`` on its best
checkpoint. test_lm reads the training (metrics, TensorBoard, eval.py), test_export the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ml_engine.run.files import read_job_record
from tests.conftest import run_dir_of, run_entrypoint

LM_MAX_CHARS = 48000
LM_BLOCK = 64
LM_STEPS_PER_EPOCH = 40
# experiment=shakespeare_char shrunk to seconds: 48k characters, one layer (n_embd 256 and n_ff
# 512 keep every K-quant applicable), 2 × 40 steps of 16 windows of 64, in float32 so that a
# reload reproduces the validation loss exactly; 0.003 learns faster than the preset's rate in
# so few steps. Val loss ≈ 2.33 nats; its greedy 32 tokens after "ROMEO:" win by ≥ 0.45 logits
# at every step, far above what llama.cpp's f16 KV cache changes (2 × 30 steps: by 0.003)
LM_TRAIN = (
    "experiment=shakespeare_char",
    f"datamodule.max_chars={LM_MAX_CHARS}",
    f"datamodule.block_size={LM_BLOCK}",
    "datamodule.batch_size=16",
    f"datamodule.train_batches={LM_STEPS_PER_EPOCH}",
    "trainer.max_epochs=2",
    "trainer.precision=32-true",
    "model.net.n_layer=1",
    "model.net.n_ff=512",
    "model.optimizer.lr=0.003",
    "model.sample_tokens=40",
    "extras.print_config=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.enable_progress_bar=false",
)


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training run's dir (``<outputs>/train/runs/<run>``), TensorBoard logs included."""
    outputs = tmp_path_factory.mktemp("lm-outputs")
    result = run_entrypoint("train.py", *LM_TRAIN, f"paths.log_dir={outputs}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_of(result)


@pytest.fixture(scope="session")
def lm_metrics(lm_run: Path) -> dict[str, Any]:
    """What ``train`` returned, as the run's ``job.json`` keeps it."""
    record = read_job_record(lm_run)
    assert record is not None and record["status"] == "ok", record
    return record["metrics"]


@pytest.fixture(scope="session")
def exported(lm_run: Path) -> tuple[Path, str]:
    """The f32 GGUF as ``python export.py ckpt_path=<best.ckpt>`` writes it, and its stdout."""
    ckpt = lm_run / "checkpoints" / "best.ckpt"
    outputs = lm_run.parents[2]  # <outputs>/train/runs/<run>
    result = run_entrypoint("export.py", f"ckpt_path={ckpt}", f"paths.log_dir={outputs}")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gguf: "), result.stdout[-2000:]
    return Path(last.removeprefix("gguf: ")), result.stdout

"""The packaged default model (``llm/model=shakespeare``): a character-level llama trained by
this project, shipped as a GGUF that records how it was trained. It must load, write English
in Shakespeare's manner (unlike the random tiny model), and be what its recorded command makes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from ml_engine.llm.models import PACKAGED, ensure_model_file, given_file
from ml_engine.run.files import read_job_record
from ml_engine.run.locations import CONFIG_DIR
from tests.conftest import compose_config, run_dir_of, run_entrypoint

RECORDED_KEYS = (
    "general.description",
    "ml_engine.train_command",
    "ml_engine.val_loss",
    "ml_engine.trainer_precision",
    "ml_engine.seed",
    "ml_engine.torch_version",
    "ml_engine.corpus_sha256",
    "ml_engine.git_commit",
)
# the recorded command's val loss with seeds 12345 (the file's) and 1 was 1.6646 and 1.704
# (2 cores, bf16-mixed; seed 12345 again gives 1.665): ±0.08, twice the seeds' spread, covers a
# machine that trains in 32-true (no native bf16); the earlier 400-step recipe's 1.805 is far
# outside
VAL_LOSS_NOISE = 0.08
# words any page of the corpus is full of; random bytes hold none of them
COMMON_WORDS = {
    "the", "and", "i", "to", "of", "my", "a", "you", "that", "in", "is", "not", "with", "me",
    "it", "be", "your", "his", "thou", "will", "shall", "for", "what", "so", "have", "lord",
}  # fmt: skip
# letters, whitespace and the corpus's punctuation
PLAIN = re.compile(r"[A-Za-z\s,.;:'!?&$-]")


def model_cfg() -> dict[str, Any]:
    cfg = OmegaConf.load(CONFIG_DIR / "llm" / "model" / "shakespeare.yaml")
    return OmegaConf.to_container(cfg)  # type: ignore[return-value]


def metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if "." in key}


def greedy(path: Path, prompt: str, n: int) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        out = llm.create_completion(prompt, max_tokens=n, temperature=0, top_k=1, repeat_penalty=1)
    finally:
        llm.close()
    return str(out["choices"][0]["text"])  # type: ignore[index]


def writes_english(text: str) -> tuple[float, set[str]]:
    """The share of plain characters and the common words among the text's words."""
    plain = len(PLAIN.findall(text)) / max(len(text), 1)
    return plain, set(re.findall(r"[a-z']+", text.lower())) & COMMON_WORDS


def test_packaged_file_is_small_and_records_how_it_was_trained() -> None:
    path = given_file(model_cfg())
    assert path.is_file() and path.stat().st_size < 5_000_000, path
    meta = metadata(path)
    assert set(RECORDED_KEYS) <= set(meta), sorted(meta)
    assert meta["general.name"] == "shakespeare"
    assert meta["ml_engine.train_command"].startswith("python train.py experiment=")
    assert 1.0 < meta["ml_engine.val_loss"] < 2.0
    corpus = CONFIG_DIR.parent / "src" / "ml_engine" / "training" / "lm" / "corpora"
    if corpus.is_dir():  # a checkout: the corpus the file was trained on is the bundled one
        import hashlib

        digest = hashlib.sha256((corpus / meta["ml_engine.corpus"]).read_bytes()).hexdigest()
        assert digest == meta["ml_engine.corpus_sha256"]


def test_default_model_is_the_packaged_one_and_tiny_stays(tmp_path: Path) -> None:
    cfg = compose_config("generate")
    assert cfg.llm.model.name == "shakespeare" and cfg.llm.model.source == PACKAGED
    assert cfg.llm.quantization == "f16"
    resolved = ensure_model_file(cfg.llm.model, None, tmp_path)
    assert resolved.path == given_file(model_cfg()) and resolved.origin == "given"
    assert not list(tmp_path.iterdir())  # nothing written: the packaged file is used in place
    assert compose_config("generate", ["llm/model=tiny"]).llm.model.source == "embedded"


def test_packaged_model_writes_english_and_tiny_does_not(tiny_f32: Path) -> None:
    text = greedy(given_file(model_cfg()), "ROMEO:", 64)
    plain, words = writes_english(text)
    assert plain >= 0.9 and len(words) >= 3, (text, plain, words)
    # the same check on the random model fails: it tells a model that writes from one that
    # does not
    noise = greedy(tiny_f32, "ROMEO:", 64)
    noise_plain, noise_words = writes_english(noise)
    assert noise_plain < 0.9 or len(noise_words) < 3, (noise, noise_plain, noise_words)


@pytest.mark.slow
def test_recorded_command_retrains_to_the_recorded_val_loss(tmp_path: Path) -> None:
    """The file's own command (only the outputs folder and the console's progress changed)
    reaches its recorded val loss within the noise between seeds (about 100 s on 2 cores)."""
    meta = metadata(given_file(model_cfg()))
    script, *overrides = meta["ml_engine.train_command"].removeprefix("python ").split()
    result = run_entrypoint(
        script,
        *overrides,
        f"paths.log_dir={tmp_path}",
        "extras.print_config=false",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_job_record(run_dir_of(result))
    assert record is not None and record["status"] == "ok", record
    val_loss = float(record["metrics"]["val/loss_best"])
    assert abs(val_loss - meta["ml_engine.val_loss"]) <= VAL_LOSS_NOISE, (val_loss, meta)

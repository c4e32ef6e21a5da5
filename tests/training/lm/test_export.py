"""export.py: a trained character llama as a GGUF that llama.cpp tokenizes, scores and continues
exactly as PyTorch does, and that generate.py and the server run by path or by name.

The session's one small trained model (conftest.py: experiment=shakespeare_char shrunk to 48k
characters, one layer, n_embd 256, n_ff 512, block 64), exported once through the entrypoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import lightning as L
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ml_engine.llm.backends import Sampling
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend, exact_logits
from ml_engine.llm.gguf_writer import LlamaShape, held_out_text_path, write_random_llama
from ml_engine.run.files import PARTIAL_SUFFIX
from ml_engine.run.launch import describe_error
from ml_engine.server import create_app
from ml_engine.server.llm_service import LlmService
from ml_engine.training.checkpoints import DATAMODULE_HPARAMS, load_module, read_checkpoint
from ml_engine.training.lm.export import EXPORT_RULES, export, rope_permute, write_gguf
from ml_engine.training.lm.module import CausalLMModule
from ml_engine.training.lm.text_data import TextDataModule
from ml_engine.training.lm.tokenizer import CharTokenizer
from tests.conftest import run_as_job, run_entrypoint
from tests.server.conftest import serve_config
from tests.training.lm.conftest import LM_BLOCK as BLOCK

# characters the corpus lacks (byte fallback), and runs of spaces and newlines at both ends
ODD_TEXT = "  Ünïcødé 🙂 tabs\tand  double  spaces  \n\n\n trailing   "


@pytest.fixture(scope="module")
def f32_file(exported: tuple[Path, str]) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def module(lm_run: Path) -> CausalLMModule:
    return load_module(lm_run / "checkpoints" / "best.ckpt")


@pytest.fixture(scope="module")
def backend(f32_file: Path):
    with LlamaCppBackend(f32_file, n_ctx=512, n_threads=1, ignore_eos=True) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def val_text(f32_file: Path) -> str:
    return held_out_text_path(f32_file).read_text(encoding="utf-8")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---- the file


@pytest.mark.slow
def test_the_export_writes_a_whole_llama_gguf_beside_the_run(lm_run: Path, exported) -> None:
    path, stdout = exported
    name = f"shakespeare_char-{lm_run.name}"
    assert path == lm_run / f"{name}-f32.gguf" and path.is_file()
    assert f"val_text: {held_out_text_path(path)}" in stdout
    assert not list(lm_run.rglob(f"*{PARTIAL_SUFFIX}"))
    reader = gguf.GGUFReader(str(path))

    def value(key: str):
        return reader.fields[key].contents()

    assert value("general.name") == name and value("general.file_type") == 0
    assert value("tokenizer.ggml.model") == "llama" and value("tokenizer.ggml.pre") == "default"
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.ggml.add_space_prefix") is False
    assert value("tokenizer.ggml.add_eos_token") is False
    ids = [value(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos")]
    assert ids == [0, 1, 2]
    assert value("llama.context_length") == BLOCK
    assert value("tokenizer.ggml.tokens")[:3] == ["<unk>", "<s>", "</s>"]
    (record,) = [
        json.loads(p.read_text()) for p in lm_run.parents[2].glob("export/runs/*/job.json")
    ]
    assert record["status"] == "ok" and record["metrics"]["gguf"] == str(path)
    assert record["metrics"]["context_length"] == BLOCK


def test_rope_permute_pairs_rotate_half_dimensions_as_llama_cpp_does() -> None:
    # one head of width 8: rotate_half pairs (0,4) (1,5) (2,6) (3,7); llama.cpp (0,1) (2,3) ...
    rows = np.arange(16, dtype=np.float32).reshape(8, 2)
    permuted = rope_permute(rows, n_head=1)
    assert permuted[:, 0].tolist() == [0, 8, 2, 10, 4, 12, 6, 14]
    two_heads = rope_permute(np.arange(8, dtype=np.float32)[:, None], n_head=2)
    assert two_heads[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ---- the round trip, figure by figure


@pytest.mark.slow
def test_llama_cpp_tokenizes_exactly_as_the_training_tokenizer(module, backend, val_text) -> None:
    text = val_text + ODD_TEXT
    ours = module.tokenizer.encode_ids(text)
    assert backend.add_bos is False
    assert backend.tokenize(text) == ours
    assert backend.tokenize(ODD_TEXT) == module.tokenizer.encode_ids(ODD_TEXT)
    assert any(t < 259 for t in module.tokenizer.encode_ids(ODD_TEXT))  # byte fallback used
    assert backend.detokenize(ours) == text


@pytest.mark.slow
def test_llama_cpp_logits_equal_pytorch_on_a_256_token_window(
    module, backend, f32_file, val_text
) -> None:
    # 256 tokens: four times the trained context; RoPE is defined at every position, so both
    # sides must still compute the same function there
    ids = module.tokenizer.encode_ids(val_text)[:257]
    with torch.no_grad():
        expected = module.net(torch.tensor([ids[:256]]))[0].double().numpy()
    # f32 KV cache: llama.cpp computes in float32 throughout, as PyTorch does
    logits = exact_logits(f32_file, ids[:256], n_ctx=512, n_threads=1)
    assert np.abs(logits - expected).max() < 1e-3
    # what generate.py runs: llama.cpp's default f16 KV cache
    logprobs = backend.chunk_logprobs(ids, 0)
    assert np.abs(logprobs - _log_softmax(expected)).max() < 0.05


@pytest.mark.slow
def test_llama_cpp_perplexity_equals_exp_val_loss_on_the_same_windows(
    lm_run, module, backend, val_text
) -> None:
    checkpoint = read_checkpoint(lm_run / "checkpoints" / "best.ckpt")
    datamodule = TextDataModule(**checkpoint[DATAMODULE_HPARAMS])
    trainer = L.Trainer(
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    # the same non-overlapping windows of block_size predictions, no BOS, through llama.cpp
    tokens = backend.tokenize(val_text)
    nll = []
    for start in range(0, len(tokens) - 1, BLOCK):
        window = tokens[start : start + BLOCK + 1]
        logprobs = backend.chunk_logprobs(window, 0)
        nll.append(-logprobs[np.arange(len(window) - 1), window[1:]])
    ppl = float(np.exp(np.concatenate(nll).mean()))
    assert len(np.concatenate(nll)) == len(tokens) - 1
    assert abs(ppl / float(np.exp(metrics["val/loss"])) - 1) < 0.01


@pytest.mark.slow
def test_greedy_generation_gives_the_same_32_tokens(module, backend) -> None:
    prompt = "ROMEO:"
    ids = module.tokenizer.encode(prompt)[None]
    torch_tokens = module.net.generate(ids, 32, temperature=0.0)[0, ids.shape[1] :].tolist()
    greedy = Sampling(max_tokens=32, temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
    assert backend.prompt_tokens(prompt) == ids[0].tolist()
    assert backend.generate(prompt, greedy).tokens == torch_tokens


@pytest.mark.slow
def test_a_generate_sweep_measures_the_export_on_its_held_out_text(
    f32_file: Path, tmp_path: Path
) -> None:
    result = run_entrypoint(
        "generate.py",
        "-m",
        f"llm.model.path={f32_file}",
        "llm.quantization=f32,q8_0,q4_k_m,q2_k",
        "prompt=ROMEO:",
        "llm.max_tokens=16",
        "llm.n_threads=1",
        "llm.n_ctx=256",
        "bench.warmup=0",
        "bench.repetitions=1",
        "bench.n_prompt=128",  # llama-bench's pp512 does not fit in this context
        "bench.n_gen=32",
        "quality.n_chunks=32",
        "extras.print_config=false",
        "logger=none",
        f"paths.models_dir={tmp_path / 'models'}",
        f"paths.log_dir={tmp_path}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = Path(result.stdout.strip().splitlines()[-1].removeprefix("summary: "))
    jobs = json.loads(summary.with_name("summary.json").read_text())["jobs"]
    assert all(job["status"] == "ok" for job in jobs), [job["error"] for job in jobs]
    rows = {job["metrics"]["quantization"]: job["metrics"] for job in jobs}
    assert rows["f32"]["quality/reference"] is True
    kld = [rows[q]["quality/kl_mean"] for q in ("q8_0", "q4_k_m", "q2_k")]
    assert 0 < kld[0] < kld[1] < kld[2], kld
    for job in summary.parent.glob("*/result.json"):
        quality = json.loads(job.read_text())["quality"]
        # the validation text beside the file, in chunks of the trained context
        assert quality["text"] == str(held_out_text_path(f32_file))
        assert quality["n_ctx"] == BLOCK and quality["add_bos"] is False


# ---- the server


@pytest.mark.slow
def test_the_server_runs_an_exported_model_by_name(tmp_path: Path, lm_run, f32_file, module):
    app = create_app(
        serve_config(tmp_path, runs_dir=lm_run.parent, **{"paths.models_dir": str(tmp_path)})
    )
    with TestClient(app) as client:
        listed = client.get("/llm/models").json()
        (entry,) = [m for m in listed["models"] if m["exported"]]
        assert entry["name"] == f32_file.stem
        assert entry["quantizations_on_disk"] == ["f32"] and entry["file_on_disk"] is True
        body = {
            "model": f32_file.stem,
            "prompt": "ROMEO:",
            "max_tokens": 32,
            "temperature": 0,
            "top_k": 1,
            "repeat_penalty": 1.0,
        }
        answer = client.post("/llm/generate", json=body)
        assert answer.status_code == 200, answer.text
        ids = module.tokenizer.encode("ROMEO:")[None]
        greedy = module.net.generate(ids, 32, temperature=0.0)[0, ids.shape[1] :]
        assert answer.json()["output"] == module.tokenizer.decode(greedy)
        assert answer.json()["quantization"] == "f32"
        # still names only: the file's path is no model
        refused = client.post("/llm/generate", json={**body, "model": str(f32_file)})
        assert refused.status_code == 422


def test_exported_files_are_models_named_by_their_stem(tmp_path: Path) -> None:
    shape = LlamaShape(n_vocab=320, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=2, n_ctx=64)
    runs = tmp_path / "runs"
    for relative in ("a/char-a-f32.gguf", "b/char-a-f32.gguf", "c/tiny.gguf", "d/bad name.gguf"):
        write_random_llama(runs / relative, shape, name="x")
    (runs / "e").mkdir()
    (runs / "e" / "notes.txt").write_text("not a model")
    service = LlmService(tmp_path / "models", exports_dir=runs)
    # a configured model's name and a second run's file of the same name stay out
    assert service.exported_models() == {"char-a-f32": runs / "a" / "char-a-f32.gguf"}
    assert "char-a-f32" in service.model_names() and "tiny" in service.model_names()
    llm = service.llm_config("char-a-f32")
    assert llm.model.path == str((runs / "a" / "char-a-f32.gguf").resolve())
    assert llm.quantization == "f32" and llm.model.name == "x"
    assert LlmService(tmp_path / "models").exported_models() == {}


# ---- mistakes


def _classifier_checkpoint(path: Path) -> Path:
    # a checkpoint that names no module class is a classifier's (checkpoints.module_class)
    torch.save({"state_dict": {}, "hyper_parameters": {}}, path)
    return path


@pytest.mark.slow
def test_a_classifier_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    ckpt = _classifier_checkpoint(tmp_path / "digits.ckpt")
    result = run_entrypoint("export.py", f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path}")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: {ckpt} is a ClassifierModule checkpoint (an image classifier), the wrong kind "
        "for export.py: it takes a CausalLMModule checkpoint (a language model, as python "
        "train.py experiment=shakespeare_char writes)"
    ]
    assert not list(tmp_path.rglob("*.gguf")) and not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ckpt_path={tmp}/missing.ckpt"], "checkpoint not found: {tmp}/missing.ckpt"),
        (["ckpt_path={tmp}/notes.ckpt"], "(not a PyTorch checkpoint file)"),
        (["ckpt_path={tmp}/notes.ckpt", "quantization=q9"], "quantization='q9' is not valid"),
        (["ckpt_path={tmp}/notes.ckpt", "output=x.bin"], "expected a file path ending in .gguf"),
    ],
)
def test_export_mistakes_are_one_line(make_cfg, tmp_path: Path, overrides, message) -> None:
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    cfg = make_cfg("export", [o.format(tmp=tmp_path) for o in overrides])
    with pytest.raises(Exception) as caught:
        run_as_job(export, cfg, EXPORT_RULES)
    line = describe_error(caught.value)
    assert message.format(tmp=tmp_path) in line and "\n" not in line
    assert not list(tmp_path.rglob("*.gguf"))


@pytest.mark.slow
def test_a_failed_quantization_leaves_nothing(module, tmp_path: Path, monkeypatch) -> None:
    import ml_engine.training.lm.export as exporter

    def fail(*args, **kwargs):
        raise RuntimeError("quantizer died")

    monkeypatch.setattr(exporter, "quantize_gguf", fail)
    with pytest.raises(RuntimeError):
        write_gguf(module, tmp_path / "m-q4_k_m.gguf", name="m", quantization="q4_k_m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_other_quantizations_are_made_from_f32(module, tmp_path: Path) -> None:
    from ml_engine.llm.models import read_gguf_facts

    path = write_gguf(module, tmp_path / "m-q4_k_m.gguf", name="m", quantization="q4_k_m")
    facts = read_gguf_facts(path)
    assert (facts.quantization, facts.name, facts.context_length) == ("q4_k_m", "m", BLOCK)
    assert list(tmp_path.iterdir()) == [path]


def test_grouped_query_attention_exports_exactly(tmp_path: Path) -> None:
    # K has n_head_kv heads of its own to permute; random weights large enough to matter
    tokenizer = CharTokenizer.from_text("abcdefgh ijklmnop\nqrstuvwxyz.,;")
    net = {"name": "llama", "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_embd": 256, "n_ff": 256}
    module = CausalLMModule(
        net, {"_target_": "torch.optim.AdamW"}, tokenizer=tokenizer.to_config(), block_size=32
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.net.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.1)
    path = write_gguf(module, tmp_path / "gqa.gguf", name="gqa")
    ids = tokenizer.encode_ids("a quick brown fox jumps over the lazy dog.\n" * 2)[:80]
    with torch.no_grad():
        expected = module.net(torch.tensor([ids]))[0].double().numpy()
    logits = exact_logits(path, ids, n_ctx=128, n_threads=1)
    assert np.abs(expected).max() > 1  # the comparison has something to compare
    assert np.abs(logits - expected).max() < 1e-3

"""Importance matrices: collected from PyTorch with forward hooks (training/lm/imatrix_hooks.py)
and from llama.cpp's own forward pass (llm/imatrix_llama.py), they are the matrix
``llama-imatrix`` computes, in the file format ``llama-imatrix`` and ``llama-quantize`` read.

One small random llama (2 layers, n_embd 256, n_ff 512, grouped-query attention, the character
vocabulary of the first 20k characters of tinyshakespeare), written once to an f32 GGUF; the
real tools are built against the installed wheel (tests/llm/llama_tools.py).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch

from ml_engine.errors import UserError
from ml_engine.llm.imatrix import (
    ImportanceMatrix,
    check_matches_model,
    model_columns,
    read_imatrix,
    write_imatrix,
)
from ml_engine.llm.imatrix_llama import collect_importance_llama, filter_tensor_name
from ml_engine.training.checkpoints import DATAMODULE_HPARAMS
from ml_engine.training.lm.export import write_gguf
from ml_engine.training.lm.imatrix_hooks import (
    collect_importance,
    importance_from_checkpoint,
    linear_tensor_names,
    training_windows,
)
from ml_engine.training.lm.module import CausalLMModule
from ml_engine.training.lm.text_data import TextDataModule, bundled_corpus_path
from ml_engine.training.lm.tokenizer import CharTokenizer
from tests.llm.llama_tools import llama_tools  # noqa: F401 (the session fixture)

N_CTX = 64
N_CHUNKS = 8
TEXT = bundled_corpus_path().read_text(encoding="utf-8")[:20000]
CALIBRATION = TEXT[: N_CTX * N_CHUNKS]
BLOCK_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


def relative_gap(ours: ImportanceMatrix, theirs: ImportanceMatrix) -> float:
    """The largest per-column relative difference of the means, over every tensor."""
    assert sorted(ours.entries) == sorted(theirs.entries)
    gaps = []
    for name, entry in ours.entries.items():
        expected = theirs.entries[name].means()
        gaps.append(float(np.max(np.abs(entry.means() - expected) / np.abs(expected))))
    return max(gaps)


def counts(matrix: ImportanceMatrix) -> dict[str, list[int]]:
    return {name: entry.counts.tolist() for name, entry in sorted(matrix.entries.items())}


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer.from_text(TEXT)


@pytest.fixture(scope="module")
def module(tokenizer: CharTokenizer) -> CausalLMModule:
    net = {"name": "llama", "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_embd": 256, "n_ff": 512}
    module = CausalLMModule(
        net, {"_target_": "torch.optim.AdamW"}, tokenizer=tokenizer.to_config(), block_size=N_CTX
    )
    torch.manual_seed(0)
    with torch.no_grad():  # weights large enough for the activations to differ per column
        for parameter in module.net.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.1)
    return module


@pytest.fixture(scope="module")
def f32_file(module: CausalLMModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(module, tmp_path_factory.mktemp("imatrix") / "tiny-f32.gguf", name="tiny")


@pytest.fixture(scope="module")
def hooks_matrix(module: CausalLMModule, tokenizer: CharTokenizer) -> ImportanceMatrix:
    """The PyTorch hooks over the calibration text's 8 windows of 64 tokens."""
    ids = torch.tensor(tokenizer.encode_ids(CALIBRATION))
    return collect_importance(module.net, [ids.view(N_CHUNKS, N_CTX)], process_output=True)


@pytest.fixture(scope="module")
def llama_matrix(f32_file: Path) -> ImportanceMatrix:
    return collect_importance_llama(
        f32_file, CALIBRATION, n_ctx=N_CTX, n_threads=2, process_output=True, dataset="calib"
    )


def run_tool(tools: Path, name: str, *args: object) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(tools / name), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


# ---- PyTorch hooks and llama.cpp's forward pass collect the same matrix


def test_hooks_name_every_block_matrix_as_llama_cpp(module: CausalLMModule) -> None:
    names = set(linear_tensor_names(module.net).values())
    assert names == {f"blk.{i}.{kind}.weight" for i in range(2) for kind in BLOCK_NAMES}
    with_output = set(linear_tensor_names(module.net, process_output=True).values())
    assert with_output == names | {"output.weight"}


def test_hooks_and_llama_cpp_collect_the_same_matrix(
    hooks_matrix: ImportanceMatrix, llama_matrix: ImportanceMatrix, f32_file: Path
) -> None:
    assert sorted(hooks_matrix.entries) == sorted(llama_matrix.entries)
    tokens = N_CTX * N_CHUNKS
    assert (
        counts(hooks_matrix)
        == counts(llama_matrix)
        == {name: [tokens] for name in hooks_matrix.entries}
    )
    assert (hooks_matrix.chunk_count, hooks_matrix.chunk_size) == (N_CHUNKS, N_CTX)
    assert (llama_matrix.chunk_count, llama_matrix.chunk_size) == (N_CHUNKS, N_CTX)
    assert llama_matrix.datasets == ["calib"]
    # llama.cpp keeps K and V in f16: measured 3e-4 at most
    assert relative_gap(hooks_matrix, llama_matrix) < 1e-3
    # the widths are the GGUF's input columns (ne[0]) of the same tensors
    check_matches_model(hooks_matrix, model_columns(f32_file), "hooks")
    down = hooks_matrix.entries["blk.0.ffn_down.weight"]
    assert down.n_columns == 512 and np.ptp(down.means()) > 0.1 * down.means().mean()


def test_hooks_leave_the_network_as_they_found_it(module: CausalLMModule, tokenizer) -> None:
    module.net.train()

    def windows():
        yield torch.tensor(tokenizer.encode_ids(CALIBRATION[:N_CTX]))
        raise RuntimeError("the data died")

    with pytest.raises(RuntimeError):
        collect_importance(module.net, windows())
    assert module.net.training
    assert not any(m._forward_pre_hooks for m in module.net.modules())
    matrix = collect_importance(module.net, [torch.tensor(tokenizer.encode_ids(CALIBRATION))])
    assert module.net.training and not any(m._forward_pre_hooks for m in module.net.modules())
    assert "output.weight" not in matrix.entries and matrix.chunk_count == 1


def test_a_half_precision_network_is_measured_in_float32(
    module: CausalLMModule, tokenizer: CharTokenizer, hooks_matrix: ImportanceMatrix
) -> None:
    import copy

    half = copy.deepcopy(module.net).to(torch.bfloat16)
    ids = torch.tensor(tokenizer.encode_ids(CALIBRATION)).view(N_CHUNKS, N_CTX)
    matrix = collect_importance(half, [ids], process_output=True)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert counts(matrix) == counts(hooks_matrix)
    # the bf16 weights, computed in float32: the first layer's inputs (the embedding) agree to
    # bf16's rounding, not to float32's
    first = "blk.0.attn_q.weight"
    gap = np.abs(matrix.entries[first].means() / hooks_matrix.entries[first].means() - 1)
    assert 0 < gap.max() < 0.02


def test_the_tensor_name_filter_is_llama_imatrix_s() -> None:
    assert filter_tensor_name("CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert filter_tensor_name("CPU#output.weight") == "output.weight"
    assert filter_tensor_name("blk.3.ffn_up.weight") == "blk.3.ffn_up.weight"


# ---- the real llama-imatrix and llama-quantize


def test_llama_imatrix_computes_what_our_llama_cpp_collector_does(
    llama_tools: Path,  # noqa: F811
    f32_file: Path,
    llama_matrix: ImportanceMatrix,
    tmp_path: Path,
) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION, encoding="utf-8")
    out = tmp_path / "tool.gguf"
    run_tool(
        llama_tools, "llama-imatrix", "-m", f32_file, "-f", text, "-c", N_CTX,
        "--chunks", N_CHUNKS, "--process-output", "--no-ppl", "-t", 2, "-o", out,
    )  # fmt: skip
    theirs = read_imatrix(out)
    assert theirs.datasets == [str(text)]
    assert (theirs.chunk_count, theirs.chunk_size) == (N_CHUNKS, N_CTX)
    assert counts(theirs) == counts(llama_matrix)
    assert relative_gap(llama_matrix, theirs) < 1e-4  # measured 3e-6: float32 vs 64 sums


def test_llama_imatrix_reads_our_file_as_written(
    llama_tools: Path,  # noqa: F811
    hooks_matrix: ImportanceMatrix,
    f32_file: Path,
    tmp_path: Path,
) -> None:
    named = ImportanceMatrix(
        dict(hooks_matrix.entries), ["calibration (train split)"], N_CHUNKS, N_CTX
    )
    ours = write_imatrix(tmp_path / "ours.gguf", named)
    # no text: the tool only loads the file and saves it again (-m is required, not read; the
    # chunk count it saves is its tokens over -c)
    again_file = tmp_path / "again.gguf"
    run_tool(
        llama_tools, "llama-imatrix", "-m", f32_file, "-c", N_CTX, "--in-file", ours,
        "-o", again_file,
    )  # fmt: skip
    again = read_imatrix(again_file)
    assert again.datasets == named.datasets
    assert (again.chunk_count, again.chunk_size) == (N_CHUNKS, N_CTX)
    assert counts(again) == counts(hooks_matrix)
    assert relative_gap(again, hooks_matrix) < 1e-6  # float32 in the file


def test_llama_quantize_takes_the_hooks_matrix(
    llama_tools: Path,  # noqa: F811
    hooks_matrix: ImportanceMatrix,
    f32_file: Path,
    tmp_path: Path,
) -> None:
    matrix_file = write_imatrix(tmp_path / "hooks.gguf", hooks_matrix)
    out = tmp_path / "tiny-q4_0.gguf"
    done = run_tool(llama_tools, "llama-quantize", "--imatrix", matrix_file, f32_file, out, "q4_0")
    n = len(hooks_matrix.entries)
    assert f"loaded {n} importance matrix entries from {matrix_file}" in done.stdout + done.stderr
    llm = llama_cpp.Llama(str(out), n_ctx=N_CTX, n_threads=1, verbose=False)
    try:
        completion = llm.create_completion("ROMEO:", max_tokens=8, temperature=0.0)
        assert completion["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


# ---- the training split of a checkpoint's text


def checkpoint_for(text_file: Path, text: str) -> dict:
    """What a checkpoint records of its text datamodule."""
    return {
        DATAMODULE_HPARAMS: {"path": str(text_file), "block_size": N_CTX, "val_fraction": 0.1},
        TextDataModule.__name__: {"sha256": hashlib.sha256(text.encode()).hexdigest()},
    }


def test_a_checkpoint_is_calibrated_on_its_training_split(
    module: CausalLMModule, tmp_path: Path
) -> None:
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    checkpoint = checkpoint_for(text_file, TEXT)
    matrix = importance_from_checkpoint(module, checkpoint, n_chunks=12)
    assert matrix.datasets == [f"{text_file} (train split)"]
    assert (matrix.chunk_count, matrix.chunk_size) == (12, N_CTX)
    assert all(entry.counts.tolist() == [12 * N_CTX] for entry in matrix.entries.values())
    # exactly the windows spread over the first 90% of the text, none from the validation part
    train = module.tokenizer.encode(TEXT[:18000])
    windows = training_windows(train, N_CTX, 12)
    assert windows[0].tolist() == train[:N_CTX].tolist()
    assert windows[-1].tolist() == train[(18000 // N_CTX - 1) * N_CTX :][:N_CTX].tolist()
    expected = collect_importance(module.net, [windows])
    assert relative_gap(matrix, expected) < 1e-9
    # more chunks than the split holds: every whole window once
    assert len(training_windows(train, N_CTX, 10_000)) == 18000 // N_CTX


def test_a_changed_or_missing_training_text_is_one_line(
    module: CausalLMModule, tmp_path: Path
) -> None:
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(TEXT.upper(), encoding="utf-8")
    with pytest.raises(UserError) as error:
        importance_from_checkpoint(module, checkpoint_for(text_file, TEXT))
    assert "has changed since the checkpoint trained on it" in one_line(error)
    with pytest.raises(UserError) as error:
        importance_from_checkpoint(module, checkpoint_for(tmp_path / "gone.txt", TEXT))
    assert "gone.txt" in one_line(error)


# ---- bad input ends in one line


def test_reading_what_is_not_an_importance_matrix_is_one_line(
    tmp_path: Path, f32_file: Path
) -> None:
    with pytest.raises(UserError) as error:
        read_imatrix(tmp_path / "missing.gguf")
    assert "no such file" in one_line(error)
    text = tmp_path / "notes.gguf"
    text.write_text("not a gguf at all\n" * 10)
    with pytest.raises(UserError) as error:
        read_imatrix(text)
    assert "is not a GGUF file" in one_line(error)
    with pytest.raises(UserError) as error:
        read_imatrix(f32_file)
    assert "not an importance matrix" in one_line(error)


def test_a_matrix_from_another_model_is_one_line(
    hooks_matrix: ImportanceMatrix, f32_file: Path
) -> None:
    columns = model_columns(f32_file)
    wider = {name: width * 2 for name, width in columns.items()}
    with pytest.raises(UserError) as error:
        check_matches_model(hooks_matrix, wider, "hooks.gguf")
    assert "made for another model" in one_line(error) and "columns" in str(error.value)
    deeper = ImportanceMatrix(entries=dict(hooks_matrix.entries))
    deeper.add("blk.7.attn_q.weight", np.ones((4, 256)))
    with pytest.raises(UserError) as error:
        check_matches_model(deeper, columns, "deeper.gguf")
    assert "blk.7.attn_q.weight" in one_line(error)


def test_the_llama_cpp_collector_refuses_bad_input_in_one_line(
    tmp_path: Path, f32_file: Path
) -> None:
    with pytest.raises(UserError) as error:
        collect_importance_llama(tmp_path / "missing.gguf", CALIBRATION)
    assert "no such file" in one_line(error)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(f32_file.read_bytes()[:5000])
    with pytest.raises(UserError) as error:
        collect_importance_llama(broken, CALIBRATION, n_ctx=N_CTX)
    assert str(broken) in one_line(error)
    with pytest.raises(UserError) as error:
        collect_importance_llama(f32_file, CALIBRATION[: N_CTX - 1], n_ctx=N_CTX)
    assert "fewer than one chunk" in one_line(error)

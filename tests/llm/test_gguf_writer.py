"""The project's own llama GGUF writer: files llama.cpp loads, atomic writes, shape checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.gguf_writer import (
    LlamaShape,
    TokenizerOptions,
    byte_fallback_vocabulary,
    expected_tensor_shapes,
    random_llama_tensors,
    shape_from_mapping,
    write_llama_gguf,
)
from tests.llm.conftest import partial_files, tiny_model_cfg


def test_tiny_model_is_written_and_loaded_with_its_configured_shape(
    tiny_backend: LlamaCppBackend,
) -> None:
    shape = shape_from_mapping(tiny_model_cfg().shape)
    facts = tiny_backend.describe()
    assert facts["n_params"] == shape.n_params
    assert facts["n_layer"] == shape.n_layer
    assert facts["n_vocab"] == shape.n_vocab
    assert shape.k_quant_ready


def test_byte_fallback_round_trips_any_text(tiny_backend: LlamaCppBackend) -> None:
    text = "C++로 멀티스레드 예제 작성해줘. {x: 1}\n\ttab"
    tokens = tiny_backend.tokenize(text)
    assert tokens[0] == 1  # BOS
    # Hangul is not in the vocabulary: it must come back byte for byte through <0xNN> tokens.
    assert tiny_backend.detokenize(tokens[1:]).lstrip(" ") == text


def test_vocabulary_layout() -> None:
    vocab = byte_fallback_vocabulary(600)
    assert len(vocab.tokens) == len(set(vocab.tokens)) == 600
    assert vocab.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert vocab.tokens[3 + 0x41] == "<0x41>"
    with pytest.raises(ValueError):
        byte_fallback_vocabulary(100)


@pytest.mark.parametrize(
    "values, problem",
    [
        ({"n_embd": 250, "n_head": 4}, "multiple of n_head"),
        ({"n_head": 4, "n_head_kv": 3}, "n_head_kv"),
        ({"n_vocab": 10}, "n_vocab"),
    ],
)
def test_invalid_shapes_are_refused(values: dict, problem: str) -> None:
    base = dict(n_vocab=512, n_embd=256, n_ff=512, n_layer=1, n_head=4, n_head_kv=4, n_ctx=64)
    with pytest.raises(ValueError, match=problem):
        LlamaShape(**{**base, **values})


def _small_shape() -> LlamaShape:
    return LlamaShape(n_vocab=300, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=1, n_ctx=64)


def test_grouped_query_attention_and_f16_file_load(tmp_path: Path) -> None:
    shape = _small_shape()
    vocab = byte_fallback_vocabulary(shape.n_vocab)
    path = write_llama_gguf(
        tmp_path / "gqa.gguf",
        shape,
        vocab,
        random_llama_tensors(shape, 3),
        name="gqa",
        file_type="f16",
    )
    assert expected_tensor_shapes(shape)["blk.0.attn_k.weight"] == (32, 64)
    with LlamaCppBackend(path, n_ctx=64, n_threads=1, ignore_eos=True) as backend:
        assert backend.describe()["n_params"] == shape.n_params
        result = backend.complete("hi", max_tokens=4, temperature=0, top_k=1, top_p=1.0)
    assert result["completion_tokens"] == 4


def test_a_failed_write_leaves_neither_the_file_nor_a_partial(tmp_path: Path) -> None:
    shape = _small_shape()
    tensors = dict(random_llama_tensors(shape))
    tensors["blk.0.ffn_up.weight"] = np.zeros((3, 3), dtype=np.float32)
    target = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match="ffn_up"):
        write_llama_gguf(target, shape, byte_fallback_vocabulary(300), tensors, name="bad")
    assert not target.exists()
    assert partial_files(tmp_path) == []


def test_missing_tensors_are_named(tmp_path: Path) -> None:
    shape = _small_shape()
    tensors = dict(random_llama_tensors(shape))
    del tensors["output.weight"]
    with pytest.raises(ValueError, match=r"output\.weight"):
        write_llama_gguf(
            tmp_path / "m.gguf", shape, byte_fallback_vocabulary(300), tensors, name="m"
        )
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_options_turn_off_bos_and_the_space_prefix(tmp_path: Path) -> None:
    shape = LlamaShape(n_vocab=320, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=2, n_ctx=64)
    vocab = byte_fallback_vocabulary(shape.n_vocab)
    plain = TokenizerOptions(add_bos=False, add_space_prefix=False, pre="default")
    tokens = {}
    for label, options in (("default", None), ("plain", plain)):
        path = tmp_path / f"{label}.gguf"
        write_llama_gguf(
            path, shape, vocab, random_llama_tensors(shape), name=label, tokenizer=options
        )
        with LlamaCppBackend(path, n_ctx=64, n_threads=1) as backend:
            tokens[label] = (backend.add_bos, backend.tokenize("a b"))
    a, space, b = (vocab.tokens.index(piece) for piece in ("a", "\u2581", "b"))
    # SentencePiece's habits: BOS first, "▁" before the text
    assert tokens["default"] == (True, [vocab.bos_id, space, a, space, b])
    assert tokens["plain"] == (False, [a, space, b])

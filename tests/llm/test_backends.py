"""The backend contract: complete/stream/close on llama.cpp and on the mock."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.llm.backends import Sampling, open_backend
from ml_engine.llm.backends.llama_cpp import (
    Device,
    LlamaCppBackend,
    compute_backend_of_build,
    llama_devices,
    offload_account,
)
from ml_engine.llm.backends.mock import MockBackend
from ml_engine.llm.gguf_writer import (
    LlamaShape,
    byte_fallback_vocabulary,
    random_llama_tensors,
    write_llama_gguf,
)
from ml_engine.llm.models import available_quantizations, model_names
from tests.llm.conftest import llm_node, tiny_model_cfg

SAMPLING = dict(max_tokens=12, temperature=0.8, top_k=40, top_p=0.95, repeat_penalty=1.1, seed=7)
TIMING_KEYS = {"load_s", "prompt_eval_s", "gen_s", "ttft_s", "gen_tokens_per_s"}


def test_complete_returns_the_contract_fields(tiny_backend: LlamaCppBackend) -> None:
    result = tiny_backend.complete("Write a C++ thread example", **SAMPLING)
    assert set(result) == {"text", "prompt_tokens", "completion_tokens", "finish_reason", "timings"}
    assert result["completion_tokens"] == SAMPLING["max_tokens"]  # tiny ignores end-of-text
    assert result["finish_reason"] == "length"
    assert result["prompt_tokens"] == len(tiny_backend.tokenize("Write a C++ thread example"))
    assert set(result["timings"]) == TIMING_KEYS
    assert all(isinstance(v, float) and v >= 0 for v in result["timings"].values())
    assert result["timings"]["gen_tokens_per_s"] > 0


def test_same_seed_same_text_and_every_request_starts_from_an_empty_cache(
    tiny_backend: LlamaCppBackend,
) -> None:
    first = tiny_backend.complete("hello", **SAMPLING)
    second = tiny_backend.complete("hello", **SAMPLING)
    assert first["text"] == second["text"]
    other_seed = tiny_backend.complete("hello", **{**SAMPLING, "seed": 8, "max_tokens": 40})
    assert other_seed["text"][: len(first["text"])] != first["text"]


def test_stream_yields_the_same_text_as_complete(tiny_backend: LlamaCppBackend) -> None:
    pieces = list(tiny_backend.stream("C++로 스레드", **SAMPLING))
    assert len(pieces) > 1
    assert "".join(pieces) == tiny_backend.complete("C++로 스레드", **SAMPLING)["text"]


def test_greedy_is_deterministic_without_a_seed(tiny_backend: LlamaCppBackend) -> None:
    greedy = {**SAMPLING, "temperature": 0.0, "seed": None}
    texts = {tiny_backend.complete("abc", **greedy)["text"] for _ in range(3)}
    assert len(texts) == 1


def test_wall_clock_loop_decodes_exactly_what_llama_cpp_counts(
    tiny_backend: LlamaCppBackend,
) -> None:
    record = tiny_backend.generate("count me", Sampling(**{**SAMPLING, "max_tokens": 20}))
    assert len(record.tokens) == 20
    # the first token comes from the prompt's logits; each later one costs one decode
    assert record.n_decoded == 19 == record.counters["n_eval"]
    assert record.counters["n_p_eval"] == record.prompt_tokens
    assert math.isfinite(record.counters["eval_tokens_per_s"])
    assert record.ttft_s >= record.prompt_eval_s > 0


def test_prompt_longer_than_the_context_is_a_user_error(tiny_f32: Path) -> None:
    with (
        LlamaCppBackend(tiny_f32, n_ctx=32, n_threads=1) as backend,
        pytest.raises(UserError, match=r"llm\.n_ctx=32"),
    ):
        backend.complete("word " * 100, **SAMPLING)


def test_chat_template_in_the_gguf_wraps_the_prompt(tmp_path: Path) -> None:
    shape = LlamaShape(n_vocab=300, n_embd=64, n_ff=128, n_layer=1, n_head=2, n_head_kv=2, n_ctx=64)
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n"
    )
    path = write_llama_gguf(
        tmp_path / "chat.gguf",
        shape,
        byte_fallback_vocabulary(300),
        random_llama_tensors(shape),
        name="chat",
        chat_template=chatml,
    )
    with LlamaCppBackend(path, n_ctx=64, n_threads=1, chat_template=True) as templated:
        assert (
            templated.format_prompt("hi")
            == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        )
    with LlamaCppBackend(path, n_ctx=64, n_threads=1, chat_template=False) as raw:
        assert raw.format_prompt("hi") == "hi"


def test_open_backend_resolves_the_file_and_reports_offload_honestly(models_dir: Path) -> None:
    with open_backend(llm_node("q8_0", n_gpu_layers=99), models_dir) as backend:
        facts = backend.describe()
        assert backend.name == "llama_cpp"
    assert facts["n_gpu_layers_requested"] == 99
    if not facts["gpu_offload_supported"]:
        assert facts["n_gpu_layers_effective"] == 0
        assert facts["compute_backend"] == "CPU"
        assert "CPU-only" in facts["offload_note"]
    assert "q8_0" in available_quantizations(tiny_model_cfg(), models_dir)


def test_offload_comes_from_llama_cpps_account_not_from_the_request(tiny_f32: Path) -> None:
    devices = llama_devices()
    assert devices and devices[0].kind == "CPU"  # the registry is readable here
    if any(d.kind in ("GPU", "IGPU") for d in devices):
        pytest.skip("llama.cpp sees a GPU here: this test is about a CPU-only build")
    assert compute_backend_of_build() == "CPU"
    with LlamaCppBackend(tiny_f32, n_gpu_layers=99, n_ctx=64, n_threads=1) as backend:
        facts = backend.describe()
    assert facts["n_gpu_layers_requested"] == 99
    assert facts["n_gpu_layers_effective"] == 0 and facts["compute_backend"] == "CPU"
    # read off llama.cpp's load log: every layer, the output layer included, on the CPU device
    assert facts["offload_source"] == "load log"
    assert facts["layer_devices"] == ["CPU"] * (facts["n_layer"] + 1)
    assert facts["llama_devices"] == [d.name for d in devices]
    assert "CPU-only" in facts["offload_note"]


CPU = Device("CPU", "CPU", "CPU", "a CPU")
CUDA = Device("CUDA0", "GPU", "CUDA", "a GPU")


def _placement(*devices: str) -> list[str]:
    return [
        f"load_tensors: layer {i:3d} assigned to device {d}, is_swa = 0"
        for i, d in enumerate(devices)
    ]


@pytest.mark.parametrize(
    "lines, devices, gpu_offload, expected",
    [
        (_placement("CPU", "CPU", "CPU"), [CPU], False, (0, "CPU", "load log")),
        (_placement("CPU", "CUDA0", "CUDA0"), [CPU, CUDA], True, (2, "CUDA", "load log")),
        (_placement("CPU", "CPU", "CPU"), [CPU, CUDA], True, (0, "CPU", "load log")),
        (
            ["load_tensors: offloaded 33/33 layers to GPU"],
            [CPU, CUDA],
            True,
            (33, "CUDA", "load log"),
        ),
        ([], [CPU], True, (0, "CPU", "device registry")),  # no GPU in the registry
        ([], [CPU, CUDA], True, (None, "unknown", "none")),  # a GPU, but no word on the layers
        ([], [], False, (0, "CPU", "llama_supports_gpu_offload")),  # registry unreadable
        ([], [], True, (None, "unknown", "none")),  # never a guessed "CUDA"
    ],
)
def test_offload_account_reads_llama_cpps_own_lines(lines, devices, gpu_offload, expected) -> None:
    account = offload_account(lines, devices, gpu_offload)
    assert (account.layers, account.compute_backend, account.source) == expected


def test_unknown_backend_is_named_with_the_accepted_ones(models_dir: Path) -> None:
    with pytest.raises(UnknownNameError, match="accepted: llama_cpp, mock"):
        open_backend(llm_node(backend={"name": "vllm"}), models_dir)


def test_mock_backend_echoes_deterministically_and_says_it_is_a_mock(tmp_path: Path) -> None:
    backend = open_backend(llm_node(backend={"name": "mock"}), tmp_path / "no-models")
    assert isinstance(backend, MockBackend) and backend.name == "mock"
    assert not (tmp_path / "no-models").exists()  # no model is resolved for the mock
    result = backend.complete("one two three four", **{**SAMPLING, "max_tokens": 3})
    assert result["text"] == "one two three"
    assert (result["prompt_tokens"], result["completion_tokens"]) == (4, 3)
    assert result["finish_reason"] == "length"
    assert backend.complete("one two", **SAMPLING)["finish_reason"] == "stop"
    assert "".join(backend.stream("one two three four", **SAMPLING)) == "one two three four"
    assert "mock" in backend.describe()["model_description"]
    with pytest.raises(UserError):
        backend.complete("", **SAMPLING)
    backend.close()


def test_model_names_are_the_configured_models() -> None:
    names = model_names()
    assert "tiny" in names
    assert {
        "llama3_1_8b",
        "mistral_7b",
        "phi3_5_mini",
        "qwen2_5_coder_7b",
        "codellama_7b",
        "deepseek_coder_v2_lite",
    } <= set(names)

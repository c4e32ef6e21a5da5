"""Every supported quantization is produced from f32 in-process, atomically, and loads."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.models import available_quantizations, ensure_model_file, model_path
from ml_engine.llm.quantize import QUANTIZATIONS, check_quantization, quantize_gguf
from ml_engine.run.files import partial_path, remove_partials_of
from tests.llm.conftest import partial_files, tiny_model_cfg

_FTYPE_NAMES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_0": "MOSTLY_Q4_0",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q2_k": "MOSTLY_Q2_K",
}


def test_names_map_to_llama_cpp_file_types() -> None:
    assert list(QUANTIZATIONS) == list(_FTYPE_NAMES)
    for name, ftype in QUANTIZATIONS.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_{_FTYPE_NAMES[name]}") == ftype


def test_unknown_name_lists_the_supported_ones() -> None:
    with pytest.raises(UnknownNameError) as error:
        check_quantization("q9")
    message = str(error.value)
    assert "'q9'" in message
    assert all(name in message for name in QUANTIZATIONS)


@pytest.mark.parametrize("quantization", [q for q in QUANTIZATIONS if q != "f32"])
def test_each_quantization_is_produced_from_f32_and_loads(
    quantization: str, models_dir: Path, tiny_f32: Path
) -> None:
    resolved = ensure_model_file(tiny_model_cfg(), quantization, models_dir, n_threads=1)
    assert resolved.path == model_path(tiny_model_cfg(), quantization, models_dir)
    assert resolved.origin in ("quantized_from_f32", "on_disk")
    assert resolved.path.stat().st_size < tiny_f32.stat().st_size
    assert quantization in available_quantizations(tiny_model_cfg(), models_dir)
    with LlamaCppBackend(resolved.path, n_ctx=128, n_threads=1, ignore_eos=True) as backend:
        facts = backend.describe()
        assert llama_cpp.llama_model_ftype(backend._model) == QUANTIZATIONS[quantization]
        result = backend.complete("x", max_tokens=3, temperature=0, top_k=1, top_p=1.0)
    assert facts["n_params"] > 1_000_000
    assert result["completion_tokens"] == 3
    assert partial_files(models_dir) == []


def test_lower_bit_files_are_smaller(models_dir: Path) -> None:
    sizes = {
        q: ensure_model_file(tiny_model_cfg(), q, models_dir, n_threads=1).path.stat().st_size
        for q in ("f16", "q8_0", "q4_k_m", "q2_k")
    }
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"] > sizes["q2_k"]


def test_a_truncated_source_fails_in_one_line_without_leftovers(
    tmp_path: Path, tiny_f32: Path
) -> None:
    source = tmp_path / "cut.gguf"
    source.write_bytes(tiny_f32.read_bytes()[: tiny_f32.stat().st_size // 3])
    target = tmp_path / "out-q4_0.gguf"
    with pytest.raises(UserError) as error:
        quantize_gguf(source, target, "q4_0", n_threads=1)
    assert "\n" not in str(error.value) and str(source) in str(error.value)
    assert not target.exists()
    assert partial_files(tmp_path) == []


def test_partials_of_a_dead_process_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.gguf"
    target.parent.mkdir()
    mine, other = partial_path(target, 4242), partial_path(target, 4343)
    mine.write_bytes(b"half")
    other.write_bytes(b"half")
    assert remove_partials_of(tmp_path, 4242) == [mine]
    assert other.exists() and not mine.exists()

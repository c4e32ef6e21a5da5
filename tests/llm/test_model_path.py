"""Any GGUF in one flag: llm.model.path, on files written here with gguf_writer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from ml_engine.llm.generate import generate
from ml_engine.llm.gguf_writer import (
    LlamaShape,
    byte_fallback_vocabulary,
    random_llama_tensors,
    write_llama_gguf,
    write_random_llama,
)
from ml_engine.llm.models import file_model_node, read_gguf_facts
from ml_engine.llm.quantize import file_type_name, quantize_gguf
from tests.llm.conftest import generate_cli, last_line, partial_files

SHAPE = LlamaShape(n_vocab=512, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=4, n_ctx=512)
# a template llama.cpp recognises (ChatML, by its markers)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def char_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the LM exporter writes: an f32 llama GGUF through gguf_writer."""
    path = tmp_path_factory.mktemp("export") / "char-llama.gguf"
    return write_random_llama(path, SHAPE, seed=3, name="char llama")


@pytest.fixture(scope="module")
def char_llama_q8(char_llama: Path) -> Path:
    return quantize_gguf(char_llama, char_llama.with_name("char-llama-q8_0.gguf"), "q8_0", 1)


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def _assert_one_line_error(done, *fragments: str) -> str:
    assert done.returncode == 1, done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_metadata_gives_the_name_and_the_quantization(char_llama: Path, char_llama_q8: Path):
    facts = read_gguf_facts(char_llama)
    assert (facts.name, facts.quantization, facts.architecture) == ("char llama", "f32", "llama")
    assert facts.has_chat_template is False
    assert read_gguf_facts(char_llama_q8).quantization == "q8_0"
    assert file_type_name(1) == "f16" and file_type_name(15) == "q4_k_m"
    assert file_type_name(30) == "iq4_xs" and file_type_name(999) == "ftype_999"


def test_without_a_name_or_file_type_the_stem_and_the_tensors_say(tmp_path: Path) -> None:
    path = tmp_path / "exported-net.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((512, 256), np.float16))
    writer.add_tensor("output_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    node = file_model_node({"path": str(path), "chat_template": True, "ignore_eos": True})
    assert node["name"] == "exported-net" and node["default_quantization"] == "f16"
    assert node["source"] == "file" and node["chat_template"] is True


def test_one_flag_runs_the_file_itself(char_llama: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    done = generate_cli(f"llm.model.path={char_llama}", models_dir=models, outputs=tmp_path)
    assert done.returncode == 0, done.stderr
    assert last_line(done.stdout).startswith("run_dir: ")
    assert "char llama f32 ngl=0" in done.stdout
    result = _result(Path(last_line(done.stdout).removeprefix("run_dir: ")))
    assert result["model"] == "char llama" and result["quantization"] == "f32"
    assert result["model_path"] == str(char_llama) and result["model_origin"] == "given"
    assert result["metrics"]["requantized"] is False
    assert (
        result["quality"]["reference"] is True and result["quality"]["base_quantization"] == "f32"
    )
    # nothing but the base's cached predictions was written beside the other models
    assert [p.name for p in models.iterdir()] == [".quality"]


def test_other_quantizations_are_made_from_it_and_cached(
    char_llama: Path, gen_cfg, tmp_path: Path
) -> None:
    overrides = [f"llm.model.path={char_llama}", "llm.quantization=q4_k_m", "worker.isolate=false"]
    cfg = gen_cfg(overrides)
    metrics = generate(cfg)
    result = _result(Path(cfg.paths.output_dir))
    derived = Path(result["model_path"])
    assert derived.parent == Path(cfg.paths.models_dir) and derived.name.endswith("-q4_k_m.gguf")
    assert derived.name.startswith("char-llama-")
    assert read_gguf_facts(derived).quantization == "q4_k_m"
    assert result["model_origin"] == "quantized_from_f32"
    assert metrics["model"] == "char llama" and metrics["quantization"] == "q4_k_m"
    assert metrics["requantized"] is False and metrics["quality/reference"] is False
    assert metrics["quality/kl_mean"] > 0 and metrics["quality/base_quantization"] == "f32"
    assert result["quality"]["base_file"] == str(char_llama)

    again = gen_cfg(overrides)
    generate(again)
    assert _result(Path(again.paths.output_dir))["model_origin"] == "on_disk"
    assert partial_files(Path(cfg.paths.models_dir)) == []


def test_a_quantized_file_is_requantized_only_when_allowed(
    char_llama_q8: Path, gen_cfg, tmp_path: Path
) -> None:
    done = generate_cli(
        f"llm.model.path={char_llama_q8}",
        "llm.quantization=q4_k_m",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "out",
    )
    _assert_one_line_error(
        done, str(char_llama_q8), "already quantized (q8_0)", "llm.allow_requantize=true"
    )
    assert not list(tmp_path.rglob("*.gguf"))

    cfg = gen_cfg(
        [
            f"llm.model.path={char_llama_q8}",
            "llm.quantization=q4_k_m",
            "llm.allow_requantize=true",
            "worker.isolate=false",
        ]
    )
    metrics = generate(cfg)
    result = _result(Path(cfg.paths.output_dir))
    assert metrics["requantized"] is True and result["requantized"] is True
    assert result["model_origin"] == "requantized_from_q8_0"
    assert any("requantized" in note for note in result["notes"])
    # compared with the file it was made from, the most precise one there is
    assert metrics["quality/base_quantization"] == "q8_0" and metrics["quality/kl_mean"] > 0


def test_a_quantization_cannot_add_precision(char_llama: Path, tmp_path: Path) -> None:
    f16 = write_random_llama(tmp_path / "half.gguf", SHAPE, seed=3, file_type="f16")
    done = generate_cli(
        f"llm.model.path={f16}",
        "llm.quantization=f32",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "out",
    )
    _assert_one_line_error(done, "llm.quantization=f32", f"{f16} (f16)", "cannot restore")


def _unknown_architecture(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "mamba9")
    writer.add_name("future net")
    writer.add_file_type(0)
    writer.add_tensor("token_embd.weight", np.zeros((512, 256), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, fragments",
    [
        ("garbage", ("(not a GGUF file)", "invalid magic characters")),
        ("truncated", ("(corrupt or truncated GGUF)", "not within the file bounds")),
        ("architecture", ("does not know", "unknown model architecture: 'mamba9'")),
        ("missing", ("llm.model.path=", "no such file")),
    ],
)
def test_a_file_llama_cpp_cannot_use_is_one_line(
    damage: str, fragments: tuple[str, ...], char_llama: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"{damage}.gguf"
    if damage == "garbage":
        path.write_bytes(b"not a gguf at all" * 100)
    elif damage == "truncated":
        data = char_llama.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "architecture":
        _unknown_architecture(path)
    for quantization in ([], ["llm.quantization=q8_0"]):  # run as is, or quantize from it
        done = generate_cli(
            f"llm.model.path={path}",
            *quantization,
            models_dir=tmp_path / "models",
            outputs=tmp_path / "out",
        )
        line = _assert_one_line_error(done, *fragments)
        if damage != "missing":
            assert f"llama.cpp could not load {path}" in line
    assert not list(tmp_path.rglob("result.json")) and partial_files(tmp_path) == []
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").glob("*.gguf"))


def test_a_chat_template_is_only_claimed_when_applied(gen_cfg, tmp_path: Path) -> None:
    vocab = byte_fallback_vocabulary(SHAPE.n_vocab)
    plain = write_random_llama(tmp_path / "plain.gguf", SHAPE, seed=3)
    chat = write_llama_gguf(
        tmp_path / "chat.gguf",
        SHAPE,
        vocab,
        random_llama_tensors(SHAPE, seed=3),
        name="chat",
        chat_template=CHATML,
    )
    seen = {}
    for path in (plain, chat):
        cfg = gen_cfg(
            [
                f"llm.model.path={path}",
                "llm.model.chat_template=true",
                "worker.isolate=false",
                "prompt=Hi",
            ]
        )
        metrics = generate(cfg)
        seen[path.stem] = (metrics, _result(Path(cfg.paths.output_dir)))
    metrics, result = seen["plain"]
    assert metrics["chat_template"] == "none in the file" and result["chat_template_used"] is False
    assert any("no template was applied" in note for note in result["notes"])
    metrics, result = seen["chat"]
    assert metrics["chat_template"] == "applied" and result["chat_template_used"] is True
    assert "notes" not in result
    # the template's markers are part of the prompt llama.cpp evaluated
    plain_tokens = seen["plain"][1]["bench"]["prompts"][0]["repetitions"][0]["prompt_tokens"]
    assert result["bench"]["prompts"][0]["repetitions"][0]["prompt_tokens"] > plain_tokens + 10

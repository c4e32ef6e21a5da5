"""Quantizing with an importance matrix and per-tensor types, in process, makes llama.cpp's bytes:
the same file as the real ``llama-quantize`` (built against the installed wheel), tensor for
tensor; the matrix reaches ggml's ``ggml_quantize_chunk``; bad input is one line."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend
from ml_engine.llm.gguf_writer import LlamaShape, write_random_llama
from ml_engine.llm.imatrix import (
    KEY_QUANTIZE_CHUNKS,
    KEY_QUANTIZE_DATASET,
    KEY_QUANTIZE_ENTRIES,
    KEY_QUANTIZE_FILE,
    ImportanceMatrix,
    model_columns,
    read_imatrix,
    write_imatrix,
)
from ml_engine.llm.quantize import (
    TENSOR_TYPES,
    bits_per_weight,
    check_tensor_types,
    quantize_gguf,
    tensor_types_of,
)
from tests.llm.conftest import partial_files
from tests.llm.llama_tools import llama_tools  # noqa: F401  (session fixture)

# widths are multiples of 256 so K-quants apply to every matrix; GQA so attn_v is narrower
SHAPE = LlamaShape(n_vocab=512, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=2, n_ctx=256)
OVERRIDES = {"output.weight": "q8_0", "attn_v": "q6_k"}
QUANTS = ("q4_0", "q4_k_m", "q2_k")
THREADS = 2


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize-imatrix")


@pytest.fixture(scope="module")
def source(work: Path) -> Path:
    return write_random_llama(work / "tiny-f32.gguf", SHAPE, seed=3, name="tiny")


@pytest.fixture(scope="module")
def matrix_file(work: Path, source: Path) -> Path:
    """Skewed activations (a few loud columns, as in real models) for every blk.* matrix."""
    rng = np.random.default_rng(0)
    matrix = ImportanceMatrix(datasets=["random.txt"], chunk_count=3, chunk_size=64)
    for name, columns in model_columns(source).items():
        if name.startswith("blk."):
            scale = rng.gamma(0.5, size=columns)
            matrix.add(name, rng.standard_normal((192, columns)) * scale)
    return write_imatrix(work / "imatrix.gguf", matrix)


def _tensors(path: Path) -> list[tuple[str, int, tuple[int, ...], bytes]]:
    reader = gguf.GGUFReader(str(path))
    return [
        (t.name, int(t.tensor_type), tuple(int(n) for n in t.shape), t.data.tobytes())
        for t in reader.tensors
    ]


def _tensor_bytes(path: Path, name: str) -> bytes:
    return next(data for tensor, _, _, data in _tensors(path) if tensor == name)


def _fields(path: Path, prefix: str) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


def _llama_quantize(tools: Path, args: list[str], source: Path, out: Path, quant: str) -> str:
    done = subprocess.run(
        [str(tools / "llama-quantize"), *args, str(source), str(out), quant.upper(), str(THREADS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("mode", ["plain", "imatrix", "tensor_types"])
@pytest.mark.parametrize("quantization", QUANTS)
def test_same_bytes_as_llama_quantize(
    quantization: str,
    mode: str,
    work: Path,
    source: Path,
    matrix_file: Path,
    llama_tools: Path,  # noqa: F811
) -> None:
    ours, theirs = (
        work / f"ours-{quantization}-{mode}.gguf",
        work / f"ref-{quantization}-{mode}.gguf",
    )
    kwargs: dict = {}
    args: list[str] = []
    if mode == "imatrix":
        kwargs = {"imatrix": read_imatrix(matrix_file), "imatrix_label": str(matrix_file)}
        args = ["--imatrix", str(matrix_file)]
    elif mode == "tensor_types":
        kwargs = {"tensor_types": OVERRIDES}
        for pattern, type_name in OVERRIDES.items():
            args += ["--tensor-type", f"{pattern}={type_name}"]
    log = _llama_quantize(llama_tools, args, source, theirs, quantization)
    quantize_gguf(source, ours, quantization, THREADS, **kwargs)

    expected, got = _tensors(theirs), _tensors(ours)
    assert [t[:3] for t in got] == [t[:3] for t in expected]  # names, types, shapes
    for mine, reference in zip(got, expected, strict=True):
        assert mine[3] == reference[3], f"{mine[0]} differs from llama-quantize's"
    assert _fields(ours, "general.file_type") == _fields(theirs, "general.file_type")
    assert _fields(ours, "quantize.") == _fields(theirs, "quantize.")
    # bits per weight as llama.cpp prints it for the file it wrote
    printed = re.search(r"quant size\s*=\s*[\d.]+ MiB \(([\d.]+) BPW\)", log)
    assert printed and f"{bits_per_weight(ours):.2f}" == printed.group(1)
    types = tensor_types_of(ours)
    if mode == "imatrix":
        assert _fields(ours, "quantize.") == {
            KEY_QUANTIZE_FILE: str(matrix_file),
            KEY_QUANTIZE_DATASET: "random.txt",
            KEY_QUANTIZE_ENTRIES: 7 * SHAPE.n_layer,
            KEY_QUANTIZE_CHUNKS: 3,
        }
    elif mode == "tensor_types":
        assert types["output.weight"] == "q8_0"
        # a pattern is searched in the name as a regex: "output.weight" also selects attn_output
        assert types["blk.0.attn_output.weight"] == "q8_0"
        assert all(types[f"blk.{i}.attn_v.weight"] == "q6_k" for i in range(SHAPE.n_layer))
    else:
        assert _fields(ours, "quantize.") == {}


def _ggml_base() -> ctypes.CDLL:
    """libggml-base from the installed wheel (the library llama.cpp quantizes with)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    # ggml.h: size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
    #     int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_float),
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    return lib


def _kernel(lib: ctypes.CDLL, ggml_type: int, rows: np.ndarray, means: np.ndarray | None) -> bytes:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    out = ctypes.create_string_buffer(n_rows * lib.ggml_row_size(ggml_type, n_per_row))
    weights = None
    if means is not None:
        means = np.ascontiguousarray(means, dtype=np.float32)
        weights = means.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = lib.ggml_quantize_chunk(
        ggml_type,
        rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
        out,
        0,
        n_rows,
        n_per_row,
        weights,
    )
    assert written == len(out.raw)
    return out.raw


def test_type_names_are_ggml_type_names() -> None:
    lib = _ggml_base()
    for name, ggml_type in TENSOR_TYPES.items():
        assert lib.ggml_type_name(ggml_type).decode().lower() == name
    assert check_tensor_types({"^output\\.weight$": "Q8_0", "attn_v": "q6_k"}) == {
        "^output\\.weight$": TENSOR_TYPES["q8_0"],
        "attn_v": TENSOR_TYPES["q6_k"],
    }


@pytest.mark.parametrize("quantization", ["q4_0", "q4_k_m"])
def test_the_matrix_reaches_ggml_quantize_chunk(
    quantization: str, work: Path, source: Path, matrix_file: Path
) -> None:
    """ggml's kernel, called directly on one weight's f32 rows with the matrix's means for it,
    gives exactly the bytes quantize_gguf wrote; without the means, those of a plain run."""
    name = "blk.0.ffn_down.weight"
    matrix = read_imatrix(matrix_file)
    with_matrix = quantize_gguf(
        source, work / f"kernel-{quantization}-im.gguf", quantization, THREADS, imatrix=matrix
    )
    without = quantize_gguf(source, work / f"kernel-{quantization}.gguf", quantization, THREADS)
    type_name = tensor_types_of(with_matrix)[name]
    assert type_name == {"q4_0": "q4_0", "q4_k_m": "q4_k"}[quantization]
    ggml_type = TENSOR_TYPES[type_name]
    lib = _ggml_base()
    assert not lib.ggml_quantize_requires_imatrix(ggml_type)
    rows = next(t.data for t in gguf.GGUFReader(str(source)).tensors if t.name == name)
    assert rows.dtype == np.float32 and rows.shape == (SHAPE.n_embd, SHAPE.n_ff)

    weighted = _kernel(lib, ggml_type, rows, matrix.entries[name].means())
    plain = _kernel(lib, ggml_type, rows, None)
    assert weighted == _tensor_bytes(with_matrix, name)
    assert plain == _tensor_bytes(without, name)
    assert weighted != plain  # the matrix changed the rounding


def test_a_file_made_with_a_matrix_loads_and_generates(
    work: Path, source: Path, matrix_file: Path
) -> None:
    target = quantize_gguf(
        source,
        work / "gen-q4_k_m.gguf",
        "q4_k_m",
        THREADS,
        imatrix=read_imatrix(matrix_file),
        imatrix_label="imatrix.gguf",
        tensor_types={"^output\\.weight$": "q6_k", "attn_v": "q5_k"},
    )
    types = tensor_types_of(target)
    assert types["output.weight"] == "q6_k" and types["blk.0.attn_output.weight"] != "q6_k"
    assert types["blk.1.attn_v.weight"] == "q5_k"
    assert 4.0 < bits_per_weight(target) < 8.0
    with LlamaCppBackend(target, n_ctx=128, n_threads=1, ignore_eos=True) as backend:
        result = backend.complete("x", max_tokens=4, temperature=0, top_k=1, top_p=1.0)
    assert result["completion_tokens"] == 4


def test_tensor_types_and_bits_of_the_source(source: Path) -> None:
    types = tensor_types_of(source)
    assert len(types) == 2 + 1 + 9 * SHAPE.n_layer and set(types.values()) == {"f32"}
    assert bits_per_weight(source) == 32.0


def _refused(work: Path, source: Path, quantization: str = "q4_k_m", **kwargs) -> str:
    target = work / "refused.gguf"
    with pytest.raises(UserError) as error:
        quantize_gguf(source, target, quantization, THREADS, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    assert not target.exists() and partial_files(work) == []
    return message


def test_an_unknown_tensor_type_is_one_line(work: Path, source: Path) -> None:
    message = _refused(work, source, tensor_types={"output.weight": "q7_k"})
    assert message.startswith("unknown tensor type 'q7_k' for pattern 'output.weight'; accepted: ")
    assert "q6_k" in message and "iq4_xs" in message and "q8_k" not in message


def test_a_pattern_matching_nothing_is_one_line(work: Path, source: Path) -> None:
    message = _refused(work, source, tensor_types={"attn_vv": "q8_0"})
    assert message.startswith("tensor pattern 'attn_vv' matches no weight matrix of tiny-f32.gguf")
    assert "blk.N.attn_v.weight" in message


def test_a_bad_regex_is_one_line(work: Path, source: Path) -> None:
    message = _refused(work, source, tensor_types={"attn_v[": "q8_0"})
    assert message.startswith("tensor pattern 'attn_v[' is not a regular expression")


def test_a_regex_llama_cpp_cannot_compile_is_one_line(work: Path, source: Path) -> None:
    """Python accepts a lookbehind, C++'s std::regex (ECMAScript) does not: llama.cpp's reason."""
    message = _refused(work, source, tensor_types={"(?<=blk\\.0\\.)attn_v": "q8_0"})
    assert message.startswith(f"could not produce q4_k_m from {source}: llama.cpp's quantizer")
    assert "regular expression" in message


def test_a_matrix_for_another_model_is_one_line(work: Path, source: Path) -> None:
    other = ImportanceMatrix(datasets=["x"], chunk_count=1, chunk_size=8)
    other.add("blk.0.attn_q.weight", np.ones((8, 128)))
    message = _refused(work, source, imatrix=other, imatrix_label="other.gguf")
    assert message == (
        "importance matrix other.gguf was made for another model: blk.0.attn_q.weight has "
        "128 columns in it, 256 in this model"
    )


def test_an_unknown_quantization_is_one_line(work: Path, source: Path) -> None:
    with pytest.raises(UnknownNameError) as error:
        quantize_gguf(source, work / "q7.gguf", "q7_k", tensor_types=OVERRIDES)
    assert str(error.value).startswith("unknown quantization 'q7_k'; accepted: ")


def test_tensor_types_for_a_float_target_are_one_line(work: Path, source: Path) -> None:
    message = _refused(work, source, "f16", tensor_types=OVERRIDES)
    assert message == "tensor types apply to quantized targets only; llama.cpp ignores them for f16"

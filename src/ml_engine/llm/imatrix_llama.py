"""What ``llama-imatrix`` collects, from llama.cpp's own forward pass, for any GGUF model.

llama.cpp's graph scheduler calls an eval callback for every node it computes
(``llama_context_params.cb_eval``): first asking whether the node is wanted (``ask``), then, for
a wanted one, once its inputs are computed. ``collect_importance_llama`` installs such a callback
through llama-cpp-python's low-level API and mirrors ``IMatrixCollector::collect_imatrix``
(``tools/imatrix/imatrix.cpp``): it asks for every dense matrix multiplication (``MUL_MAT``)
whose weight is a block's (``blk.…``; ``output.weight`` too with ``process_output``) and whose
activations (``src1``) are float32 with at least 16 rows, and sums the squares of those
activations per input column. The text is tokenized as the tool does (the model's BOS added if
its vocabulary asks for one, no special tokens parsed) and cut into chunks of ``n_ctx`` tokens,
each decoded from an empty KV cache with the chunk's first token replaced by BOS when the model
adds one, every position an output (so that the last layer runs on all of them, as in the tool).

What differs from the tool, on purpose: one sequence per decode (the tool packs several short
chunks into one batch; the sums are the same up to float rounding), sums in float64 (the tool's
are float32), at least one whole chunk of text (the tool asks for two), and no perplexity.
Mixture-of-experts models (``MUL_MAT_ID``, merged expert tensors) are refused in one line: their
per-expert counts are left out here.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

from ml_engine.errors import UserError
from ml_engine.llm.imatrix import ImportanceMatrix
from ml_engine.llm.llama_log import (
    capture_llama_logs,
    last_llama_error,
    llama_load_reason,
    load_failure,
    load_report,
)
from ml_engine.llm.threads import physical_core_count

# ggml.h of the llama.cpp llama-cpp-python 0.3.36 vendors
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
# imatrix.cpp: "why are small batches ignored (<16 tokens)?"
MIN_ROWS = 16
# ggml_tensor_overhead() = sizeof(struct ggml_object) + sizeof(struct ggml_tensor)
GGML_OBJECT_SIZE = 32


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml/include/ggml.h); checked against the library's own size."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _Ggml:
    """The few functions of libggml-base the collector calls, and the op codes it compares with
    (found by name at runtime: the enum's numbering changes between versions)."""

    def __init__(self) -> None:
        import llama_cpp

        folder = Path(llama_cpp.__file__).parent / "lib"
        names = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
        lib = ctypes.CDLL(str(folder / names.get(sys.platform, "libggml-base.so")))
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
        ]
        self.lib = lib
        expected = lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE
        if expected != ctypes.sizeof(GgmlTensor):
            raise RuntimeError(
                f"struct ggml_tensor is {expected} bytes in this ggml, {ctypes.sizeof(GgmlTensor)} "
                f"in imatrix_llama.py: llama-cpp-python {llama_cpp.__version__} is not the "
                "version its layout was copied from"
            )
        ops: dict[str, int] = {}
        # MUL_MAT and MUL_MAT_ID sit early in the enum and next to each other: stop there
        # rather than read past its end
        for op in range(256):
            ops[lib.ggml_op_name(op).decode()] = op
            if "MUL_MAT" in ops and "MUL_MAT_ID" in ops:
                break
        else:
            raise RuntimeError("ggml names no MUL_MAT / MUL_MAT_ID op")
        self.mul_mat, self.mul_mat_id = ops["MUL_MAT"], ops["MUL_MAT_ID"]


def filter_tensor_name(name: str) -> str:
    """imatrix.cpp's ``filter_tensor_name``: ``CUDA0#blk.0.attn_k.weight#0`` →
    ``blk.0.attn_k.weight``."""
    if "#" not in name:
        return name
    return name.split("#", 2)[1]


class _Collector:
    """The eval callback's state: the matrix being summed and what went wrong inside it (an
    exception cannot cross back through C; it is raised after the decode)."""

    def __init__(self, ggml: _Ggml, process_output: bool) -> None:
        self.ggml, self.process_output = ggml, process_output
        self.matrix = ImportanceMatrix()
        self.error: BaseException | None = None
        self.mixture_of_experts: str | None = None

    def wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def __call__(self, pointer: int, ask: bool, user_data: int) -> bool:
        try:
            return self._call(pointer, ask)
        except BaseException as exc:  # kept, raised after the decode
            if self.error is None:
                self.error = exc
            return not ask

    def _call(self, pointer: int, ask: bool) -> bool:
        t = GgmlTensor.from_address(pointer)
        if t.op == self.ggml.mul_mat_id:
            if ask and t.src[0]:
                name = filter_tensor_name(GgmlTensor.from_address(t.src[0]).name.decode())
                self.mixture_of_experts = self.mixture_of_experts or name
            return False
        if t.op != self.ggml.mul_mat or not t.src[0] or not t.src[1]:
            return False
        src0 = GgmlTensor.from_address(t.src[0])
        src1 = GgmlTensor.from_address(t.src[1])
        name = filter_tensor_name(src0.name.decode("utf-8", errors="replace"))
        if ask:
            return src1.ne[1] >= MIN_ROWS and src1.type == GGML_TYPE_F32 and self.wanted(name)
        self._add(name, src0, src1, t.src[1])
        return True

    def _add(self, name: str, src0: GgmlTensor, src1: GgmlTensor, src1_pointer: int) -> None:
        lib = self.ggml.lib
        nbytes = lib.ggml_nbytes(src1_pointer)
        if lib.ggml_backend_buffer_is_host(src1.buffer):
            buffer = (ctypes.c_char * nbytes).from_address(src1.data)
        else:  # in GPU memory: copied to the host first, as the tool does
            buffer = ctypes.create_string_buffer(nbytes)
            lib.ggml_backend_tensor_get(src1_pointer, buffer, 0, nbytes)
        ne, nb = list(src1.ne), list(src1.nb)
        activations = np.lib.stride_tricks.as_strided(
            np.frombuffer(buffer, dtype=np.float32, count=nbytes // 4),
            shape=(ne[3], ne[2], ne[1], ne[0]),
            strides=(nb[3], nb[2], nb[1], nb[0]),
            writeable=False,
        ).astype(np.float64)
        # a 2-D weight takes every row; a 3-D+ one (n_mat matrices) the rows of its own slice,
        # src1's higher dimensions broadcast over src0's as collect_imatrix does
        n2, n3 = int(src0.ne[2]), int(src0.ne[3])
        squares = np.zeros((n2 * n3, ne[0]))
        for i3 in range(ne[3]):
            for i2 in range(ne[2]):
                rows = activations[i3, i2]
                squares[(i3 % n3) * n2 + (i2 % n2)] += np.einsum("ij,ij->j", rows, rows)
        if not np.isfinite(squares).all():
            raise UserError(f"non-finite activations reached {name}: the model computes NaN/inf")
        self.matrix.add_squares(name, squares, ne[1] * ne[2] * ne[3] // (n2 * n3))


def collect_importance_llama(
    gguf_path: Path,
    text: str,
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    n_threads: int | None = None,
    process_output: bool = False,
    dataset: str = "",
) -> ImportanceMatrix:
    """The importance matrix of the model in ``gguf_path`` over ``text``, computed by llama.cpp's
    forward pass as ``llama-imatrix -m <gguf> -f <text> -c <n_ctx> [--chunks n_chunks]
    [--process-output]`` does (module docstring: what is mirrored and what differs).

    ``n_chunks``: at most that many chunks of ``n_ctx`` tokens from the start of the text (None:
    every whole chunk). ``dataset``: the name recorded in the matrix (the tool records the text
    file's path). A file that is missing or that llama.cpp cannot load, a text shorter than one
    chunk and a mixture-of-experts model are one line each (UserError). Works on a model of any
    type; the matrix means most for an f32/f16/bf16 one, whose activations are not yet
    perturbed by quantization.
    """
    import llama_cpp

    path = Path(gguf_path)
    if not path.is_file():
        raise UserError(f"model {path}: no such file")
    if n_ctx < MIN_ROWS:
        raise UserError(
            f"n_ctx={n_ctx}: llama-imatrix skips chunks of fewer than {MIN_ROWS} tokens"
        )
    if n_chunks is not None and n_chunks < 1:
        raise UserError(f"n_chunks={n_chunks}: give at least 1 (or None for every chunk)")
    ggml = _Ggml()
    capture_llama_logs()
    with load_report():
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise UserError(load_failure(path, llama_load_reason()))
    collector = _Collector(ggml, process_output)
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector)
    context = batch = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        tokens = _tokenize(llama_cpp, vocab, text)
        available = len(tokens) // n_ctx
        if available < 1:
            raise UserError(
                f"the calibration text has {len(tokens):,} tokens, fewer than one chunk of "
                f"n_ctx={n_ctx}; give more text or a smaller n_ctx"
            )
        chunks = available if n_chunks is None else min(n_chunks, available)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = min(n_ctx, 512)  # the tool's default micro-batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads or physical_core_count()
        params.cb_eval = callback
        params.cb_eval_user_data = None
        context = llama_cpp.llama_init_from_model(model, params)
        if not context:
            raise UserError(
                f"llama.cpp could not make a context of {n_ctx} tokens for {path}: "
                f"{last_llama_error() or 'no reason logged'}"
            )
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        memory = llama_cpp.llama_get_memory(context)
        for chunk in range(chunks):
            ids = tokens[chunk * n_ctx : (chunk + 1) * n_ctx]
            if add_bos:
                ids[0] = bos
            llama_cpp.llama_memory_clear(memory, True)
            _fill(batch, ids)
            status = llama_cpp.llama_decode(context, batch)
            if collector.error is not None:
                raise collector.error
            if collector.mixture_of_experts:
                raise UserError(
                    f"{path} is a mixture-of-experts model ({collector.mixture_of_experts} is "
                    "multiplied per expert): collect its importance matrix with llama-imatrix"
                )
            if status != 0:
                raise UserError(
                    f"llama.cpp could not decode chunk {chunk + 1} of {path} (status {status}): "
                    f"{last_llama_error() or 'no reason logged'}"
                )
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if context:
            llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)
    matrix = collector.matrix
    if not matrix.entries:
        raise UserError(
            f"llama.cpp multiplied no blk.* weight of {path} by {MIN_ROWS}+ float32 activation "
            "rows: nothing to collect"
        )
    matrix.datasets = [dataset] if dataset else []
    matrix.chunk_count, matrix.chunk_size = chunks, n_ctx
    return matrix


def _tokenize(llama_cpp, vocab, text: str) -> list[int]:
    """``text`` as the tool tokenizes it: the model's BOS/EOS rules applied, no special tokens
    parsed."""
    data = text.encode("utf-8")
    capacity = len(data) + 16
    buffer = (llama_cpp.llama_token * capacity)()
    count = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, capacity, True, False)
    if count < 0:  # more tokens than bytes (not for any tokenizer llama.cpp has): try again
        capacity = -count
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, capacity, True, False)
    return list(buffer[:count])


def _fill(batch, ids: list[int]) -> None:
    """One sequence from position 0, every position an output."""
    for position, token in enumerate(ids):
        batch.token[position] = token
        batch.pos[position] = position
        batch.n_seq_id[position] = 1
        batch.seq_id[position][0] = 0
        batch.logits[position] = True
    batch.n_tokens = len(ids)

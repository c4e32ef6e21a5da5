"""Write llama-architecture GGUF files with the ``gguf`` package.

General on purpose: the embedded tiny model is random weights written through it, and a trained
network can be exported through the same ``write_llama_gguf`` once its tensors are in
llama.cpp's layout (see ``expected_tensor_shapes``).
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ml_engine.run.files import atomic_path

# K-quants pack rows in super-blocks of 256 values; narrower rows fall back to other types.
QK_K = 256

# SentencePiece token types as llama.cpp reads them (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_SPACE = "\u2581"  # SentencePiece's word-boundary mark


@dataclass(frozen=True)
class LlamaShape:
    """Hyperparameters of a llama-architecture network (GQA when ``n_head_kv < n_head``)."""

    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        elif (self.n_embd // self.n_head) % 2:
            problems.append("the head width n_embd/n_head must be even (rotary embeddings)")
        if self.n_head % self.n_head_kv:
            problems.append(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        if self.n_vocab < _min_vocab():
            problems.append(f"n_vocab={self.n_vocab} is below {_min_vocab()} (bytes + specials)")
        if min(self.n_embd, self.n_ff, self.n_layer, self.n_ctx) < 1:
            problems.append("n_embd, n_ff, n_layer and n_ctx must be ≥ 1")
        if problems:
            raise ValueError("invalid llama shape: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_width(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def k_quant_ready(self) -> bool:
        """Every matrix row is a whole number of K-quant super-blocks."""
        return self.n_embd % QK_K == 0 and self.n_ff % QK_K == 0

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(shape)) for shape in expected_tensor_shapes(self).values())

    def tag(self) -> str:
        """Short, readable identity used in file names so differently sized files never collide."""
        return (
            f"v{self.n_vocab}-e{self.n_embd}-f{self.n_ff}-l{self.n_layer}"
            f"-h{self.n_head}x{self.n_head_kv}-c{self.n_ctx}"
        )


@dataclass(frozen=True)
class Vocabulary:
    """A SentencePiece ("llama") vocabulary: pieces, merge scores, token types, special ids."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


@dataclass(frozen=True)
class TokenizerOptions:
    """How llama.cpp applies the vocabulary to a text.

    ``add_bos``: a text starts with BOS (``tokenizer.ggml.add_bos_token``). ``add_space_prefix``:
    SentencePiece's habit of prepending ``▁`` to a text (llama.cpp's default when the key is
    absent); a vocabulary that must reproduce another tokenizer exactly sets it false. ``pre``:
    ``tokenizer.ggml.pre``, a pre-tokenizer name llama.cpp knows (``default``), or none.
    """

    add_bos: bool = True
    add_space_prefix: bool = True
    pre: str | None = None


def _min_vocab() -> int:
    return 3 + 256


def byte_fallback_vocabulary(n_vocab: int) -> Vocabulary:
    """``<unk> <s> </s>``, the 256 byte tokens, then characters and short pieces up to ``n_vocab``.

    Any text tokenizes: what no piece covers falls back to its UTF-8 bytes (Korean included).
    """
    if n_vocab < _min_vocab():
        raise ValueError(f"n_vocab must be ≥ {_min_vocab()} for a byte-fallback vocabulary")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    scores = [0.0] * len(tokens)
    for piece in _normal_pieces():
        if len(tokens) == n_vocab:
            break
        tokens.append(piece)
        types.append(_NORMAL)
        # SentencePiece merges the highest-scoring pair first: earlier pieces win.
        scores.append(-float(len(scores)))
    if len(tokens) < n_vocab:
        raise ValueError(f"n_vocab={n_vocab} is larger than this vocabulary generator supports")
    return Vocabulary(tokens, scores, types)


def _normal_pieces() -> Iterator[str]:
    """Unique pieces in a fixed order: characters, word starts, letter pairs, triples, quads."""
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    seen: set[str] = set()
    letters = string.ascii_lowercase

    def candidates() -> Iterator[str]:
        yield _SPACE
        yield from chars
        yield from (_SPACE + c for c in chars)
        yield from (a + b for a in letters for b in letters)
        yield from (_SPACE + a + b for a in letters for b in letters)
        yield from (a + b + c for a in letters for b in letters for c in letters)
        yield from (_SPACE + a + b + c for a in letters for b in letters for c in letters)
        # four-letter pieces: enough for vocabularies as large as Gemma's 262,144
        yield from ("".join(p) for p in itertools.product(letters, repeat=4))

    for piece in candidates():
        if piece not in seen:
            seen.add(piece)
            yield piece


def expected_tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensor names with numpy shapes ``(out_features, in_features)``.

    Q and K rows must already be in llama.cpp's rotary layout (what ``convert_hf_to_gguf``
    produces by permuting Hugging Face weights).
    """
    e, f, kv = shape.n_embd, shape.n_ff, shape.kv_width
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (shape.n_vocab, e)}
    for i in range(shape.n_layer):
        block = f"blk.{i}"
        shapes.update(
            {
                f"{block}.attn_norm.weight": (e,),
                f"{block}.attn_q.weight": (e, e),
                f"{block}.attn_k.weight": (kv, e),
                f"{block}.attn_v.weight": (kv, e),
                f"{block}.attn_output.weight": (e, e),
                f"{block}.ffn_norm.weight": (e,),
                f"{block}.ffn_gate.weight": (f, e),
                f"{block}.ffn_up.weight": (f, e),
                f"{block}.ffn_down.weight": (e, f),
            }
        )
    shapes["output_norm.weight"] = (e,)
    shapes["output.weight"] = (shape.n_vocab, e)
    return shapes


def random_llama_tensors(
    shape: LlamaShape, seed: int = 0, std: float = 0.02
) -> Iterator[tuple[str, np.ndarray]]:
    """Random weights (norms at 1) in file order, made one at a time to bound peak memory."""
    rng = np.random.default_rng(seed)
    for name, dims in expected_tensor_shapes(shape).items():
        if len(dims) == 1:
            yield name, np.ones(dims, dtype=np.float32)
        else:
            yield name, (rng.standard_normal(dims, dtype=np.float32) * np.float32(std))


_FILE_TYPES = {"f32": (0, np.float32), "f16": (1, np.float16)}
# held-out text an exporter writes beside its GGUF, for quality figures on text the model never
# trained on (generate.py reads it by itself)
HELD_OUT_SUFFIX = ".val.txt"


def held_out_text_path(gguf_path: Path) -> Path:
    """``<dir>/<stem>.val.txt`` for ``<dir>/<stem>.gguf``."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + HELD_OUT_SUFFIX)


def write_llama_gguf(
    path: Path,
    shape: LlamaShape,
    vocab: Vocabulary,
    tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    *,
    name: str,
    file_type: str = "f32",
    chat_template: str | None = None,
    tokenizer: TokenizerOptions | None = None,
    metadata: Mapping[str, str | float] | None = None,
) -> Path:
    """Write a llama GGUF atomically (temp file + rename): readers never see half a file.

    ``file_type`` is ``f32`` or ``f16`` for the matrices; norm vectors stay f32 as llama.cpp
    expects. Lower precisions are produced from this file by ``quantize.quantize_gguf``.
    ``tokenizer`` sets how llama.cpp applies the vocabulary (default: SentencePiece's habits).
    ``metadata``: further keys, strings or float64 numbers (e.g. how a packaged model was
    trained), written after the standard ones.
    """
    import gguf

    if file_type not in _FILE_TYPES:
        raise ValueError(f"file_type must be one of {', '.join(_FILE_TYPES)}")
    if len(vocab.tokens) != shape.n_vocab:
        raise ValueError(f"vocabulary has {len(vocab.tokens)} tokens, shape says {shape.n_vocab}")
    ftype, matrix_dtype = _FILE_TYPES[file_type]
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    expected = expected_tensor_shapes(shape)

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _add_metadata(
            writer,
            shape,
            vocab,
            name=name,
            ftype=ftype,
            chat_template=chat_template,
            tokenizer=tokenizer or TokenizerOptions(),
        )
        for key, value in (metadata or {}).items():
            if isinstance(value, str):
                writer.add_string(key, value)
            else:
                writer.add_float64(key, float(value))
        seen = set()
        for tensor_name, array in items:
            if tensor_name not in expected:
                raise ValueError(f"unexpected tensor {tensor_name!r} for a llama network")
            if tuple(array.shape) != expected[tensor_name]:
                raise ValueError(
                    f"tensor {tensor_name} has shape {tuple(array.shape)}, "
                    f"expected {expected[tensor_name]}"
                )
            dtype = np.float32 if array.ndim == 1 else matrix_dtype
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=dtype))
            seen.add(tensor_name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise ValueError(f"missing tensors: {', '.join(missing[:5])}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_metadata(
    writer,
    shape: LlamaShape,
    vocab: Vocabulary,
    *,
    name: str,
    ftype: int,
    chat_template: str | None,
    tokenizer: TokenizerOptions,
) -> None:
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_tokenizer_model("llama")
    if tokenizer.pre is not None:
        writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(tokenizer.add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)


def write_random_llama(
    path: Path, shape: LlamaShape, *, seed: int = 0, name: str = "tiny", file_type: str = "f32"
) -> Path:
    """A random-weight llama GGUF: real compute and timings, meaningless text."""
    vocab = byte_fallback_vocabulary(shape.n_vocab)
    return write_llama_gguf(
        path, shape, vocab, random_llama_tensors(shape, seed), name=name, file_type=file_type
    )


def shape_from_mapping(values: Mapping[str, object]) -> LlamaShape:
    """A ``LlamaShape`` from a config mapping, ignoring keys that are not shape fields."""
    names = {field.name for field in fields(LlamaShape)}
    return LlamaShape(**{k: v for k, v in values.items() if k in names})  # type: ignore[arg-type]

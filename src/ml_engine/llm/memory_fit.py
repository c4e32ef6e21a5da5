"""How much memory loading a GGUF will take, from its header alone (no tensor byte is read).

The estimate is what the process running llama.cpp grows by when it loads the file with a
context and runs its first decode:

* weights: the sum of the tensors' byte sizes by their ggml type (block size × type size),
* KV cache: n_layer × kv_size × (n_head_kv × head_dim_k + n_head_kv × head_dim_v) × bytes per
  element of the cache type (f16 by default), kv_size being n_ctx padded up to 256 as llama.cpp
  pads it; a sliding-window layer holds min(kv_size, n_swa + n_ubatch); a recurrent model (SSM)
  holds a fixed state per layer instead,
* compute buffers: the part of llama.cpp's graph buffer a decode touches, modelled from
  measurements on random-weight llamas (``bench/memory_fit.py``, CPU, flash attention on as
  ``auto`` makes it there): ``COMPUTE_CTX_BYTES`` per n_ctx × n_ubatch (the f16 attention mask
  of a batch against the whole context), ``COMPUTE_EMBD_BYTES`` per n_embd × n_ubatch (the
  layer's activations) and ``VOCAB_BYTES`` per vocabulary entry (the vocabulary's tables and a
  row of logits). llama.cpp reserves n_vocab × n_ubatch × 4 bytes for logits (its "compute
  buffer size" line: 516 MiB for a 262k vocabulary), but a generation asks for the last
  token's logits only, so those pages are never touched and take no memory on a CPU,
* ``LOAD_OVERHEAD_BYTES``: what any load adds besides (llama.cpp's allocator and thread pools).

The mapped weights count whole: llama.cpp's loader reads every page of the file (token
embeddings included), measured so.

``baseline_bytes`` (a Python interpreter with llama_cpp imported, before any load) is added
for a fresh worker process: ``total_bytes`` is what the budget ``llm.memory_budget`` is held to.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml_engine.errors import UserError

# llama.cpp pads the KV cache to this many cells (llama-context.cpp: GGML_PAD(n_ctx, 256))
KV_PAD = 256
# bytes per element of the cache types llama.cpp accepts for type_k / type_v
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
# fitted on bench/memory_fit.py's measurements (CPU, flash attention on): see docs/serving.md
COMPUTE_CTX_BYTES = 2.0
COMPUTE_EMBD_BYTES = 22.0
VOCAB_BYTES = 160
LOAD_OVERHEAD_BYTES = 4 * 1024 * 1024
# an interpreter with llama_cpp imported (46.5 MB measured on Linux x86-64, CPython 3.12)
BASELINE_BYTES = 48 * 1024 * 1024

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
}


def parse_bytes(value: Any, key: str = "llm.memory_budget") -> int | None:
    """Bytes from an int, or a string like "2GiB", "512MB", "1.5 G"; None stays None (no
    limit). Anything else is a ``UserError`` of one line naming ``key``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    if isinstance(value, bool):
        raise UserError(f"{key}={value!r} is not valid; expected bytes or a size like '2GiB'")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise UserError(
                f"{key}={value!r} is not valid; expected bytes or a size like '2GiB', '512MB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise UserError(f"{key}={value!r} is not valid; expected a size > 0 or null")
    return size


def format_bytes(size: float) -> str:
    """1234567890 → '1.15 GiB': how a budget refusal names sizes."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


# ---- the header --------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


@dataclass
class GgufHeader:
    """The metadata scalars (arrays as their length) and the tensors' (type, element count)."""

    metadata: dict[str, Any]
    tensors: dict[str, tuple[int, int]]

    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def get(self, key: str, default: Any = None) -> Any:
        """``<arch>.<key>`` (a per-layer array is its first value's stand-in: its length)."""
        return self.metadata.get(f"{self.arch()}.{key}", default)


def read_header(path: Path) -> GgufHeader:
    """The GGUF header of ``path``, parsed without touching the tensor data (a mapping of the
    file whose data pages are never read). Arrays are skipped but for their length, so a
    262k-token vocabulary costs a pass over its lengths, not a Python string per token."""
    with Path(path).open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
        try:
            return _parse(m)
        except (struct.error, IndexError, ValueError, KeyError) as error:
            raise ValueError(f"corrupt or truncated GGUF header: {error}") from None


def _parse(m: mmap.mmap) -> GgufHeader:
    if m[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", m, at)
        return m[at + 8 : at + 8 + length].decode("utf-8", "replace"), at + 8 + length

    def skip(kind: int, at: int, count: int) -> int:
        if kind in _SCALARS:
            return at + count * struct.calcsize(_SCALARS[kind])
        if kind == _STRING:
            for _ in range(count):
                at += 8 + struct.unpack_from("<Q", m, at)[0]
            return at
        raise ValueError(f"nested or unknown metadata type {kind}")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", m, pos)
        pos += 4
        if kind in _SCALARS:
            (metadata[key],) = struct.unpack_from(_SCALARS[kind], m, pos)
            pos += struct.calcsize(_SCALARS[kind])
        elif kind == _STRING:
            metadata[key], pos = string(pos)
        elif kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", m, pos)
            pos += 12
            # per-layer hyperparameters (n_head_kv per layer, the SWA pattern) are read whole
            if item in _SCALARS and count <= 4096:
                fmt = "<" + _SCALARS[item][1] * count
                metadata[key] = list(struct.unpack_from(fmt, m, pos))
            else:
                metadata[key] = count
            pos = skip(item, pos, count)
        else:
            raise ValueError(f"unknown metadata type {kind} for {key}")
    tensors: dict[str, tuple[int, int]] = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", m, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
        pos += 4 + 8 * n_dims
        kind, _offset = struct.unpack_from("<IQ", m, pos)
        pos += 12
        count = 1
        for dim in dims:
            count *= dim
        tensors[name] = (kind, count)
    return GgufHeader(metadata, tensors)


def tensor_bytes(kind: int, count: int) -> int:
    """Bytes of ``count`` elements of ggml type ``kind`` (whole blocks)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    return -(-count // block) * size


# ---- the estimate ------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes a load takes, by part; ``total_bytes`` adds a fresh worker's ``baseline_bytes``."""

    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    baseline_bytes: int
    n_ctx: int  # as llama.cpp will allocate it (padded)

    @property
    def load_bytes(self) -> int:
        """What a load adds to a running process (the measured RSS growth's counterpart)."""
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.baseline_bytes

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "load_bytes": self.load_bytes, "total_bytes": self.total_bytes}


def _first(value: Any, default: int = 0) -> int:
    """A per-layer hyperparameter (an array in some files) as one number: its largest."""
    if isinstance(value, list):
        return int(max(value)) if value else default
    return int(value) if value is not None else default


def _cache_bytes(cache_type: str) -> float:
    try:
        return CACHE_TYPE_BYTES[cache_type.lower()]
    except KeyError:
        known = ", ".join(CACHE_TYPE_BYTES)
        raise UserError(f"cache type {cache_type!r} is not one of {known}") from None


def kv_cache_bytes(
    header: GgufHeader,
    n_ctx: int,
    n_ubatch: int = 512,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
) -> int:
    """The KV cache llama.cpp allocates for ``n_ctx`` (padded to ``KV_PAD``)."""
    n_layer = _first(header.get("block_count"), 1)
    if header.get("ssm.state_size") is not None:  # recurrent: a fixed state per layer (f32)
        d_conv, d_inner = (
            _first(header.get("ssm.conv_kernel"), 4),
            _first(header.get("ssm.inner_size")),
        )
        d_state = _first(header.get("ssm.state_size"))
        groups = _first(header.get("ssm.group_count"))
        conv = (d_conv - 1) * (d_inner + 2 * groups * d_state)
        return n_layer * (conv + d_state * d_inner) * 4
    n_embd = _first(header.get("embedding_length"))
    n_head = _first(header.get("attention.head_count"), 1) or 1
    n_head_kv = _first(header.get("attention.head_count_kv"), n_head) or n_head
    head_k = _first(header.get("attention.key_length"), n_embd // n_head)
    head_v = _first(header.get("attention.value_length"), n_embd // n_head)
    kv_size = -(-n_ctx // KV_PAD) * KV_PAD
    cells_per_layer = [kv_size] * n_layer
    window = header.get("attention.sliding_window")
    if window:
        # sliding-window layers keep n_swa + n_ubatch cells; which layers slide is the file's
        # pattern when it says (every n-th layer full), else all but the count is unknown:
        # counted as full, an upper bound
        swa_cells = min(kv_size, -(-(int(window) + n_ubatch) // KV_PAD) * KV_PAD)
        pattern = header.get("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            cells_per_layer = [swa_cells if p else kv_size for p in pattern[:n_layer]]
        elif isinstance(pattern, int) and pattern > 1:
            cells_per_layer = [
                kv_size if (i + 1) % pattern == 0 else swa_cells for i in range(n_layer)
            ]
    bytes_k, bytes_v = _cache_bytes(cache_type_k), _cache_bytes(cache_type_v)
    per_cell = n_head_kv * (head_k * bytes_k + head_v * bytes_v)
    return int(sum(cells_per_layer) * per_cell)


def estimate(
    path: Path,
    n_ctx: int,
    *,
    n_batch: int = 512,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    header: GgufHeader | None = None,
) -> MemoryEstimate:
    """The memory loading ``path`` with a context of ``n_ctx`` takes (see the module's doc)."""
    header = header or read_header(path)
    trained = _first(header.get("context_length"), 0)
    # llama.cpp's n_ctx=0 means the file's own; the context is padded as the cache is
    n_ctx = int(n_ctx) or trained or 512
    padded = -(-n_ctx // KV_PAD) * KV_PAD
    n_ubatch = min(int(n_batch), padded)
    weights = sum(tensor_bytes(kind, count) for kind, count in header.tensors.values())
    kv = kv_cache_bytes(header, n_ctx, n_ubatch, cache_type_k, cache_type_v)
    n_embd = _first(header.get("embedding_length"))
    n_vocab = _first(header.get("vocab_size"), 0) or _first(
        header.metadata.get("tokenizer.ggml.tokens"), 0
    )
    compute = int(
        COMPUTE_CTX_BYTES * padded * n_ubatch
        + COMPUTE_EMBD_BYTES * n_embd * n_ubatch
        + VOCAB_BYTES * n_vocab
    )
    return MemoryEstimate(
        weights_bytes=weights,
        kv_cache_bytes=kv,
        compute_bytes=compute,
        overhead_bytes=LOAD_OVERHEAD_BYTES,
        baseline_bytes=BASELINE_BYTES,
        n_ctx=padded,
    )


def check_budget(estimate_: MemoryEstimate, budget: int | None, what: str) -> None:
    """Refuse (one line) a load whose estimate is past ``budget`` bytes; None: no limit."""
    if budget is not None and estimate_.total_bytes > budget:
        raise UserError(
            f"{what} needs an estimated {format_bytes(estimate_.total_bytes)} "
            f"(weights {format_bytes(estimate_.weights_bytes)}, KV cache "
            f"{format_bytes(estimate_.kv_cache_bytes)} for n_ctx={estimate_.n_ctx}, compute "
            f"{format_bytes(estimate_.compute_bytes)}), more than llm.memory_budget="
            f"{format_bytes(budget)}; lower llm.n_ctx, pick a smaller quantization or raise "
            "the budget"
        )


# ---- measuring ---------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux /proc), 0 where unknown."""
    import os

    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def measure_load(path: Path, n_ctx: int, n_batch: int = 512) -> dict[str, Any]:
    """Load ``path`` in a fresh interpreter, decode one full batch (every buffer touched, as a
    long prompt does) and return its RSS before the load (``baseline_bytes``, llama_cpp
    imported) and the growth since (``measured_bytes``), with llama.cpp's own buffer sizes."""
    import json
    import subprocess
    import sys

    from ml_engine.llm.isolation import worker_env

    module = "ml_engine.llm.memory_fit"
    command = [sys.executable, "-m", module, str(path), str(n_ctx), str(n_batch)]
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} failed: {done.stderr.strip()[-500:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    buffers: dict[str, float] = {}
    for line in done.stderr.splitlines():  # llama.cpp's own accounting, for the record
        found = re.search(r"(\S+ (?:model|KV|compute)) buffer size\s*=\s*([0-9.]+) MiB", line)
        if found:
            buffers[found.group(1)] = buffers.get(found.group(1), 0.0) + float(found.group(2))
    return {**measured, "llama_buffers_mib": buffers}


def _measure_here(path: str, n_ctx: int, n_batch: int) -> dict[str, Any]:
    import llama_cpp  # noqa: F401  (imported before the baseline: a worker has it too)

    from ml_engine.llm.backends.llama_cpp import LlamaCppBackend

    before = rss_bytes()
    # verbose: llama.cpp's log on stderr says its buffer sizes
    backend = LlamaCppBackend(Path(path), n_ctx=n_ctx, n_batch=n_batch, verbose=True)
    tokens = min(n_batch, backend.n_ctx - 1)
    backend.bench_prompt([backend.bos] + [7] * (tokens - 1))
    after = rss_bytes()
    backend.close()
    return {
        "baseline_bytes": before,
        "measured_bytes": after - before,
        "n_ctx": backend.n_ctx,
    }


if __name__ == "__main__":  # the fresh process of measure_load
    import json
    import sys

    print(json.dumps(_measure_here(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))

"""Importance matrices in llama.cpp's GGUF imatrix format, read, written and checked.

An importance matrix holds, per weight matrix, what ``llama-imatrix`` collects: the sum over
calibration tokens of each input column's squared activation (``<name>.in_sum2``) and the
number of tokens summed (``<name>.counts``, one per expert; one for a dense matrix). llama.cpp's
quantizer divides one by the other and weighs each column's rounding error by the mean
(``tools/quantize/quantize.cpp``, ``load_imatrix``); this module does the same for the
in-process quantizer (``quantize.quantize_gguf``).

The file is what ``llama-imatrix`` writes (``general.type = imatrix``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``, tensors sorted by name), so
``llama-quantize --imatrix <file>`` reads ours and we read its. Who collects the sums: a model
trained here through forward hooks (``training/lm/imatrix_hooks.py``), any GGUF through
llama.cpp's own forward pass (``imatrix_llama.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ml_engine.errors import UserError
from ml_engine.run.files import atomic_path

GENERAL_TYPE = "imatrix"
# a model's matrix lies beside it as <stem>.imatrix.gguf (export.py writes it there)
MATRIX_SUFFIX = ".imatrix.gguf"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
# what llama-quantize records in a file it quantized with a matrix (quantize.cpp)
KEY_QUANTIZE_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_CHUNKS = "quantize.imatrix.chunks_count"


def matrix_beside(gguf_path: Path) -> Path:
    """``<dir>/<stem>.imatrix.gguf`` for ``<dir>/<stem>.gguf``: where export.py puts a model's
    matrix and where ``quantize.imatrix=auto`` looks for it."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + MATRIX_SUFFIX)


def is_matrix_file(path: Path) -> bool:
    """An importance matrix by its name (``*.imatrix.gguf``), which is no model to load."""
    return Path(path).name.endswith(MATRIX_SUFFIX)


@dataclass
class ImportanceEntry:
    """One weight matrix: ``sums`` (n_mat × n_columns, float64 while collecting) and ``counts``
    (n_mat tokens summed, one per expert)."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_columns(self) -> int:
        return int(self.sums.shape[-1])

    def means(self) -> np.ndarray:
        """What llama-quantize hands the quantizer: sums ÷ counts per matrix, flattened
        (float32); 1 for a matrix no token reached, as llama.cpp does."""
        sums = np.asarray(self.sums, dtype=np.float64).reshape(len(self.counts), -1)
        counts = np.asarray(self.counts, dtype=np.float64).reshape(-1, 1)
        means = np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), 1.0)
        return means.astype(np.float32).reshape(-1)


@dataclass
class ImportanceMatrix:
    """Entries by llama.cpp tensor name (``blk.0.attn_q.weight``), with the calibration data's
    names, the number of chunks and the tokens per chunk."""

    entries: dict[str, ImportanceEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def add(self, name: str, activations: np.ndarray) -> None:
        """Sum the squares of ``activations`` (tokens × n_columns) into ``name``'s entry."""
        rows = np.asarray(activations, dtype=np.float64).reshape(-1, activations.shape[-1])
        self.add_squares(name, np.einsum("ij,ij->j", rows, rows)[None], rows.shape[0])

    def add_squares(self, name: str, squares: np.ndarray, tokens: int) -> None:
        """Add already summed squares (n_mat × n_columns) over ``tokens`` tokens per matrix
        into ``name``'s entry (made on first use)."""
        squares = np.asarray(squares, dtype=np.float64)
        squares = squares.reshape(-1, squares.shape[-1])
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = ImportanceEntry(
                np.zeros(squares.shape), np.zeros(squares.shape[0], dtype=np.int64)
            )
        elif entry.sums.shape != squares.shape:
            raise ValueError(f"{name}: sums of shape {squares.shape}, {entry.sums.shape} before")
        entry.sums += squares
        entry.counts += int(tokens)

    def means(self) -> dict[str, np.ndarray]:
        return {name: entry.means() for name, entry in sorted(self.entries.items())}

    @property
    def n_tokens(self) -> int:
        return int(max((int(e.counts.max()) for e in self.entries.values()), default=0))


def write_imatrix(path: Path, matrix: ImportanceMatrix) -> Path:
    """``matrix`` as llama-imatrix's GGUF file at ``path``, whole or not at all."""
    import gguf

    if not matrix.entries:
        raise UserError("the importance matrix is empty: no weight matrix saw a token")
    with atomic_path(Path(path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=GENERAL_TYPE, use_temp_file=False)
        # llama-imatrix writes no general.architecture; GGUFWriter always does, harmlessly
        writer.add_type(GENERAL_TYPE)
        writer.add_array(KEY_DATASETS, list(matrix.datasets) or ["unknown"])
        writer.add_uint32(KEY_CHUNK_COUNT, int(matrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(matrix.chunk_size))
        for name, entry in sorted(matrix.entries.items()):
            n_mat = len(entry.counts)
            sums = np.asarray(entry.sums, dtype=np.float32).reshape(n_mat, entry.n_columns)
            counts = np.asarray(entry.counts, dtype=np.float32).reshape(n_mat, 1)
            writer.add_tensor(name + SUMS_SUFFIX, sums)
            writer.add_tensor(name + COUNTS_SUFFIX, counts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def read_imatrix(path: Path) -> ImportanceMatrix:
    """The matrix in ``path`` (llama-imatrix's GGUF format); a file that is missing, not a GGUF
    or not an importance matrix is one line saying so."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"importance matrix {path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"importance matrix {path} is not a GGUF file ({reason}); "
            "expected what llama-imatrix or export.py writes"
        ) from None
    kind = _string_field(reader, "general.type")
    sums, counts = {}, {}
    for tensor in reader.tensors:
        name = tensor.name
        if name.endswith(SUMS_SUFFIX):
            sums[name.removesuffix(SUMS_SUFFIX)] = np.array(tensor.data, dtype=np.float64)
        elif name.endswith(COUNTS_SUFFIX):
            counts[name.removesuffix(COUNTS_SUFFIX)] = np.array(tensor.data, dtype=np.float64)
    if kind != GENERAL_TYPE or not sums:
        raise UserError(
            f"{path} is a GGUF but not an importance matrix (general.type={kind!r}, "
            f"{len(sums)} in_sum2 tensors); expected what llama-imatrix or export.py writes"
        )
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise UserError(f"importance matrix {path}: sums without counts for {unpaired[0]}")
    matrix = ImportanceMatrix(
        datasets=_string_array(reader, KEY_DATASETS),
        chunk_count=_int_field(reader, KEY_CHUNK_COUNT),
        chunk_size=_int_field(reader, KEY_CHUNK_SIZE),
    )
    for name in sorted(sums):
        n_mat = counts[name].size
        matrix.entries[name] = ImportanceEntry(
            sums[name].reshape(n_mat, -1), np.rint(counts[name].reshape(-1)).astype(np.int64)
        )
    return matrix


def check_matches_model(matrix: ImportanceMatrix, columns: Mapping[str, int], label: str) -> None:
    """One line when ``matrix`` was made for another model than the one whose weight matrices
    have ``columns`` (tensor name → input columns, ``ne[0]``): a name the model lacks, or a
    width that differs. ``label`` names the matrix in the message."""
    if not matrix.entries:
        raise UserError(f"importance matrix {label} is empty")
    missing = sorted(name for name in matrix.entries if name not in columns)
    if missing:
        raise UserError(
            f"importance matrix {label} was made for another model: it has {missing[0]} "
            f"({len(missing)} of its {len(matrix.entries)} tensors are not in this model)"
        )
    for name, entry in sorted(matrix.entries.items()):
        if entry.n_columns != columns[name]:
            raise UserError(
                f"importance matrix {label} was made for another model: {name} has "
                f"{entry.n_columns} columns in it, {columns[name]} in this model"
            )


def model_columns(gguf_path: Path) -> dict[str, int]:
    """Every 2-D+ weight of a GGUF model and its input columns (``ne[0]``), from the header."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    return {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) >= 2}


def _field(reader, key: str):
    return reader.fields.get(key)


def _string_field(reader, key: str) -> str | None:
    field_ = _field(reader, key)
    if field_ is None:
        return None
    return bytes(field_.parts[field_.data[0]]).decode("utf-8", errors="replace")


def _string_array(reader, key: str) -> list[str]:
    field_ = _field(reader, key)
    if field_ is None:
        return []
    return [bytes(field_.parts[i]).decode("utf-8", errors="replace") for i in field_.data]


def _int_field(reader, key: str) -> int:
    field_ = _field(reader, key)
    return 0 if field_ is None else int(field_.parts[field_.data[0]][0])

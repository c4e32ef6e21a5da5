"""What makes a quantized file beyond its type: an importance matrix and per-tensor types.

A file made with either is a variant of the plain quantization and lives beside it under its own
name (``<plain stem>.im-<matrix>.tt-<types>.gguf``), so a cached plain file is never mistaken for
a weighted one and two matrices never share a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_engine.llm.imatrix import ImportanceMatrix
from ml_engine.run.rules import Rule, int_at_least, optional


@dataclass(frozen=True)
class Variant:
    """``imatrix`` (with ``imatrix_label``, the file it came from, and ``imatrix_key``, a digest
    of its contents) and ``tensor_types`` (pattern → type name, as llama-quantize's
    ``--tensor-type``)."""

    imatrix: ImportanceMatrix | None = None
    imatrix_label: str = ""
    imatrix_key: str = ""
    tensor_types: tuple[tuple[str, str], ...] = ()

    @property
    def is_plain(self) -> bool:
        return self.imatrix is None and not self.tensor_types

    @property
    def tag(self) -> str:
        parts = []
        if self.imatrix is not None:
            parts.append(f"im-{self.imatrix_key[:8]}")
        if self.tensor_types:
            text = ";".join(f"{pattern}={kind}" for pattern, kind in self.tensor_types)
            parts.append(f"tt-{hashlib.sha1(text.encode()).hexdigest()[:8]}")
        return ".".join(parts)

    def path_for(self, plain: Path) -> Path:
        """The variant's file beside ``plain``, the plain quantization's file."""
        if self.is_plain:
            return plain
        return plain.with_name(f"{plain.stem}.{self.tag}{plain.suffix}")

    def without_imatrix(self) -> Variant:
        return Variant(tensor_types=self.tensor_types)

    def quantize_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``quantize.quantize_gguf`` takes for this variant."""
        return {
            "imatrix": self.imatrix,
            "imatrix_label": self.imatrix_label,
            "tensor_types": dict(self.tensor_types) or None,
        }


def tensor_types_of(node: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """A config's ``quantize.tensor_types`` map as the variant's pairs, in the config's order
    (llama.cpp applies the first pattern that matches a tensor)."""
    return tuple((str(k), str(v)) for k, v in (node or {}).items())


def file_digest(path: Path) -> str:
    """sha256 of a file's contents (an importance matrix is small)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _imatrix_setting(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _tensor_types(value: Any) -> bool:
    from ml_engine.llm.quantize import TENSOR_TYPES

    return isinstance(value, Mapping) and all(
        isinstance(p, str) and p and str(t).lower() in TENSOR_TYPES for p, t in value.items()
    )


def _text_file(value: Any) -> bool:
    return isinstance(value, str) and Path(value).expanduser().is_file()


def quantize_rules() -> tuple[Rule, ...]:
    """The ``quantize`` node's rules, shared by generate.py and export.py (a matrix path is
    checked where it is read: the gate says what is wrong with the file)."""
    from ml_engine.llm.quantize import TENSOR_TYPES

    return (
        Rule("quantize.imatrix", _imatrix_setting, "auto, none, or an importance matrix file"),
        Rule(
            "quantize.tensor_types",
            _tensor_types,
            "a map of tensor name pattern → type among " + ", ".join(TENSOR_TYPES),
        ),
        optional(Rule("quantize.calibration_text", _text_file, "an existing UTF-8 text file")),
        int_at_least("quantize.calibration_n_ctx", 16),
        int_at_least("quantize.calibration_chunks", 1),
    )

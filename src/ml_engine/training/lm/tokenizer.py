"""Character-level tokenizer laid out so llama.cpp's SentencePiece ("llama") tokenizer, read from a
GGUF, reproduces it exactly.

Vocabulary: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), the 256 byte tokens ``<0x00>`` … ``<0xFF>``
(3 … 258), then one normal token per distinct character of the corpus, in sorted order, with the
space stored as ``▁`` (U+2581): llama.cpp's SPM tokenizer escapes spaces to ``▁`` before it looks
pieces up. A character outside the vocabulary becomes the byte tokens of its UTF-8 encoding (byte
fallback), as SentencePiece does, so any text encodes and decodes back to itself.

Every normal token is one character, so SPM's merges cannot join anything: llama.cpp's
tokenization equals ours as long as the GGUF sets ``add_space_prefix=false`` and no BOS is added.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

UNK, BOS, EOS = 0, 1, 2
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
BYTE_OFFSET = len(SPECIAL_PIECES)
NUM_BYTES = 256
FIRST_CHAR_ID = BYTE_OFFSET + NUM_BYTES  # 259
SPACE_PIECE = "\u2581"  # "▁"

# llama.cpp's llama_token_type (gguf tokenizer.ggml.token_type)
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_BYTE = 1, 2, 3, 6
KIND = "char_spm"


def _piece(char: str) -> str:
    return SPACE_PIECE if char == " " else char


@dataclass(frozen=True)
class CharTokenizer:
    """Characters → ids with byte fallback; ``chars`` are the vocabulary's normal tokens."""

    chars: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(len(c) != 1 for c in self.chars) or list(self.chars) != sorted(set(self.chars)):
            raise ValueError("chars must be distinct single characters in sorted order")
        if SPACE_PIECE in self.chars:
            raise ValueError("U+2581 is the space's piece and cannot be a token of its own")
        ids = {c: FIRST_CHAR_ID + i for i, c in enumerate(self.chars)}
        object.__setattr__(self, "_ids", ids)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """One normal token per distinct character of ``text``.

        A literal ``▁`` (U+2581) gets none: its piece is the space's, so it stays byte fallback
        here (llama.cpp reads such a character as a space: the one place the two differ).
        """
        return cls(tuple(sorted(set(text) - {SPACE_PIECE})))

    # stored in the checkpoint's hyperparameters: plain containers only
    def to_config(self) -> dict[str, Any]:
        return {"kind": KIND, "chars": "".join(self.chars)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CharTokenizer:
        if config.get("kind") != KIND:
            raise ValueError(f"not a {KIND} tokenizer config: kind={config.get('kind')!r}")
        return cls(tuple(config["chars"]))

    @property
    def vocab_size(self) -> int:
        return FIRST_CHAR_ID + len(self.chars)

    def encode_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for char in text:
            token = self._ids.get(char)
            if token is not None:
                ids.append(token)
            else:  # byte fallback: the UTF-8 bytes of the unknown character
                ids.extend(BYTE_OFFSET + b for b in char.encode("utf-8"))
        return ids

    def encode(self, text: str) -> Tensor:
        """``text`` as an int64 tensor of ids (no BOS)."""
        if not text:
            return torch.empty(0, dtype=torch.long)
        if all(c in self._ids for c in set(text)):  # one table lookup instead of a loop
            points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
            codes = torch.tensor([ord(c) for c in self.chars], dtype=torch.long)
            table = torch.full((int(codes.max()) + 1,), UNK, dtype=torch.long)
            table[codes] = torch.arange(FIRST_CHAR_ID, self.vocab_size)
            return table[points.long()]
        return torch.tensor(self.encode_ids(text), dtype=torch.long)

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Ids back to text; byte tokens are joined and decoded as UTF-8 (invalid → U+FFFD)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        parts: list[str] = []
        pending = bytearray()
        for token in ids:
            if BYTE_OFFSET <= token < FIRST_CHAR_ID:
                pending.append(token - BYTE_OFFSET)
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if token >= FIRST_CHAR_ID:
                parts.append(self.chars[token - FIRST_CHAR_ID])
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def vocabulary(self) -> tuple[list[str], list[float], list[int]]:
        """Pieces, scores and token types as a GGUF exporter writes them (``tokenizer.ggml.*``)."""
        pieces: list[str] = list(SPECIAL_PIECES)
        types = [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
        pieces += [f"<0x{b:02X}>" for b in range(NUM_BYTES)]
        types += [TOKEN_TYPE_BYTE] * NUM_BYTES
        pieces += [_piece(c) for c in self.chars]
        types += [TOKEN_TYPE_NORMAL] * len(self.chars)
        return pieces, [0.0] * len(pieces), types

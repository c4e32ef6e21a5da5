"""Text datamodule for causal language models: one in-memory token tensor, whole batches of random
windows gathered by index for training, the full validation split in fixed windows."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ml_engine.errors import UserError
from ml_engine.training.batches import BatchIndexedDataset, ShardedBatchSampler
from ml_engine.training.lm.tokenizer import CharTokenizer

log = logging.getLogger(__name__)

BUNDLED_CORPUS = "tinyshakespeare.txt"
ACCEPTED = "a UTF-8 text file, or datamodule.path=null for the bundled tinyshakespeare.txt"
# a target the loss skips: the padding after the last validation window's end
IGNORE_INDEX = -100


def bundled_corpus_path() -> Path:
    """The tinyshakespeare text shipped inside the package (public domain, 1,115,394 bytes)."""
    return Path(str(files("ml_engine.training.lm") / "corpora" / BUNDLED_CORPUS))


def read_text(path: Path, max_chars: int | None = None) -> str:
    """The file's text (its first ``max_chars`` characters if given); a UserError naming the file
    and what is accepted when it is missing or not UTF-8."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"datamodule.path: no file {path}; give {ACCEPTED}") from None
    except OSError as exc:
        raise UserError(
            f"datamodule.path: cannot read {path} ({exc.strerror}); give {ACCEPTED}"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"datamodule.path: {path} is not UTF-8 text (byte {exc.start} is "
            f"0x{raw[exc.start]:02x}); give {ACCEPTED}"
        ) from None
    return text[:max_chars] if max_chars is not None else text


def split_sizes(n_chars: int, val_fraction: float) -> tuple[int, int]:
    """Characters of the training and validation splits of an ``n_chars`` text."""
    val = round(n_chars * val_fraction)
    return n_chars - val, val


def min_corpus_chars(block_size: int, val_fraction: float) -> int:
    """The fewest characters whose training and validation splits each hold one whole window
    (``block_size + 1`` characters: ``block_size`` predictions, the last with full context).
    A validation split shorter than that measures ``val/loss`` on a handful of characters."""
    window = block_size + 1
    n_chars = math.floor((window - 1) / min(val_fraction, 1 - val_fraction))
    while min(split_sizes(n_chars, val_fraction)) < window:  # round() decides the exact edge
        n_chars += 1
    return n_chars


class RandomWindowSampler(Sampler[Tensor]):
    """``num_batches`` batches of ``batch_size`` random window starts in ``[0, num_starts)``,
    drawn per epoch from ``seed``, the epoch and the rank (ranks draw different windows)."""

    def __init__(
        self, num_starts: int, batch_size: int, num_batches: int, seed: int, rank: int = 0
    ) -> None:
        self.num_starts, self.batch_size, self.num_batches = num_starts, batch_size, num_batches
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 100_003 * self.epoch + self.rank)
        starts = torch.randint(
            self.num_starts, (self.num_batches, self.batch_size), generator=generator
        )
        yield from starts


class WindowDataset(Dataset):
    """Indexing with a tensor of window starts returns the whole batch in one gather:
    inputs ``tokens[s : s + block]`` and targets ``tokens[s + 1 : s + block + 1]``."""

    def __init__(self, tokens: Tensor, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.offsets = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        windows = self.tokens[starts[:, None] + self.offsets].long()
        return windows[:, :-1], windows[:, 1:]


def consecutive_windows(tokens: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Every next-token prediction of ``tokens`` exactly once, in non-overlapping windows
    {W, block}: the last window is padded at its end (inputs 0, targets ``IGNORE_INDEX``), which
    a causal model cannot see from the positions before."""
    inputs, targets = tokens[:-1].long(), tokens[1:].long()
    windows = -(-len(targets) // block_size)
    pad = windows * block_size - len(targets)
    inputs = torch.cat([inputs, torch.zeros(pad, dtype=torch.long)])
    targets = torch.cat([targets, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
    return inputs.view(windows, block_size), targets.view(windows, block_size)


class TextDataModule(L.LightningDataModule):
    """A UTF-8 text file (``path``; null: the bundled tinyshakespeare) for next-character
    prediction: the first ``1 - val_fraction`` of its characters train, the rest validate.

    Training batches are ``batch_size`` random windows of ``block_size`` tokens; an epoch is as
    many batches as the training split has windows' worth of tokens (``train_batches`` to set
    it). Validation covers the whole validation split once, in consecutive windows. The
    character vocabulary comes from the whole file (both splits); a model restored from a
    checkpoint brings its own (``use_tokenizer``).
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        val_fraction: float = 0.1,
        max_chars: int | None = None,
        train_batches: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 12345,
    ) -> None:
        super().__init__()
        # plain values only: checkpoints must load with torch's weights-only unpickler
        self.save_hyperparameters(
            {
                "path": str(Path(path).expanduser().resolve()) if path else None,
                "block_size": block_size,
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "val_fraction": val_fraction,
                "max_chars": max_chars,
                "train_batches": train_batches,
                "num_workers": num_workers,
                "pin_memory": pin_memory,
                "seed": seed,
            },
            logger=False,
        )
        self.text: str | None = None
        self.tokenizer: CharTokenizer | None = None
        self._train_chars = 0
        self._splits: tuple[Tensor, Tensor] | None = None
        self._sha256: str | None = None

    @property
    def file(self) -> Path:
        return Path(self.hparams.path) if self.hparams.path else bundled_corpus_path()

    @property
    def source_used(self) -> str:
        """The corpus read: the bundled file's name, or the path of the user's file."""
        return BUNDLED_CORPUS if not self.hparams.path else self.hparams.path

    def state_dict(self) -> dict[str, Any]:
        # saved in every checkpoint: which text, byte for byte, the split was cut from
        return {"source_used": self.source_used, "sha256": self._sha256}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the text is read again by ``setup``."""

    def prepare_data(self) -> None:
        # Lightning calls this before loggers and checkpoints write into the run dir: a text
        # too short to learn from is refused while the run dir can still be removed
        self._checked_text()

    def setup(self, stage: str | None = None) -> None:
        if self.text is not None:
            return
        text = self._checked_text()
        self._sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.text = text
        self._train_chars = split_sizes(len(text), self.hparams.val_fraction)[0]
        if self.tokenizer is None:
            self.tokenizer = CharTokenizer.from_text(text)

    def _checked_text(self) -> str:
        """The text, or a UserError when either split would be shorter than one window."""
        max_chars = self.hparams.max_chars
        text = read_text(self.file, max_chars)
        block, val_fraction = self.hparams.block_size, self.hparams.val_fraction
        needed = min_corpus_chars(block, val_fraction)
        if len(text) >= needed:
            return text
        train_chars, val_chars = split_sizes(len(text), val_fraction)
        cut = f" (datamodule.max_chars={max_chars})" if len(text) == max_chars else ""
        raise UserError(
            f"datamodule.path: {self.file}{cut} has {len(text):,} characters, too few for "
            f"block_size={block} with val_fraction={val_fraction}: the training and validation "
            f"splits each need one whole window of {block + 1} characters (block_size + 1) and "
            f"would get {train_chars:,} and {val_chars:,}; give a text of at least "
            f"{needed:,} characters or a smaller datamodule.block_size"
        )

    @property
    def val_text(self) -> str:
        """The validation split as text (after ``setup``): what ``val/loss`` is measured on."""
        if self.text is None:
            raise RuntimeError("setup() first")
        return self.text[self._train_chars :]

    def use_tokenizer(self, tokenizer: CharTokenizer) -> None:
        """Encode with ``tokenizer`` (a restored model's) instead of one built from the text."""
        if tokenizer != self.tokenizer:
            self.tokenizer, self._splits = tokenizer, None

    @property
    def splits(self) -> tuple[Tensor, Tensor]:
        """Training and validation tokens (int32), encoded on first use."""
        if self._splits is None:
            if self.text is None or self.tokenizer is None:
                raise RuntimeError("setup() first")
            train = self.tokenizer.encode(self.text[: self._train_chars]).int()
            val = self.tokenizer.encode(self.text[self._train_chars :]).int()
            self._splits = (train, val)
        return self._splits

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_batches_per_epoch(self) -> int:
        if self.hparams.train_batches:
            return int(self.hparams.train_batches)
        tokens_per_batch = self.hparams.batch_size * self.hparams.block_size
        return max(1, len(self.splits[0]) // tokens_per_batch)

    def train_dataloader(self) -> DataLoader:
        train, block = self.splits[0], self.hparams.block_size
        rank, _ = self._rank()
        seed = torch.initial_seed() % 2**31 if self.trainer is not None else self.hparams.seed
        sampler = RandomWindowSampler(
            num_starts=len(train) - block,
            batch_size=self.hparams.batch_size,
            num_batches=self.train_batches_per_epoch(),
            seed=seed,
            rank=rank,
        )
        return self._loader(WindowDataset(train, block), sampler)

    def val_dataloader(self) -> DataLoader:
        inputs, targets = consecutive_windows(self.splits[1], self.hparams.block_size)
        rank, world_size = self._rank()
        sampler = ShardedBatchSampler(
            size=len(inputs),
            batch_size=self.hparams.eval_batch_size,
            shuffle=False,
            seed=0,
            rank=rank,
            world_size=world_size,
            pad=False,  # every window once over all ranks
        )
        return self._loader(BatchIndexedDataset(inputs, targets), sampler)

"""The export round trip on a real checkpoint: what llama.cpp makes of an exported f32 GGUF
against what PyTorch and Lightning make of the checkpoint it came from.

    python bench/export_round_trip.py outputs/train/runs/<run>/checkpoints/best.ckpt \
        outputs/train/runs/<run>/<name>-f32.gguf

Prints tokenization equality (validation text plus characters outside the vocabulary and runs
of spaces), the largest logit difference on one 256-token window, perplexity through llama.cpp
against exp(val/loss) from Lightning on the same windows, and whether greedy generation gives
the same first 32 tokens. tests/training/lm/test_export.py checks the same on a small model.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the entrypoints, before torch loads

import lightning as L
import numpy as np
import torch

from ml_engine.llm.backends import Sampling
from ml_engine.llm.backends.llama_cpp import LlamaCppBackend, exact_logits
from ml_engine.llm.gguf_writer import held_out_text_path
from ml_engine.training.checkpoints import DATAMODULE_HPARAMS, load_module, read_checkpoint
from ml_engine.training.lm.text_data import TextDataModule

ODD_TEXT = "  Ünïcødé 🙂 tabs\tand  double  spaces  \n\n\n trailing   "


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_perplexity(backend: LlamaCppBackend, tokens: list[int], block: int) -> float:
    """exp(mean NLL) over non-overlapping windows of ``block`` predictions, no BOS: the
    windows Lightning's validation uses."""
    nll = []
    for start in range(0, len(tokens) - 1, block):
        window = tokens[start : start + block + 1]
        logprobs = backend.chunk_logprobs(window, 0)
        nll.append(-logprobs[np.arange(len(window) - 1), window[1:]])
    return float(np.exp(np.concatenate(nll).mean()))


def lightning_val_loss(ckpt: Path, module: L.LightningModule) -> float:
    checkpoint = read_checkpoint(ckpt)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = TextDataModule(**checkpoint[DATAMODULE_HPARAMS])
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(metrics["val/loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="ROMEO:")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its tips and device lines

    module = load_module(args.ckpt)
    tokenizer, net = module.tokenizer, module.net
    block = net.config.block_size
    val_text = held_out_text_path(args.gguf).read_text(encoding="utf-8")
    backend = LlamaCppBackend(args.gguf, n_ctx=512, n_threads=args.threads, ignore_eos=True)

    text = val_text + ODD_TEXT
    ours = tokenizer.encode_ids(text)
    print(
        f"tokenization: {len(ours):,} tokens (validation split + odd text), "
        f"llama.cpp equal: {backend.tokenize(text) == ours}, add_bos: {backend.add_bos}"
    )

    ids = tokenizer.encode_ids(val_text)[: args.window + 1]
    with torch.no_grad():
        expected = net(torch.tensor([ids[: args.window]]))[0].double().numpy()
    logits = exact_logits(
        args.gguf, ids[: args.window], n_ctx=max(512, args.window), n_threads=args.threads
    )
    delta = np.abs(logits - expected)
    f16_kv = np.abs(backend.chunk_logprobs(ids, 0) - log_softmax(expected)).max()
    print(
        f"logits, {args.window}-token window (block_size {block}): max |Δlogit| "
        f"{delta.max():.2e} (f32 KV cache; first {block} positions {delta[:block].max():.2e}; "
        f"logits up to {np.abs(expected).max():.1f}); max |Δ log p| with llama.cpp's default "
        f"f16 KV cache {f16_kv:.2e}"
    )

    val_loss = lightning_val_loss(args.ckpt, module)
    ppl = window_perplexity(backend, backend.tokenize(val_text), block)
    print(
        f"perplexity, validation split in {block}-token windows: llama.cpp {ppl:.4f}, "
        f"exp(val/loss) {math.exp(val_loss):.4f} (val/loss {val_loss:.4f}, Lightning, float32), "
        f"ratio {ppl / math.exp(val_loss):.6f}"
    )

    prompt_ids = tokenizer.encode(args.prompt)[None]
    torch_tokens = net.generate(prompt_ids, 32, temperature=0.0)[0, prompt_ids.shape[1] :]
    greedy = Sampling(max_tokens=32, temperature=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
    cpp_tokens = backend.generate(args.prompt, greedy).tokens
    print(
        f"greedy, 32 tokens after {args.prompt!r}: equal {cpp_tokens == torch_tokens.tolist()}: "
        f"{tokenizer.decode(torch_tokens)!r}"
    )
    backend.close()


if __name__ == "__main__":
    main()

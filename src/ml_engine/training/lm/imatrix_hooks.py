"""The importance matrix of a language model trained here, from PyTorch: what ``llama-imatrix``
collects from llama.cpp's forward pass (per weight matrix, each input column's squared activation
summed over the calibration tokens), collected with forward pre-hooks on the network's linear
layers and named by llama.cpp's tensor names (``export.TENSOR_NAMES``), so that
``llama-quantize --imatrix`` takes the file ``ml_engine.llm.imatrix.write_imatrix`` writes.

The exported GGUF permutes only the rows of ``wq`` and ``wk`` (``export.rope_permute``); the
importance matrix is about input columns, which the export leaves in place, so the sums apply to
the exported tensors as they are.

Calibration for a checkpoint is its TRAINING split (``importance_from_checkpoint``), never the
validation text its quality is measured on: non-overlapping windows of the trained context
(``block_size``), spread evenly over the split.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ml_engine.errors import UserError
from ml_engine.llm.imatrix import ImportanceEntry, ImportanceMatrix
from ml_engine.training.lm.export import TENSOR_NAMES, trained_text

if TYPE_CHECKING:
    from ml_engine.training.lm.module import CausalLMModule

OUTPUT = "output.weight"
EMBEDDINGS = "token_embd.weight"
# windows per forward pass: bounded memory, whatever n_chunks is
BATCH_WINDOWS = 16


def linear_tensor_names(net: nn.Module, *, process_output: bool = False) -> dict[str, str]:
    """The network's linear layers whose inputs llama-imatrix sums: module name → llama.cpp
    tensor name, the blocks' (``blk.{i}.attn_q.weight`` …) and, with ``process_output``,
    ``output.weight`` (``llama-imatrix --process-output``)."""
    n_layer = net.config.n_layer
    names = {}
    for ours, theirs in TENSOR_NAMES.items():
        layers = range(n_layer) if "{i}" in ours else [0]
        names.update({ours.format(i=i): theirs.format(i=i) for i in layers})
    wanted = {}
    for module_name, module in net.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parameter = f"{module_name}.weight"
        if parameter not in names:
            raise UserError(
                f"the network's linear layer {module_name!r} has no llama.cpp tensor; cannot "
                "collect an importance matrix for it"
            )
        tensor = names[parameter]
        if tensor.startswith("blk.") or (process_output and tensor == OUTPUT):
            wanted[module_name] = tensor
    return wanted


def collect_importance(
    net: nn.Module, windows: Iterable[Tensor], *, process_output: bool = False
) -> ImportanceMatrix:
    """Run ``net`` (eval mode, no grad, float32) over ``windows`` (token ids, {T} or {B, T}) and
    sum each linear layer's squared inputs per input column over every token, under llama.cpp's
    tensor names. ``chunk_count``: the windows seen; ``chunk_size``: their tokens each (the
    longest, when they differ). The hooks are removed afterwards, also on error, and the
    network's training mode is restored."""
    names = linear_tensor_names(net, process_output=process_output)
    modules = dict(net.named_modules())
    device = next(net.parameters()).device
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(tensor: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
            squares = torch.einsum("ij,ij->j", rows, rows)
            if tensor in sums:
                sums[tensor] += squares
            else:
                sums[tensor] = squares
            counts[tensor] = counts.get(tensor, 0) + rows.shape[0]

        return hook

    handles = [modules[m].register_forward_pre_hook(hook_for(t)) for m, t in names.items()]
    was_training = net.training
    n_windows, longest = 0, 0
    try:
        net.eval()
        # a float32 copy of a half-precision network (deepcopy keeps the hooks, which are
        # plain functions writing into ``sums``)
        float_net = net if _is_float32(net) else copy.deepcopy(net).float()
        with torch.no_grad():
            for window in windows:
                ids = torch.as_tensor(window).long().to(device)
                ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
                if ids.ndim != 2 or ids.shape[1] == 0:
                    raise ValueError(f"a window of token ids is {{T}} or {{B, T}}, not {ids.shape}")
                float_net(ids)
                n_windows += ids.shape[0]
                longest = max(longest, ids.shape[1])
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    matrix = ImportanceMatrix(chunk_count=n_windows, chunk_size=longest)
    for tensor in sorted(sums):
        matrix.entries[tensor] = ImportanceEntry(
            sums[tensor].cpu().numpy().reshape(1, -1), np.array([counts[tensor]], dtype=np.int64)
        )
    return matrix


def embedding_importance(net: nn.Module, windows: Iterable[Tensor]) -> ImportanceEntry:
    """An entry for ``token_embd.weight``, which llama-imatrix cannot collect (a row lookup,
    no matrix product sees its columns): per embedding dimension, the sum over tokens of the
    squared gradient of the training loss (next-token cross-entropy, summed) with respect to the
    embedding's output, i.e. the diagonal Fisher information of the residual stream's input.
    Its role in the quantizer is a linear layer's summed squared inputs': it weighs how much an
    error in each column of every embedding row moves the loss. Windows of ``block_size + 1``
    tokens give ``block_size`` predictions each; the network is left as it was found."""
    was_training = net.training
    float_net = net if _is_float32(net) else copy.deepcopy(net).float()
    device = next(float_net.parameters()).device
    captured: list[Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        output.retain_grad()
        captured.append(output)
        return output

    handle = float_net.tok_embeddings.register_forward_hook(keep)
    squares, count = None, 0
    try:
        float_net.eval()
        for window in windows:
            ids = torch.as_tensor(window).long().to(device)
            ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
            logits = float_net(ids[:, :-1])
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            float_net.zero_grad(set_to_none=True)
            loss.backward()
            grad = captured.pop().grad.detach()
            grad = grad.reshape(-1, grad.shape[-1]).to(torch.float64)
            batch = torch.einsum("ij,ij->j", grad, grad)
            squares = batch if squares is None else squares + batch
            count += grad.shape[0]
    finally:
        handle.remove()
        float_net.zero_grad(set_to_none=True)
        net.train(was_training)
    if squares is None:
        raise UserError("no calibration window for the embeddings' importance")
    return ImportanceEntry(squares.cpu().numpy().reshape(1, -1), np.array([count], dtype=np.int64))


def training_windows(tokens: Tensor, block_size: int, n_chunks: int) -> Tensor:
    """``n_chunks`` non-overlapping windows {n, block_size} of ``tokens``, evenly spread over
    them (the first and the last whole window included), always the same ones; every whole
    window when there are fewer."""
    if block_size < 1 or n_chunks < 1:
        raise ValueError(f"block_size={block_size} and n_chunks={n_chunks} must be positive")
    available = len(tokens) // block_size
    if available == 0:
        return torch.empty((0, block_size), dtype=torch.long)
    picked = np.unique(np.linspace(0, available - 1, min(n_chunks, available)).round()).astype(int)
    starts = torch.as_tensor(picked * block_size)
    return tokens[starts[:, None] + torch.arange(block_size)].long()


def training_split(checkpoint: dict[str, Any], tokenizer: Any) -> tuple[Tensor, str]:
    """The training split of the text ``checkpoint`` trained on, re-cut from its file as
    ``export.validation_text`` does and encoded with ``tokenizer`` (the model's), and the text's
    name; one line (UserError) when the file is gone or has changed since training."""
    try:
        datamodule = trained_text(checkpoint)
    except UserError as exc:
        raise UserError(f"no calibration text for the importance matrix: {exc}") from None
    if tokenizer is not None:
        datamodule.use_tokenizer(tokenizer)
    return datamodule.splits[0], datamodule.source_used


def importance_from_checkpoint(
    module: CausalLMModule,
    checkpoint: dict[str, Any],
    *,
    n_chunks: int = 128,
    process_output: bool = False,
    embeddings: bool = False,
) -> ImportanceMatrix:
    """``module``'s importance matrix over ``n_chunks`` windows of its trained context from the
    training split of the text ``checkpoint`` trained on (the validation split, which quality
    is measured on, is never read); datasets = ``["<text> (train split)"]``. ``process_output``:
    ``output.weight`` too (llama-imatrix's ``--process-output``); ``embeddings``: an entry for
    ``token_embd.weight`` from the training loss's gradient (``embedding_importance``), which
    llama-imatrix has no way to collect."""
    if module.net is None or module.tokenizer is None:
        raise UserError("the checkpoint holds no built network (it was saved before training)")
    if n_chunks < 1:
        raise UserError(f"n_chunks={n_chunks}: give at least one calibration window")
    block_size = int(module.net.config.block_size)
    tokens, source = training_split(checkpoint, module.tokenizer)
    windows = training_windows(tokens, block_size, n_chunks)
    if len(windows) == 0:
        raise UserError(
            f"the training split of {source} has {len(tokens):,} tokens, fewer than one window "
            f"of block_size={block_size}"
        )
    matrix = collect_importance(
        module.net, _batches(windows, BATCH_WINDOWS), process_output=process_output
    )
    if embeddings:
        # windows one token longer: every position of the trained context predicts the next
        longer = training_windows(tokens, block_size + 1, n_chunks)
        matrix.entries[EMBEDDINGS] = embedding_importance(
            module.net, _batches(longer, BATCH_WINDOWS)
        )
    matrix.datasets = [f"{source} (train split)"]
    matrix.chunk_count, matrix.chunk_size = len(windows), block_size
    return matrix


def _is_float32(net: nn.Module) -> bool:
    return all(parameter.dtype == torch.float32 for parameter in net.parameters())


def _batches(windows: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, len(windows), size):
        yield windows[start : start + size]

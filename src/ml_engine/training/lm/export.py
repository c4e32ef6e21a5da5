"""Export a trained character-level llama to a GGUF file llama.cpp runs:
``python export.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt``.

The file holds the network in llama.cpp's layout (``llama.py`` names its parameters after
llama.cpp's tensors; only the rows of ``wq`` and ``wk`` are permuted, for the RoPE convention)
and the character vocabulary as a SentencePiece ("llama") tokenizer that reproduces the
training tokenizer exactly: no BOS added, no ``▁`` prepended. ``add_bos`` is false because the
training windows start anywhere in the text and never with BOS: llama.cpp's generation,
``llama-perplexity`` and the sweep's quality measurement then feed the model what it was trained
on (with BOS they would put an untrained token at the start of every prompt and chunk). The
context length is the training ``block_size``.

Beside the GGUF goes the validation split as ``<file stem>.val.txt``: held-out text for
quality figures (``generate.py llm.model.path=<file>`` picks it up by itself).

Other quantizations than f32/f16 are made from a temporary f32 file by llama.cpp's quantizer.
The only imports from ``ml_engine.llm`` are its GGUF writer and quantizer (tests/test_layout.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ml_engine.errors import UserError
from ml_engine.llm.gguf_writer import (
    LlamaShape,
    TokenizerOptions,
    Vocabulary,
    held_out_text_path,
    write_llama_gguf,
)
from ml_engine.llm.imatrix import write_imatrix
from ml_engine.llm.quantize import quantization_names, quantize_gguf
from ml_engine.llm.variants import Variant, file_digest, quantize_rules, tensor_types_of
from ml_engine.run.files import atomic_path, write_text_atomic
from ml_engine.run.rules import Rule, int_at_least, one_of, optional

if TYPE_CHECKING:  # torch loads once the config is checked
    from ml_engine.training.lm.module import CausalLMModule

log = logging.getLogger(__name__)

# what the GGUF writer writes itself; every other quantization goes through llama.cpp's quantizer
WRITTEN_DIRECTLY = ("f32", "f16")
# exactly the training tokenizer: no BOS (windows never start with one), no "▁" before a text
TOKENIZER = TokenizerOptions(add_bos=False, add_space_prefix=False, pre="default")
LM_EXPERIMENT = "experiment=shakespeare_char"
DEFAULT_BASE_NAME = "char_llama"


def _gguf_path(value: Any) -> bool:
    return isinstance(value, str) and value.endswith(".gguf") and len(value) > len(".gguf")


def _model_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\n" not in value


EXPORT_RULES: tuple[Rule, ...] = (
    one_of("quantization", quantization_names()),
    optional(Rule("output", _gguf_path, "a file path ending in .gguf")),
    optional(Rule("name", _model_name, "a one-line model name")),
    one_of("val_text", (True, False)),
    optional(int_at_least("n_threads", 1)),
    optional(int_at_least("quality.n_chunks", 1)),
    *quantize_rules(),
)

# llama.py's parameter names → llama.cpp's tensor names (``{i}``: the layer)
TENSOR_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "token_embd.weight",
    "layers.{i}.attention_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.wq.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.wk.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.wv.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.wo.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.ffn_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.w3.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.feed_forward.w2.weight": "blk.{i}.ffn_down.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}


def rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q or K projection from rotate_half order (dimension ``i`` of a head paired
    with ``i + head_dim/2``) to llama.cpp's adjacent pairs ``(2i, 2i+1)``, as
    ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``; ``n_head``: the heads of this matrix
    (``n_head_kv`` for K)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(net: Any) -> Iterator[tuple[str, np.ndarray]]:
    """The network's parameters as float32 arrays under llama.cpp's names, Q and K permuted.

    A parameter without a llama.cpp name is an error: a file without it would compute
    something else than the network did."""
    config = net.config
    names = {}
    for ours, theirs in TENSOR_NAMES.items():
        layers = range(config.n_layer) if "{i}" in ours else [0]
        names.update({ours.format(i=i): theirs.format(i=i) for i in layers})
    for ours, tensor in net.state_dict().items():
        if ours not in names:
            raise UserError(
                f"the network's parameter {ours!r} has no llama.cpp tensor; cannot export"
            )
        array = tensor.detach().float().cpu().numpy()
        if ours.endswith("attention.wq.weight"):
            array = rope_permute(array, config.n_head)
        elif ours.endswith("attention.wk.weight"):
            array = rope_permute(array, config.n_head_kv)
        yield names[ours], array


def gguf_shape(net: Any) -> LlamaShape:
    """The GGUF's hyperparameters; its context length is the trained ``block_size``."""
    c = net.config
    return LlamaShape(
        n_vocab=c.vocab_size,
        n_embd=c.n_embd,
        n_ff=c.n_ff,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_head_kv=c.n_head_kv,
        n_ctx=c.block_size,
        rms_eps=c.norm_eps,
        rope_theta=c.rope_theta,
    )


def gguf_vocabulary(tokenizer: Any) -> Vocabulary:
    from ml_engine.training.lm.tokenizer import BOS, EOS, UNK

    pieces, scores, types = tokenizer.vocabulary()
    return Vocabulary(pieces, scores, types, unk_id=UNK, bos_id=BOS, eos_id=EOS)


def write_gguf(
    module: CausalLMModule,
    path: Path,
    *,
    name: str,
    quantization: str = "f32",
    n_threads: int | None = None,
    metadata: Mapping[str, str | float] | None = None,
    weights: Variant | None = None,
    gate: Gate | None = None,
) -> Path:
    """``module``'s network and tokenizer as a GGUF at ``path``, whole or not at all;
    ``metadata``: further GGUF keys (f32/f16 only: the quantizer rewrites the header);
    ``weights``: the importance matrix and per-tensor types a quantization is made with,
    ``gate``: keep the lower-KLD of with and without the matrix (see ``Gate``)."""
    if module.net is None or module.tokenizer is None:
        raise UserError("the checkpoint holds no built network (it was saved before training)")
    if module.hparams.net.get("name") != "llama":
        raise UserError(
            f"network {module.hparams.net.get('name')!r} has no GGUF layout; export takes "
            f"model/net=llama checkpoints ({LM_EXPERIMENT})"
        )
    shape = gguf_shape(module.net)
    vocab = gguf_vocabulary(module.tokenizer)
    if quantization in WRITTEN_DIRECTLY:
        return write_llama_gguf(
            path,
            shape,
            vocab,
            gguf_tensors(module.net),
            name=name,
            file_type=quantization,
            tokenizer=TOKENIZER,
            metadata=metadata,
        )
    if not shape.k_quant_ready and quantization.endswith(("_k", "_k_m", "_k_s")):
        log.warning(
            "n_embd=%d / n_ff=%d are not multiples of 256: llama.cpp quantizes the rows that "
            "do not split into K-quant blocks with another type",
            shape.n_embd,
            shape.n_ff,
        )
    with tempfile.TemporaryDirectory(prefix="ml-engine-export-") as folder:
        source = Path(folder) / "f32.gguf"
        write_llama_gguf(
            source, shape, vocab, gguf_tensors(module.net), name=name, tokenizer=TOKENIZER
        )
        if weights is None or weights.is_plain:
            return quantize_gguf(source, Path(path), quantization, n_threads)
        return _quantize_gated(source, Path(path), quantization, n_threads, weights, gate)


@dataclass(frozen=True)
class Gate:
    """``quantize.imatrix=auto``: the file is made with and without the matrix, and the one
    with the lower mean KLD from the f32 network on ``text`` (held out) is written; the
    figures of both go to ``figures``."""

    text: str
    n_ctx: int
    n_chunks: int | None
    figures: dict[str, Any] = field(default_factory=dict)


def _quantize_gated(
    source: Path,
    path: Path,
    quantization: str,
    n_threads: int | None,
    weights: Variant,
    gate: Gate | None,
) -> Path:
    """With the matrix alone, or (``gate``) the lower-KLD of with and without it."""
    if gate is None:
        return quantize_gguf(source, path, quantization, n_threads, **weights.quantize_kwargs())
    from ml_engine.llm.imatrix_gate import gate_files

    folder = source.parent
    candidates = {
        "plain": quantize_gguf(
            source,
            folder / "plain.gguf",
            quantization,
            n_threads,
            **weights.without_imatrix().quantize_kwargs(),
        ),
        "imatrix": quantize_gguf(
            source, folder / "imatrix.gguf", quantization, n_threads, **weights.quantize_kwargs()
        ),
    }
    text_path = write_text_atomic(folder / "held_out.txt", gate.text)
    kept, figures = gate_files(
        candidates,
        source,
        text_path,
        n_ctx=gate.n_ctx,
        n_chunks=gate.n_chunks,
        n_threads=n_threads,
        work_dir=folder,
    )
    gate.figures.update(figures, kept=kept)
    with atomic_path(path) as tmp:
        shutil.copyfile(candidates[kept], tmp)
    return path


def training_run_dir(ckpt_path: Path) -> Path:
    """The run a checkpoint belongs to: ``<run>/checkpoints/<file>.ckpt`` → ``<run>``."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def default_name(run_dir: Path) -> str:
    """``<experiment>-<run dir name>`` (e.g. ``shakespeare_char-2026-12-01_19-34-10_e5da85``);
    ``char_llama-…`` for a run without an experiment."""
    experiment = None
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        for item in OmegaConf.load(overrides) or []:
            key, _, value = str(item).lstrip("+~").partition("=")
            if key == "experiment" and value:
                experiment = value
    return f"{experiment or DEFAULT_BASE_NAME}-{run_dir.name}"


def trained_text(checkpoint: dict[str, Any]) -> Any:
    """The text datamodule the checkpoint trained on, set up again from its settings (train and
    validation splits as they were); a UserError naming the text when its file is gone or has
    changed since training."""
    from ml_engine.training.checkpoints import DATAMODULE_HPARAMS
    from ml_engine.training.lm.text_data import TextDataModule

    settings = checkpoint.get(DATAMODULE_HPARAMS) or {}
    trained = checkpoint.get(TextDataModule.__name__) or {}
    datamodule = TextDataModule(**settings)
    datamodule.setup()  # a gone file: its UserError
    if trained.get("sha256") and trained["sha256"] != datamodule.state_dict()["sha256"]:
        raise UserError(f"{datamodule.source_used} has changed since the checkpoint trained on it")
    return datamodule


def validation_text(checkpoint: dict[str, Any]) -> str | None:
    """The validation split the checkpoint was measured on, re-cut from its text file; None
    (with a warning) when that file is gone or has changed since training."""
    try:
        return trained_text(checkpoint).val_text
    except UserError as exc:
        log.warning("no validation text written: %s", exc)
        return None


def _weights(
    cfg: DictConfig,
    module: CausalLMModule,
    checkpoint: dict[str, Any],
    output: Path,
    quantization: str,
    held_out: str | None,
) -> tuple[Variant, Gate | None, dict[str, Any]]:
    """What ``quantize`` asks of this export: the importance matrix (collected from the
    training split and written beside the file as ``<stem>.imatrix.gguf``, or a given file),
    per-tensor types, and whether the KLD gate decides (``auto``, on the held-out text)."""
    from ml_engine.llm.imatrix_gate import AUTO, NONE, check_setting, load_matrix, matrix_beside

    quantize = cfg.get("quantize") or {}
    setting = check_setting(quantize.get("imatrix", NONE))
    types = tensor_types_of(quantize.get("tensor_types"))
    record: dict[str, Any] = {"setting": setting, "file": None, "used": False}
    if setting == NONE:
        return Variant(tensor_types=types), None, record
    if setting == AUTO:
        from ml_engine.training.lm.imatrix_hooks import importance_from_checkpoint

        matrix = importance_from_checkpoint(
            module,
            checkpoint,
            n_chunks=int(quantize.get("calibration_chunks") or 512),
            process_output=True,
            embeddings=True,
        )
        matrix_file = write_imatrix(matrix_beside(output), matrix)
        print(f"imatrix: {matrix_file}", flush=True)
        digest = file_digest(matrix_file)
    else:
        matrix_file = Path(setting)
        with tempfile.TemporaryDirectory(prefix="ml-engine-export-") as folder:
            probe = write_llama_gguf(
                Path(folder) / "shape.gguf",
                gguf_shape(module.net),
                gguf_vocabulary(module.tokenizer),
                gguf_tensors(module.net),
                name="probe",
                tokenizer=TOKENIZER,
            )
            matrix, digest = load_matrix(matrix_file, probe)
    record.update(file=str(matrix_file), chunks=matrix.chunk_count, tokens=matrix.n_tokens)
    weights = Variant(matrix, str(matrix_file), digest, types)
    if quantization in WRITTEN_DIRECTLY:
        return weights, None, record
    if setting != AUTO:
        record["used"] = True
        return weights, None, record
    if held_out is None:
        log.warning("no held-out text to gate on: %s is made with the matrix", quantization)
        record["used"] = True
        return weights, None, record
    block_size = int(module.net.config.block_size)
    n_chunks = (cfg.get("quality") or {}).get("n_chunks")
    return weights, Gate(held_out, block_size, n_chunks), record


def _print_gate(figures: dict[str, Any]) -> None:
    plain, weighted = figures["plain"], figures["imatrix"]
    kept = "with" if figures["kept"] == "imatrix" else "without"
    print(
        f"imatrix gate: mean KLD {plain['kl_mean']:.6g} ± {plain['kl_mean_unc'] or 0:.2g} "
        f"without the matrix, {weighted['kl_mean']:.6g} ± {weighted['kl_mean_unc'] or 0:.2g} "
        f"with it: kept the file {kept} it",
        flush=True,
    )


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the GGUF of ``cfg.ckpt_path`` (and its validation text); prints ``gguf: <path>``
    last. ``cfg`` was checked against EXPORT_RULES by the job wrapper."""
    from ml_engine.run.extras import apply_extras
    from ml_engine.training.checkpoints import checked_checkpoint, module_from_checkpoint
    from ml_engine.training.lm.module import CausalLMModule

    started = time.perf_counter()
    runs_dir = Path(cfg.paths.log_dir) / "train" / "runs"
    # ckpt_path=last: the newest language-model run, wherever classifier runs came after it;
    # the one read of the file: module and validation text come from ``checkpoint``
    ckpt_path, checkpoint = checked_checkpoint(
        cfg.ckpt_path, runs_dir=runs_dir, expected=CausalLMModule, use="export.py"
    )
    apply_extras(cfg)
    run_dir = training_run_dir(ckpt_path)
    name = str(cfg.name) if cfg.get("name") else default_name(run_dir)
    quantization = str(cfg.quantization)
    output = Path(cfg.output) if cfg.get("output") else run_dir / f"{name}-{quantization}.gguf"
    module = module_from_checkpoint(ckpt_path, checkpoint)

    log.info("writing %s (%s) from %s", output, quantization, ckpt_path)
    # the gguf package logs the temp file's name, which is never the file a user gets
    logging.getLogger("gguf").setLevel(logging.WARNING)
    text = validation_text(checkpoint)
    weights, gate, matrix_record = _weights(cfg, module, checkpoint, output, quantization, text)
    write_gguf(
        module,
        output,
        name=name,
        quantization=quantization,
        n_threads=cfg.get("n_threads"),
        weights=weights,
        gate=gate,
    )
    if gate is not None:
        matrix_record.update(gate.figures, used=gate.figures["kept"] == "imatrix")
        _print_gate(gate.figures)
    metrics: dict[str, Any] = {
        "gguf": str(output),
        "name": name,
        "quantization": quantization,
        "file_mb": round(output.stat().st_size / 1e6, 3),
        "n_params": sum(p.numel() for p in module.net.parameters()),
        "context_length": int(module.net.config.block_size),
        "n_vocab": int(module.net.config.vocab_size),
        "ckpt_path": str(ckpt_path),
        "val_text": None,
        "imatrix": matrix_record,
    }
    if text is not None and cfg.get("val_text", True):
        held_out = write_text_atomic(held_out_text_path(output), text)
        metrics.update(val_text=str(held_out), val_chars=len(text))
        print(f"val_text: {held_out}", flush=True)
    metrics["wall_s"] = round(time.perf_counter() - started, 3)
    print(f"gguf: {output}", flush=True)
    return metrics

# ruff: noqa: E501  (METRICS is a table: one metric per line)
"""The fields of a generation job's one-row view, declared once.

``result.json``'s ``metrics``, the sweep summary's columns, the TensorBoard curves and HParams
metrics, the sweep ranking and the line printed after a run are all read off ``METRICS``: adding
a field is one line here. Stdlib only: the entrypoint imports this before any work starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ml_engine.run.helpers import is_finite_number


@dataclass(frozen=True)
class Metric:
    """One field of the row.

    ``source`` is ``<part>.<dotted key>`` in the job's parts: ``setting`` (the resolved ``llm``
    node), ``facts`` (what the backend reports), ``bench`` (aggregates over the repetitions),
    ``tests`` (the first pp and tg test of llama-bench's, ``bench.first_tests``), ``quality``,
    ``work`` (the model worker's own readings). ``spread``: the bench part also
    holds ``<key>_std``, which becomes ``<name>_std`` in the row. ``uncertainty``: the part
    also holds ``<key>_unc``, the ± of a mean as llama-perplexity prints it, which becomes
    ``<name>_unc``. ``curve``: key of each repetition's record, logged per repetition to
    TensorBoard. ``final``: an HParams metric (``hp/<name>``). ``column``: in the sweep summary
    (with its std or ±). ``report``: label in the printed line, its number written with
    ``digits`` in ``style``. ``scale``: factor applied to the source value (bytes → MB, kept to 3
    decimals).
    """

    name: str
    unit: str
    description: str
    source: str
    spread: bool = False
    uncertainty: bool = False
    curve: str | None = None
    final: bool = False
    column: bool = False
    report: str | None = None
    digits: int = 1
    # "f": ``digits`` decimals; "g": ``digits`` significant digits (values over decades)
    style: str = "f"
    scale: float | None = None

    @property
    def std_name(self) -> str:
        return f"{self.name}_std"

    @property
    def unc_name(self) -> str:
        return f"{self.name}_unc"

    @property
    def names(self) -> tuple[str, ...]:
        """The row's keys this metric fills: its own, its std (spread), its ± (uncertainty)."""
        return (
            (self.name,)
            + ((self.std_name,) if self.spread else ())
            + ((self.unc_name,) if self.uncertainty else ())
        )


# fmt: off
METRICS: tuple[Metric, ...] = (
    Metric("model", "", "model config name (conf/llm/model), or a llm.model.path file's general.name (else its stem)", "setting.model.name", column=True),
    Metric("backend", "", "text generation backend", "facts.backend", column=True),
    Metric("quantization", "", "weight format of the GGUF file", "setting.quantization", column=True),
    Metric("n_gpu_layers", "layers", "layers requested on a GPU (-1: all)", "setting.n_gpu_layers", column=True),
    Metric("n_gpu_layers_effective", "layers", "layers on a GPU, as llama.cpp reported", "facts.n_gpu_layers_effective", column=True),
    Metric("compute_backend", "", "ggml backend holding the layers (CPU: none offloaded)", "facts.compute_backend", column=True),
    Metric("gpu_offload_supported", "", "llama.cpp sees a GPU it can offload to", "facts.gpu_offload_supported", column=True),
    Metric("n_threads", "threads", "CPU threads of single-token decodes, as llama.cpp's context got them (null: the physical cores)", "facts.n_threads", column=True),
    Metric("n_threads_batch", "threads", "CPU threads of multi-token (prompt) decodes, as llama.cpp's context got them (null: n_threads)", "facts.n_threads_batch", column=True),
    Metric("n_ctx", "tokens", "context size llama.cpp allocated", "facts.n_ctx"),
    Metric("file_mb", "MB", "size of the GGUF file", "facts.file_size_bytes", scale=1e-6, final=True, column=True),
    Metric("n_params", "", "parameters of the model", "facts.n_params"),
    Metric("load_s", "s", "time to load the model", "facts.load_s"),
    Metric("prompt_tokens", "tokens", "prompt tokens, all repetitions", "bench.prompt_tokens"),
    Metric("completion_tokens", "tokens", "generated tokens, all repetitions", "bench.completion_tokens"),
    Metric("gen/tokens_per_s", "tok/s", "generation rate (wall clock)", "bench.gen_tokens_per_s", spread=True, curve="gen_tokens_per_s", final=True, column=True, report="gen"),
    Metric("prompt/tokens_per_s", "tok/s", "prompt evaluation rate (wall clock)", "bench.prompt_tokens_per_s", spread=True, curve="prompt_tokens_per_s", final=True, column=True, report="prompt"),
    Metric("n_repetitions", "", "measurements behind each mean and std", "bench.n_repetitions"),
    Metric("gen/sampling", "", "greedy (temperature ≤ 0: argmax without llama.cpp's sampler chain) or sampled (llama.cpp's chain)", "bench.sampling", column=True),
    Metric("gen/llama_cpp_tokens_per_s", "tok/s", "generation rate by llama.cpp's counters: decodes ÷ (decode time + the sampler chain's time per sample × decodes; greedy: decode time only)", "bench.llama_cpp_tokens_per_s", spread=True, final=True),
    Metric("gen/vs_llama_cpp", "", "gen/tokens_per_s ÷ gen/llama_cpp_tokens_per_s: the share of llama.cpp's own rate the wall clock sees", "bench.vs_llama_cpp", final=True, column=True),
    # llama-bench's tests (the first of each when bench.n_prompt/n_gen are lists; all in result.json's llama_bench)
    Metric("n_prompt", "tokens", "tokens of the pp test (llama-bench -p)", "tests.n_prompt"),
    Metric("pp/avg_ts", "tok/s", "llama-bench pp test: mean over repetitions of n_prompt ÷ seconds", "tests.pp.avg_ts", spread=True, final=True, column=True),
    Metric("n_gen", "tokens", "tokens of the tg test (llama-bench -n)", "tests.n_gen"),
    Metric("tg/avg_ts", "tok/s", "llama-bench tg test: mean over repetitions of n_gen ÷ seconds", "tests.tg.avg_ts", spread=True, final=True, column=True),
    Metric("gen/decode_counter_tokens_per_s", "tok/s", "generation rate by llama.cpp's decode counters", "bench.decode_counter_tokens_per_s", curve="counters.eval_tokens_per_s", final=True),
    Metric("ttft_s", "s", "time to first token", "bench.ttft_s", spread=True, curve="ttft_s", final=True, column=True, report="ttft", digits=4),
    Metric("peak_rss_mb", "MB", "peak resident memory of the model worker", "work.peak_rss_mb", final=True, column=True, report="peak"),
    Metric("work_s", "s", "time of the model work (load, benchmark, quality)", "work.work_s"),
    Metric("cached", "", "measurement reused from the cache (bench.cache=true): no model was loaded", "work.cached", column=True),
    Metric("chat_template", "", "what chat_template=true did: applied, none in the file, not supported by llama.cpp (or off)", "facts.chat_template", column=True),
    Metric("requantized", "", "made from an already-quantized file (llm.allow_requantize=true)", "facts.requantized", column=True),
    # how the quantized file was made (quantize.*; llm/imatrix_gate.py): quantize.imatrix=auto makes it with and without the matrix and keeps the lower mean KLD; both are kept here
    Metric("tensor_types", "", "per-tensor types the file was made with (quantize.tensor_types, as llama-quantize --tensor-type)", "imatrix.tensor_types_text", column=True),
    Metric("imatrix", "", "the file was made with an importance matrix (quantize.imatrix; with auto, the gate kept it)", "imatrix.used", column=True),
    Metric("imatrix/kl_mean_plain", "nats", "Mean KLD of the file made without the matrix (quantize.imatrix=auto measures both)", "imatrix.plain.kl_mean", uncertainty=True, column=True),
    Metric("imatrix/kl_mean_weighted", "nats", "Mean KLD of the file made with the matrix (quantize.imatrix=auto measures both)", "imatrix.imatrix.kl_mean", uncertainty=True, column=True),
    Metric("imatrix/top1_plain", "", "Same top p of the file made without the matrix", "imatrix.plain.top1_agreement", uncertainty=True),
    Metric("imatrix/top1_weighted", "", "Same top p of the file made with the matrix", "imatrix.imatrix.top1_agreement", uncertainty=True),
    Metric("imatrix/file_mb_plain", "MB", "size of the file made without the matrix", "imatrix.plain.file_mb"),
    Metric("imatrix/file_mb_weighted", "MB", "size of the file made with the matrix", "imatrix.imatrix.file_mb"),
    # llama-perplexity --kl-divergence's figures (llm/kld.py); the comparisons are empty on the base's own row
    Metric("quality/base_quantization", "", "quantization of the base file the comparisons are against", "quality.base_quantization"),
    Metric("quality/positions", "tokens", "scored positions: chunks × (n_ctx - 1 - n_ctx/2)", "quality.positions"),
    Metric("quality/perplexity", "", "Mean PPL(Q): perplexity of this file on the quality text", "quality.perplexity", uncertainty=True, final=True, column=True, report="perplexity", digits=2),
    Metric("quality/reference", "", "this file is the base the others are compared with", "quality.reference", column=True),
    Metric("quality/perplexity_base", "", "Mean PPL(base): the base's perplexity on the same positions", "quality.perplexity_base", uncertainty=True),
    Metric("quality/ln_ppl_correlation", "", "Cor(ln(PPL(Q)), ln(PPL(base))): correlation of the per-position log-likelihoods", "quality.ln_ppl_correlation", final=True, column=True),
    Metric("quality/ln_ppl_ratio", "", "Mean ln(PPL(Q)/PPL(base))", "quality.ln_ppl_ratio", uncertainty=True),
    Metric("quality/ppl_ratio", "", "Mean PPL(Q)/PPL(base)", "quality.ppl_ratio", uncertainty=True, final=True, column=True),
    Metric("quality/ppl_diff", "", "Mean PPL(Q)-PPL(base)", "quality.ppl_diff", uncertainty=True),
    Metric("quality/kl_mean", "nats", "Mean KLD: KL(base ‖ this file) over the vocabulary, mean over positions", "quality.kl_mean", uncertainty=True, final=True, column=True, report="KLD", digits=3, style="g"),
    Metric("quality/kl_max", "nats", "Maximum KLD", "quality.kl_max", final=True, column=True),
    Metric("quality/kl_p99_9", "nats", "99.9% KLD (percentile over positions)", "quality.kl_p99_9"),
    Metric("quality/kl_p99", "nats", "99.0% KLD", "quality.kl_p99", final=True, column=True),
    Metric("quality/kl_p95", "nats", "95.0% KLD", "quality.kl_p95"),
    Metric("quality/kl_p90", "nats", "90.0% KLD", "quality.kl_p90"),
    Metric("quality/kl_median", "nats", "Median KLD", "quality.kl_median"),
    Metric("quality/kl_p10", "nats", "10.0% KLD", "quality.kl_p10"),
    Metric("quality/kl_p5", "nats", "5.0% KLD", "quality.kl_p5"),
    Metric("quality/kl_p1", "nats", "1.0% KLD", "quality.kl_p1"),
    Metric("quality/kl_p0_1", "nats", "0.1% KLD", "quality.kl_p0_1"),
    Metric("quality/kl_min", "nats", "Minimum KLD", "quality.kl_min"),
    Metric("quality/dp_mean", "", "Mean Δp: probability of the actual next token, this file minus the base", "quality.dp_mean", uncertainty=True, final=True, column=True),
    Metric("quality/dp_max", "", "Maximum Δp", "quality.dp_max"),
    Metric("quality/dp_p99_9", "", "99.9% Δp", "quality.dp_p99_9"),
    Metric("quality/dp_p99", "", "99.0% Δp", "quality.dp_p99"),
    Metric("quality/dp_p95", "", "95.0% Δp", "quality.dp_p95"),
    Metric("quality/dp_p90", "", "90.0% Δp", "quality.dp_p90"),
    Metric("quality/dp_p75", "", "75.0% Δp", "quality.dp_p75"),
    Metric("quality/dp_median", "", "Median Δp", "quality.dp_median"),
    Metric("quality/dp_p25", "", "25.0% Δp", "quality.dp_p25"),
    Metric("quality/dp_p10", "", "10.0% Δp", "quality.dp_p10"),
    Metric("quality/dp_p5", "", "5.0% Δp", "quality.dp_p5"),
    Metric("quality/dp_p1", "", "1.0% Δp", "quality.dp_p1"),
    Metric("quality/dp_p0_1", "", "0.1% Δp", "quality.dp_p0_1"),
    Metric("quality/dp_min", "", "Minimum Δp", "quality.dp_min"),
    Metric("quality/dp_rms", "", "RMS Δp", "quality.dp_rms", uncertainty=True, final=True, column=True),
    Metric("quality/top1_agreement", "", "Same top p: share of positions where this file and the base rank the same token first", "quality.top1_agreement", uncertainty=True, final=True, column=True),
)
# fmt: on

# what the sweep ranks by and judges noise with, and the job-record field shown beside it
RANKING = "gen/tokens_per_s"
SAMPLES = "n_repetitions"
JOB_COLUMNS = ("wall_s",)

_BY_NAME = {metric.name: metric for metric in METRICS}


def metric(name: str) -> Metric:
    """The declared metric ``name`` (a misspelt name fails where it is written, at import)."""
    return _BY_NAME[name]


def std_of(name: str) -> str | None:
    """The row key of ``name``'s std over the repetitions, when it has one."""
    declared = _BY_NAME.get(name)
    return declared.std_name if declared is not None and declared.spread else None


def metric_names() -> list[str]:
    """Every key of the row, std keys included, in declaration order."""
    return [name for m in METRICS for name in m.names]


def summary_columns() -> list[str]:
    """The sweep summary's columns (Hydra instantiates this for the summary callback)."""
    return [name for m in METRICS if m.column for name in m.names] + list(JOB_COLUMNS)


def definitions() -> dict[str, dict[str, str]]:
    """``name → {unit, description}`` for every key of the row, written beside the values."""
    table = {}
    for m in METRICS:
        table[m.name] = {"unit": m.unit, "description": m.description}
        if m.spread:
            table[m.std_name] = {"unit": m.unit, "description": f"sample std of {m.name}"}
        if m.uncertainty:
            table[m.unc_name] = {
                "unit": m.unit,
                "description": f"± of {m.name}, as llama-perplexity computes it",
            }
    return table


def descriptions() -> dict[str, str]:
    """``name → "description (unit)"``, for tooltips."""
    return {
        name: f"{d['description']} ({d['unit']})" if d["unit"] else d["description"]
        for name, d in definitions().items()
    }


def _lookup(parts: Mapping[str, Any], path: str) -> Any:
    value: Any = parts
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def row_of(parts: Mapping[str, Any]) -> dict[str, Any]:
    """The job's row from its parts (see ``Metric.source``); missing values are None."""
    values: dict[str, Any] = {}
    for m in METRICS:
        value = _lookup(parts, m.source)
        if m.scale is not None:
            value = round(value * m.scale, 3) if is_finite_number(value) and value else None
        values[m.name] = value
        if m.spread:
            values[m.std_name] = _lookup(parts, m.source + "_std")
        if m.uncertainty:
            values[m.unc_name] = _lookup(parts, m.source + "_unc")
    return values


def curve_points(repetitions: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One ``{name: value}`` per repetition, for the metrics logged as curves."""
    curves = [m for m in METRICS if m.curve]
    return [{m.name: _lookup(rep, m.curve) for m in curves} for rep in repetitions]


def final_metrics(values: Mapping[str, Any]) -> dict[str, Any]:
    """The row's final metrics (TensorBoard writes the finite ones under ``hp/<name>``)."""
    return {name: values.get(name) for m in METRICS if m.final for name in m.names}


def report_text(values: Mapping[str, Any]) -> str:
    """``gen 2331.9 ± 72.1 tok/s, ttft 0.0399 ± 0.0012 s, …``: the metrics with a label."""

    def number(value: Any, m: Metric) -> str:
        return f"{value:.{m.digits}{m.style}}" if is_finite_number(value) else "n/a"

    pieces = []
    for m in METRICS:
        if m.report is None:
            continue
        value = values.get(m.name)
        if m.uncertainty and value is None:
            continue  # a comparison the row does not have (the reference's KLD): left out
        text = f"{m.report} {number(value, m)}"
        if m.spread:
            text += f" ± {number(values.get(m.std_name), m)}"
        if m.uncertainty and values.get(m.unc_name) is not None:
            text += f" ± {number(values.get(m.unc_name), m)}"
        pieces.append(f"{text} {m.unit}".rstrip())
    return ", ".join(pieces)

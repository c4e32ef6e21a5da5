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
    ``quality``, ``work`` (the model worker's own readings). ``spread``: the bench part also
    holds ``<key>_std``, which becomes ``<name>_std`` in the row. ``curve``: key of each
    repetition's record, logged per repetition to TensorBoard. ``final``: an HParams metric
    (``hp/<name>``). ``column``: in the sweep summary. ``report``: label in the printed line.
    ``scale``: factor applied to the source value (bytes → MB, kept to 3 decimals).
    """

    name: str
    unit: str
    description: str
    source: str
    spread: bool = False
    curve: str | None = None
    final: bool = False
    column: bool = False
    report: str | None = None
    digits: int = 1
    scale: float | None = None

    @property
    def std_name(self) -> str:
        return f"{self.name}_std"

    @property
    def names(self) -> tuple[str, ...]:
        """The row's keys this metric fills: its own, and its std when it has a spread."""
        return (self.name, self.std_name) if self.spread else (self.name,)


# fmt: off
METRICS: tuple[Metric, ...] = (
    Metric("model", "", "model config name (conf/llm/model)", "setting.model.name", column=True),
    Metric("backend", "", "text generation backend", "facts.backend", column=True),
    Metric("quantization", "", "weight format of the GGUF file", "setting.quantization", column=True),
    Metric("n_gpu_layers", "layers", "layers requested on a GPU (-1: all)", "setting.n_gpu_layers", column=True),
    Metric("n_gpu_layers_effective", "layers", "layers on a GPU, as llama.cpp reported", "facts.n_gpu_layers_effective", column=True),
    Metric("compute_backend", "", "ggml backend holding the layers (CPU: none offloaded)", "facts.compute_backend", column=True),
    Metric("gpu_offload_supported", "", "llama.cpp sees a GPU it can offload to", "facts.gpu_offload_supported", column=True),
    Metric("n_threads", "threads", "CPU threads llama.cpp used", "facts.n_threads"),
    Metric("n_ctx", "tokens", "context size llama.cpp allocated", "facts.n_ctx"),
    Metric("file_mb", "MB", "size of the GGUF file", "facts.file_size_bytes", scale=1e-6, final=True, column=True),
    Metric("n_params", "", "parameters of the model", "facts.n_params"),
    Metric("load_s", "s", "time to load the model", "facts.load_s"),
    Metric("prompt_tokens", "tokens", "prompt tokens, all repetitions", "bench.prompt_tokens"),
    Metric("completion_tokens", "tokens", "generated tokens, all repetitions", "bench.completion_tokens"),
    Metric("gen/tokens_per_s", "tok/s", "generation rate (wall clock)", "bench.gen_tokens_per_s", spread=True, curve="gen_tokens_per_s", final=True, column=True, report="gen"),
    Metric("prompt/tokens_per_s", "tok/s", "prompt evaluation rate (wall clock)", "bench.prompt_tokens_per_s", spread=True, curve="prompt_tokens_per_s", final=True, column=True, report="prompt"),
    Metric("n_repetitions", "", "measurements behind each mean and std", "bench.n_repetitions"),
    Metric("gen/decode_counter_tokens_per_s", "tok/s", "generation rate by llama.cpp's decode counters", "bench.decode_counter_tokens_per_s", curve="counters.eval_tokens_per_s", final=True),
    Metric("ttft_s", "s", "time to first token", "bench.ttft_s", spread=True, curve="ttft_s", final=True, column=True, report="ttft", digits=4),
    Metric("peak_rss_mb", "MB", "peak resident memory of the model worker", "work.peak_rss_mb", final=True, column=True, report="peak"),
    Metric("work_s", "s", "time of the model work (load, benchmark, quality)", "work.work_s"),
    Metric("quality/perplexity", "", "perplexity on the reference text", "quality.perplexity", final=True, column=True, report="perplexity", digits=2),
    Metric("quality/reference", "", "this file is the base the others are compared with", "quality.reference", column=True),
    Metric("quality/top1_agreement", "", "share of positions with the base's top token", "quality.top1_agreement", final=True, column=True),
    Metric("quality/kl_mean", "nats", "mean KL(base ‖ this file) per position", "quality.kl_mean", final=True, column=True),
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

    def number(value: Any, digits: int) -> str:
        return f"{value:.{digits}f}" if is_finite_number(value) else "n/a"

    pieces = []
    for m in METRICS:
        if m.report is None:
            continue
        text = f"{m.report} {number(values.get(m.name), m.digits)}"
        if m.spread:
            text += f" ± {number(values.get(m.std_name), m.digits)}"
        pieces.append(f"{text} {m.unit}".rstrip())
    return ", ".join(pieces)

"""A generation job's pp/tg tests written as llama-bench writes them (``-o md|csv|json|jsonl``).

One row per test (pp512, tg128, …) with llama-bench's field names wherever the meaning is the
same, so a file from here and one from ``llama-bench -o json`` can be read by the same script;
fields of our own come after them (``EXTRA_FIELDS``). Stdlib only: the config rules import
``FORMATS`` before any work starts.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_engine.run.files import write_text_atomic

FORMATS = ("md", "csv", "json", "jsonl")

# llama-bench's fields (tools/llama-bench, test::get_fields), in its order, those this job has
LLAMA_BENCH_FIELDS = (
    "build_commit",
    "build_number",
    "cpu_info",
    "gpu_info",
    "backends",
    "model_filename",
    "model_type",
    "model_size",
    "model_n_params",
    "n_batch",
    "n_ubatch",
    "n_threads",
    "type_k",
    "type_v",
    "n_gpu_layers",
    "flash_attn",
    "use_mmap",
    "n_prompt",
    "n_gen",
    "n_depth",
    "test_time",
    "avg_ns",
    "stddev_ns",
    "avg_ts",
    "stddev_ts",
)
# json and jsonl end each row with these, as llama-bench does; its csv has neither
SAMPLE_FIELDS = ("samples_ns", "samples_ts")
EXTRA_FIELDS = (
    "test",
    "our_model",
    "quantization",
    "n_threads_batch",
    "llama_cpp_avg_ts",
    "vs_llama_cpp",
    "ttft_s",
    "load_s",
    "peak_rss_mb",
    "kl_mean",
    "ppl",
)
FIELDS = LLAMA_BENCH_FIELDS + SAMPLE_FIELDS + EXTRA_FIELDS

# the facts of result.json that are llama-bench fields under another name
_FROM_FACTS = {
    "model_filename": "model_path",
    "model_type": "model_description",
    "model_n_params": "n_params",
    "n_gpu_layers": "n_gpu_layers_requested",
}
_FROM_METRICS = {
    "our_model": "model",
    "quantization": "quantization",
    "ttft_s": "ttft_s",
    "load_s": "load_s",
    "peak_rss_mb": "peak_rss_mb",
    "kl_mean": "quality/kl_mean",
    "ppl": "quality/perplexity",
}


def rows_of(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per llama-bench test of a job's ``result.json``, fields in ``FIELDS`` order."""
    metrics = result.get("metrics") or {}
    rows = []
    for test in result.get("llama_bench") or []:
        values: dict[str, Any] = {}
        for field in FIELDS:
            if field in test:
                values[field] = test[field]
            elif field in _FROM_METRICS:
                values[field] = metrics.get(_FROM_METRICS[field])
            else:
                values[field] = result.get(_FROM_FACTS.get(field, field))
        # llama-bench writes the requested flash_attn as its enum: -1 auto, 0 off, 1 on
        requested = result.get("flash_attn_requested", values["flash_attn"])
        values["flash_attn"] = _FLASH_ATTN_ENUM.get(requested, requested)
        rows.append(values)
    return rows


_FLASH_ATTN_ENUM = {"auto": -1, "off": 0, "on": 1, False: 0, True: 1}


def render(rows: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """``rows`` in ``fmt`` (one of ``FORMATS``)."""
    if fmt == "md":
        return markdown(rows)
    if fmt == "csv":
        return _csv(rows)
    if fmt == "json":
        return json.dumps([dict(r) for r in rows], indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(dict(r)) + "\n" for r in rows)
    raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")


def write_formats(
    directory: Path, rows: Sequence[Mapping[str, Any]], formats: Iterable[str]
) -> list[Path]:
    """``llama-bench.<fmt>`` in ``directory`` for each format."""
    paths = []
    for fmt in formats:
        path = Path(directory) / f"llama-bench.{fmt}"
        write_text_atomic(path, render(rows, fmt))
        paths.append(path)
    return paths


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)  # llama-bench's csv writes std::to_string(bool): 0 or 1
    return "" if value is None else value


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    fields = [f for f in FIELDS if f not in SAMPLE_FIELDS]
    buffer = io.StringIO()
    # llama-bench quotes every value
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n")
    buffer.write(",".join(fields) + "\n")  # its header is not quoted
    for row in rows:
        writer.writerow([_csv_value(row.get(f)) for f in fields])
    return buffer.getvalue()


# ------------------------------------------------------------------- llama-bench's markdown table

# column → (header, width); a negative width is left-aligned (llama-bench's markdown_printer)
_COLUMNS = {
    "model": ("model", -30),
    "size": ("size", 10),
    "params": ("params", 10),
    "backend": ("backend", -10),
    "n_gpu_layers": ("ngl", 3),
    "n_threads": ("threads", 7),
    "test": ("test", 15),
    "t/s": ("t/s", 20),
}


def _size(n_bytes: Any) -> str:
    if not isinstance(n_bytes, int):
        return "?"
    if n_bytes < 1024**3:
        return f"{n_bytes / 1024 / 1024:.2f} MiB"
    return f"{n_bytes / 1024**3:.2f} GiB"


def _params(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _cell(column: str, row: Mapping[str, Any]) -> str:
    if column == "model":
        return str(row.get("model_type") or "")
    if column == "size":
        return _size(row.get("model_size"))
    if column == "params":
        return _params(row.get("model_n_params"))
    if column == "backend":
        return str(row.get("backends") or "")
    if column == "t/s":
        return f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f}"
    return str(row.get(column, ""))


def _is_cpu(rows: Sequence[Mapping[str, Any]]) -> bool:
    backends = {str(r.get("backends") or "CPU") for r in rows}
    return all(any(k in b for k in ("CPU", "BLAS")) for b in backends)


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """llama-bench's default output: ``| model | size | params | backend | threads | test |
    t/s |`` (ngl after backend when the layers can go to a GPU), then its build line."""
    columns = ["model", "size", "params", "backend"]
    columns += [] if _is_cpu(rows) else ["n_gpu_layers"]
    columns += ["n_threads", "test", "t/s"]
    lines = [
        "|" + "".join(f" {_pad(_COLUMNS[c][0], _COLUMNS[c][1])} |" for c in columns),
        "|" + "".join(f" {_rule(_COLUMNS[c][1])} |" for c in columns),
    ]
    for row in rows:
        lines.append("|" + "".join(f" {_pad(_cell(c, row), _COLUMNS[c][1])} |" for c in columns))
    return "\n".join(lines) + "\n\n" + _build_line(rows) + "\n"


def _pad(text: str, width: int) -> str:
    return text.ljust(-width) if width < 0 else text.rjust(width)


def _rule(width: int) -> str:
    return "-" * (abs(width) - 1) + (":" if width > 0 else "-")


def _build_line(rows: Sequence[Mapping[str, Any]]) -> str:
    row = rows[0] if rows else {}
    number = row.get("build_number")
    return (
        f"build: {row.get('build_commit', 'unknown')} ({'unknown' if number is None else number})"
    )

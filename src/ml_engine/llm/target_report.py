"""The verdict of a target search: the printed lines, ``search.md``/``search.json`` in the sweep
dir, and the commands that run the winner in llama.cpp's tools, in ``generate.py`` and in our
server."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_engine.llm.backends.llama_cpp import flash_attn_choice
from ml_engine.llm.target_search import (
    CPU_ONLY_NOTE,
    Probe,
    Target,
    Verdict,
    meets,
    misses,
)
from ml_engine.run.files import write_json_atomic, write_text_atomic
from ml_engine.run.helpers import is_finite_number


def shown_path(path: str | Path) -> str:
    """Relative to the current folder when inside it (a repo's ``models/…``), else absolute."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if is_finite_number(value) else "n/a"


def speed_text(probe: Probe, target: Target) -> str:
    spread = f" ± {_number(probe.speed_std, '.1f')}" if probe.speed_std is not None else ""
    return f"{_number(probe.speed, '.1f')}{spread} {target.unit}"


def quality_text(probe: Probe) -> str:
    if probe.kld == 0 and probe.ppl_ratio == 1:
        return "KLD 0 (the base file)"
    parts = [f"KLD {_number(probe.kld, '.3g')}"]
    if probe.ppl_increase_pct is not None:
        parts.append(f"PPL {probe.ppl_increase_pct:+.2f} %")
    return ", ".join(parts)


def probe_line(probe: Probe, target: Target) -> str:
    cached = " (cached)" if probe.cached else ""
    outcome = (
        "meets the target"
        if meets(probe, target)
        else "; ".join(m.describe(target.unit) for m in misses(probe, target))
    )
    return f"{probe.label}: {speed_text(probe, target)}, {quality_text(probe)}{cached} → {outcome}"


def verdict_line(verdict: Verdict) -> str:
    target = verdict.target
    if verdict.winner is not None:
        winner = verdict.winner
        return (
            f"MEETS TARGET: {winner.label} at {speed_text(winner, target)}, {quality_text(winner)}"
        )
    line = f"NO CONFIG MEETS IT ({target.describe()})"
    closest = verdict.closest
    if closest is None:
        return line
    missed = "; ".join(m.describe(target.unit) for m in misses(closest, target))
    return (
        f"{line}; closest: {closest.label} at {speed_text(closest, target)}, "
        f"{quality_text(closest)}: {missed}"
    )


@dataclass(frozen=True)
class RunContext:
    """What the commands need besides the winner: the run settings and how the model was named."""

    llm: Mapping[str, Any]  # the resolved llm node
    prompt: str
    model_choice: str | None  # the llm/model option (a server model name)
    given_file: str | None  # llm.model.path, when the model is a file
    user_overrides: Sequence[str]  # the command line's settings, for the generate.py equivalent
    models_dir_override: str | None


def _flag_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def llama_cpp_flags(probe: Probe, llm: Mapping[str, Any]) -> list[str]:
    threads = probe.n_threads_used or probe.setting.n_threads
    flags = ["-ngl", str(probe.setting.n_gpu_layers)]
    if threads:
        flags += ["-t", str(threads)]
    batch = str(llm.get("n_batch", 512))
    # our backend runs n_ubatch = n_batch (llama_cpp.Llama's default)
    flags += ["-c", str(llm.get("n_ctx")), "-b", batch, "-ub", batch]
    flags += ["-fa", flash_attn_choice(llm.get("flash_attn"))]
    return flags


def _sampling_flags(llm: Mapping[str, Any]) -> list[str]:
    flags = ["-n", str(llm.get("max_tokens"))]
    for flag, key in (
        ("--temp", "temperature"),
        ("--top-k", "top_k"),
        ("--top-p", "top_p"),
        ("--repeat-penalty", "repeat_penalty"),
        ("--seed", "seed"),
    ):
        if llm.get(key) is not None:
            flags += [flag, _flag_value(llm[key])]
    return flags


def _kept_overrides(overrides: Sequence[str]) -> list[str]:
    """The command line's own settings that shape a run, without the search's."""
    skipped = ("hparams_search=", "llm.target.", "llm.model.path=", "hydra.", "paths.log_dir=")
    return [o for o in overrides if not o.lstrip("+~").startswith(skipped)]


def commands(probe: Probe, context: RunContext) -> dict[str, str]:
    """The exact commands that run ``probe``'s setting."""
    llm = context.llm
    file = shown_path(probe.file) if probe.file else "<file>"
    quoted = shlex.quote(file)
    flags = llama_cpp_flags(probe, llm)
    ignore_eos = ["--ignore-eos"] if (llm.get("model") or {}).get("ignore_eos") else []
    threads = probe.n_threads_used or probe.setting.n_threads
    generate = [f"llm.model.path={quoted}"]
    if threads:
        generate.append(f"llm.n_threads={threads}")
    generate += [f"llm.n_gpu_layers={probe.setting.n_gpu_layers}", f"llm.n_ctx={llm.get('n_ctx')}"]
    kept = [o for o in _kept_overrides(context.user_overrides) if not o.startswith("llm.n_ctx=")]
    found = {
        "llama-server": " ".join(["llama-server", "-m", quoted, *flags, "--port", "8080"]),
        "llama-cli": " ".join(
            [
                "llama-cli",
                "-m",
                quoted,
                *flags,
                *_sampling_flags(llm),
                *ignore_eos,
                "-no-cnv",
                "-p",
                shlex.quote(context.prompt),
            ]
        ),
        "generate.py": " ".join(["python generate.py", *generate, *(shlex.quote(o) for o in kept)]),
    }
    found.update(_server_commands(probe, context))
    return found


def _server_commands(probe: Probe, context: RunContext) -> dict[str, str]:
    """``serve.py`` serves configured models by name and files under ``llm.exports_dir``
    (``<dir>/*/*.gguf``, by stem); a request names the quantization and layers, not threads."""
    serve = ["python serve.py"]
    if context.models_dir_override:
        serve.append(shlex.quote(context.models_dir_override))
    if context.given_file:
        given = Path(context.given_file).resolve()
        serve.append(f"llm.exports_dir={shlex.quote(shown_path(given.parent.parent))}")
        model = given.stem
    else:
        model = context.model_choice or "tiny"
    body: dict[str, Any] = {"model": model}
    if probe.quantization:
        body["quantization"] = probe.quantization
    body.update(
        n_gpu_layers=probe.setting.n_gpu_layers,
        n_ctx=context.llm.get("n_ctx"),
        max_tokens=context.llm.get("max_tokens"),
        prompt=context.prompt,
    )
    import json

    request = (
        "curl -s -X POST localhost:18080/llm/generate -H 'Content-Type: application/json' -d "
        + shlex.quote(json.dumps(body, ensure_ascii=False))
    )
    return {"serve.py": " ".join(serve), "request": request}


def verdict_lines(verdict: Verdict, context: RunContext) -> list[str]:
    lines = [verdict_line(verdict)]
    if verdict.winner is not None:
        winner = verdict.winner
        if winner.file:
            lines.append(f"file: {shown_path(winner.file)}")
        lines.append("run it:")
        lines += [f"  {command}" for command in commands(winner, context).values()]
        lines.append(
            "  (a server request names no threads: the server runs the physical-core default)"
        )
    lines += [f"note: {note}" for note in verdict.notes]
    return lines


def _probe_record(probe: Probe, target: Target) -> dict[str, Any]:
    return {
        "job": probe.job,
        "quantization": probe.quantization or probe.setting.quantization,
        "n_threads": probe.n_threads_used or probe.setting.n_threads,
        "n_threads_requested": probe.setting.n_threads,
        "n_gpu_layers": probe.setting.n_gpu_layers,
        target.metric: probe.speed,
        f"{target.metric}_std": probe.speed_std,
        "kl_mean": probe.kld,
        "ppl_ratio": probe.ppl_ratio,
        "ppl_increase_pct": probe.ppl_increase_pct,
        "cached": probe.cached,
        "file": probe.file,
        "meets": meets(probe, target),
        "misses": [m.describe(target.unit) for m in misses(probe, target)],
    }


def _table(verdict: Verdict) -> str:
    target = verdict.target
    header = ["job", "quantization", "n_threads", "n_gpu_layers", target.metric, "KLD", "PPL %"]
    header += ["cached", "result"]
    rows = []
    for probe in verdict.probes:
        record = _probe_record(probe, target)
        result = "meets" if record["meets"] else "; ".join(record["misses"])
        cells = [
            Path(record["job"]).name if record["job"] else "",
            record["quantization"],
            record["n_threads"],
            record["n_gpu_layers"],
            speed_text(probe, target),
            _number(probe.kld, ".3g"),
            _number(probe.ppl_increase_pct, "+.2f"),
            "yes" if probe.cached else "",
            result,
        ]
        rows.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows])


def write_verdict(
    sweep_dir: Path, verdict: Verdict, context: RunContext, header: Sequence[str]
) -> Path:
    """``search.md`` (for people) and ``search.json`` (for programs), each whole or not at all."""
    lines = verdict_lines(verdict, context)
    markdown = [f"# Target search: {sweep_dir.name}", "", *(f"{h}  " for h in header), ""]
    markdown += ["## Verdict", "", "```", *lines, "```", "", "## Measured", "", _table(verdict)]
    write_text_atomic(sweep_dir / "search.md", "\n".join(markdown) + "\n")
    target = verdict.target
    chosen = verdict.winner or verdict.closest
    write_json_atomic(
        sweep_dir / "search.json",
        {
            "verdict": "meets" if verdict.meets else "no_config_meets",
            "line": lines[0],
            "target": {
                "metric": target.metric,
                "tokens_per_s": target.tokens_per_s,
                "max_kld": target.max_kld,
                "max_ppl_increase_pct": target.max_ppl_increase_pct,
            },
            "gpu_offload": verdict.offload,
            "gpu_note": None if verdict.offload else CPU_ONLY_NOTE,
            "winner": _probe_record(verdict.winner, target) if verdict.winner else None,
            "closest": None if verdict.meets or chosen is None else _probe_record(chosen, target),
            "commands": commands(verdict.winner, context) if verdict.winner else None,
            "notes": verdict.notes,
            "jobs": len(verdict.probes),
            "cached_jobs": sum(p.cached for p in verdict.probes),
            "probes": [_probe_record(p, target) for p in verdict.probes],
            "cwd": os.getcwd(),
        },
    )
    return sweep_dir / "search.md"

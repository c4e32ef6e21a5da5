"""Quantizations of our own language models with and without an importance matrix, the size-budget
search's pick against the uniform types of its size, and llama.cpp's llama-perplexity on the same
files.

    python bench/imatrix_quality.py                        # both experiments, ~15 min on 2 cores
    python bench/imatrix_quality.py --experiments shakespeare_char --budgets 4.5

Per experiment (``experiment=shakespeare_char`` and ``shakespeare_char_long``): train it as a
user does (``python train.py experiment=<name>``), export the f32 GGUF (``python export.py``,
which writes the validation split beside it and the importance matrix collected from the training
split by forward hooks), then for each of q2_k, q3_k_m, q4_0, q4_k_m, q5_k_m and q6_k make the
file without and with the matrix (llama.cpp's quantizer in process) and compare each with the f32
file on every chunk of the held-out validation text (chunks of the trained context, their second
halves scored, as ``llama-perplexity --kl-divergence``). ``llama-perplexity`` itself
(``bench/build-llama-tools``) then measures the q4_0 and q2_k files again: its Mean KLD and Same
top p must equal ours. Last, ``python quantize.py`` searches per-tensor types to each budget.

Prints the tables (markdown) and writes everything to ``<out>/imatrix_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import ROOT

QUANTIZATIONS = ("q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
CHECKED_WITH_LLAMA_PERPLEXITY = ("q4_0", "q2_k")


def run(command: list[str], log: Path) -> str:
    """Run a repo entrypoint; its output goes to ``log``; the last line is returned."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    print(f"  {' '.join(command[:3])} … {time.perf_counter() - started:.0f} s", flush=True)
    return done.stdout.strip().splitlines()[-1]


def train_and_export(experiment: str, out: Path) -> tuple[Path, float]:
    outputs = out / experiment
    last = run(
        [sys.executable, "train.py", f"experiment={experiment}", f"paths.log_dir={outputs}"],
        out / f"{experiment}.train.log",
    )
    run_dir = Path(last.removeprefix("run_dir: "))
    job = json.loads((run_dir / "job.json").read_text())
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    gguf = run(
        [sys.executable, "export.py", f"ckpt_path={ckpt}", f"paths.log_dir={outputs}"],
        out / f"{experiment}.export.log",
    )
    return Path(gguf.removeprefix("gguf: ")), float(job["metrics"]["val/loss_best"])


def with_and_without(
    f32: Path, out: Path, n_ctx: int, n_chunks: int | None
) -> list[dict[str, Any]]:
    from ml_engine.llm.gguf_writer import held_out_text_path
    from ml_engine.llm.imatrix import matrix_beside, read_imatrix
    from ml_engine.llm.imatrix_gate import gate_files
    from ml_engine.llm.quantize import bits_per_weight, quantize_gguf

    matrix = read_imatrix(matrix_beside(f32))
    rows = []
    for quantization in QUANTIZATIONS:
        plain = quantize_gguf(f32, out / f"{quantization}.gguf", quantization)
        weighted = quantize_gguf(
            f32,
            out / f"{quantization}.imatrix.gguf",
            quantization,
            imatrix=matrix,
            imatrix_label=str(matrix_beside(f32)),
        )
        kept, figures = gate_files(
            {"plain": plain, "imatrix": weighted},
            f32,
            held_out_text_path(f32),
            n_ctx=n_ctx,
            n_chunks=n_chunks,
            work_dir=out,
        )
        rows.append(
            {
                "quantization": quantization,
                "bpw": round(bits_per_weight(plain), 3),
                "kept": kept,
                **{f"{label}_{k}": v for label, f in figures.items() for k, v in f.items()},
                "ratio": figures["imatrix"]["kl_mean"] / figures["plain"]["kl_mean"],
            }
        )
        print(f"  {quantization}: ratio {rows[-1]['ratio']:.3f}", flush=True)
    return rows


_KLD = re.compile(r"Mean\s+KLD:\s+([-\d.e]+)\s+±\s+([-\d.e]+)")
_TOP = re.compile(r"Same top p:\s+([-\d.e]+)\s+±\s+([-\d.e]+)")


def llama_perplexity(
    f32: Path, files: dict[str, Path], out: Path, n_ctx: int, n_chunks: int | None
) -> dict[str, Any]:
    """llama-perplexity --kl-divergence's Mean KLD and Same top p for each file."""
    from ml_engine.llm.gguf_writer import held_out_text_path

    tools = subprocess.run(
        ["bash", str(ROOT / "bench" / "build-llama-tools")], capture_output=True, text=True
    )
    if tools.returncode != 0:
        sys.exit(tools.stderr[-2000:])
    binary = Path(tools.stdout.strip().splitlines()[-1]) / "llama-perplexity"
    base = out / "base.kld"
    text = held_out_text_path(f32)
    common = [
        "-f",
        str(text),
        "-c",
        str(n_ctx),
        "-b",
        str(n_ctx),
        "--kl-divergence-base",
        str(base),
    ]
    if n_chunks:
        common += ["--chunks", str(n_chunks)]
    subprocess.run([binary, "-m", str(f32), *common], capture_output=True, check=True)
    found = {}
    for label, path in files.items():
        done = subprocess.run(
            [binary, "-m", str(path), *common, "--kl-divergence"],
            capture_output=True,
            text=True,
            check=True,
        )
        output = done.stdout + done.stderr
        kld, top = _KLD.search(output), _TOP.search(output)
        found[label] = {
            "kl_mean": float(kld.group(1)),
            "kl_mean_unc": float(kld.group(2)),
            "top1_agreement_pct": float(top.group(1)),
            "top1_agreement_unc_pct": float(top.group(2)),
        }
    return found


def budget_search(
    f32: Path, budget: float, out: Path, n_ctx: int, n_chunks: int | None
) -> dict[str, Any]:
    from ml_engine.llm.gguf_writer import held_out_text_path

    last = run(
        [
            sys.executable,
            "quantize.py",
            f"model_path={f32}",
            f"budget={budget}",
            f"text_path={held_out_text_path(f32)}",
            f"n_ctx={n_ctx}",
            f"n_chunks={n_chunks or 'null'}",
            f"paths.log_dir={out}",
        ],
        out / f"budget-{budget}.log",
    )
    return json.loads((Path(last.removeprefix("gguf: ")).parent / "budget.json").read_text())


def markdown(experiment: str, val_loss: float, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"### {experiment} (val loss {val_loss:.4f})",
        "",
        "| type | MB | bpw | mean KLD, no imatrix | mean KLD, imatrix | ratio | same top p, "
        "no imatrix | same top p, imatrix | gate keeps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['quantization']} | {r['plain_file_mb']:.3f} | {r['bpw']:.2f} "
            f"| {r['plain_kl_mean']:.6f} ± {r['plain_kl_mean_unc']:.6f} "
            f"| {r['imatrix_kl_mean']:.6f} ± {r['imatrix_kl_mean_unc']:.6f} | {r['ratio']:.3f} "
            f"| {100 * r['plain_top1_agreement']:.2f} ± "
            f"{100 * r['plain_top1_agreement_unc']:.2f} % "
            f"| {100 * r['imatrix_top1_agreement']:.2f} ± "
            f"{100 * r['imatrix_top1_agreement_unc']:.2f} % | {r['kept']} |"
        )
    return "\n".join(lines)


def perplexity_markdown(rows: list[dict[str, Any]], theirs: dict[str, Any]) -> str:
    ours = {r["quantization"]: r for r in rows}
    lines = [
        "| file | llama-perplexity Mean KLD | ours | llama-perplexity Same top p | ours |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, figures in theirs.items():
        quantization, _, weighted = label.partition(".")
        side = "imatrix" if weighted else "plain"
        mine = ours[quantization]
        lines.append(
            f"| {label} | {figures['kl_mean']:.6f} ± {figures['kl_mean_unc']:.6f} "
            f"| {mine[f'{side}_kl_mean']:.6f} ± {mine[f'{side}_kl_mean_unc']:.6f} "
            f"| {figures['top1_agreement_pct']:.3f} ± {figures['top1_agreement_unc_pct']:.3f} % "
            f"| {100 * mine[f'{side}_top1_agreement']:.3f} ± "
            f"{100 * mine[f'{side}_top1_agreement_unc']:.3f} % |"
        )
    return "\n".join(lines)


def budget_markdown(budgets: dict[str, Any]) -> str:
    lines = [
        "| budget | mix MB | mix bpw | mix mean KLD | predicted | uniform just below | "
        "uniform just above | types (embd, q, k, v, attn_out, gate, up, down, output) |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for budget, result in budgets.items():
        table = result["table"]
        mix = next(row for row in table if row["label"] == "mix")
        below = next((r for r in table if r.get("note") == "just below the mix"), None)
        above = next((r for r in table if r.get("note") == "just above the mix"), None)

        def uniform(row: dict[str, Any] | None, mix: dict[str, Any] = mix) -> str:
            if row is None:
                return "–"
            ratio = mix["kl_mean"] / row["kl_mean"]
            return f"{row['label']} {row['bpw']:.2f} bpw: {row['kl_mean']:.6f} (mix {ratio:.2f}×)"

        choice = result["mix"]["choice"]
        lines.append(
            f"| {budget} bpw | {mix['file_mb']:.3f} | {mix['bpw']:.2f} "
            f"| {mix['kl_mean']:.6f} ± {mix['kl_mean_unc']:.6f} | {mix['predicted_kld']:.6f} "
            f"| {uniform(below)} | {uniform(above)} | {', '.join(choice.values())} |"
        )
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    for experiment, found in report.items():
        print(markdown(experiment, found["val_loss"], found["rows"]), end="\n\n")
        print(perplexity_markdown(found["rows"], found["llama_perplexity"]), end="\n\n")
        print(budget_markdown(found["budgets"]), end="\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiments", nargs="+", default=["shakespeare_char", "shakespeare_char_long"]
    )
    parser.add_argument("--budgets", nargs="*", type=float, default=[3.5, 4.5, 5.5])
    # chunks of the held-out text per measurement (null: all, 1,742 for shakespeare_char)
    parser.add_argument("--chunks", type=int, default=512)
    # the budget search measures |groups| × |ladder| files: fewer chunks each
    parser.add_argument("--budget-chunks", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "imatrix")
    # print the tables of an earlier run's imatrix_quality.json, measuring nothing
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.report:
        print_report(json.loads(args.report.read_text()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    for experiment in args.experiments:
        print(f"{experiment}:", flush=True)
        work = args.out / experiment
        work.mkdir(parents=True, exist_ok=True)
        f32, val_loss = train_and_export(experiment, args.out)
        from ml_engine.llm.models import read_gguf_facts

        n_ctx = int(read_gguf_facts(f32).context_length or 64)
        rows = with_and_without(f32, work, n_ctx, args.chunks)
        checked = {
            f"{q}{suffix}": work / f"{q}{suffix}.gguf"
            for q in CHECKED_WITH_LLAMA_PERPLEXITY
            for suffix in ("", ".imatrix")
        }
        theirs = llama_perplexity(f32, checked, work, n_ctx, args.chunks)
        budgets = {
            str(b): budget_search(f32, b, work, n_ctx, args.budget_chunks) for b in args.budgets
        }
        report[experiment] = {
            "f32": str(f32),
            "val_loss": val_loss,
            "n_ctx": n_ctx,
            "n_chunks": args.chunks,
            "rows": rows,
            "llama_perplexity": theirs,
            "budgets": budgets,
        }
    (args.out / "imatrix_quality.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwritten: {args.out / 'imatrix_quality.json'}")


if __name__ == "__main__":
    main()

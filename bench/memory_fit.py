"""Memory fit: the estimate from the GGUF header vs the RSS growth of a fresh process loading it.

    python bench/memory_fit.py [--n-ctx 256 4096] [--keep DIR]

Builds random-weight llamas with the project's writer in a temp dir (the embedded tiny model's
shape, a ~113M GPT-2-small-like llama at f16 and q8_0, a 262k-vocabulary llama), loads each in a
fresh process, decodes one full batch (every buffer touched) and prints estimate / measured /
ratio. The figures in docs/serving.md come from it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)

from ml_engine.llm.gguf_writer import LlamaShape, write_random_llama
from ml_engine.llm.memory_fit import estimate, format_bytes, measure_load

SHAPES = {
    "tiny": LlamaShape(
        n_vocab=512, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=4, n_ctx=2048
    ),
    "113M": LlamaShape(
        n_vocab=32000, n_embd=768, n_ff=1280, n_layer=12, n_head=12, n_head_kv=12, n_ctx=4096
    ),
    "vocab262k": LlamaShape(
        n_vocab=262144, n_embd=256, n_ff=512, n_layer=2, n_head=4, n_head_kv=4, n_ctx=4096
    ),
}
HEADER = "| model | n_ctx | estimate | measured | estimate/measured | llama.cpp buffers (MiB) |"
# (name, shape, file type, quantized to)
FILES = [
    ("tiny-f32", "tiny", "f32", None),
    ("113M-f16", "113M", "f16", None),
    ("113M-q8_0", "113M", "f16", "q8_0"),
    ("vocab262k-f16", "vocab262k", "f16", None),
]


def build(folder: Path, only: list[str] | None = None) -> dict[str, Path]:
    from ml_engine.llm.quantize import quantize_gguf

    built: dict[str, Path] = {}
    for name, shape, file_type, quantized in FILES:
        if only and name not in only:
            continue
        base = folder / f"{shape}-{file_type}.gguf"
        if not base.exists():
            write_random_llama(base, SHAPES[shape], name=shape, file_type=file_type)
        path = base
        if quantized:
            path = folder / f"{shape}-{quantized}.gguf"
            if not path.exists():
                quantize_gguf(base, path, quantized)
        built[name] = path
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-ctx", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--only", nargs="*", help="file names of FILES to measure")
    parser.add_argument("--keep", type=Path, help="build the files here (reused when present)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = build(folder, args.only)
        print(HEADER)
        print("|---|---|---|---|---|---|")
        for name, path in files.items():
            for n_ctx in args.n_ctx:
                guess = estimate(path, n_ctx)
                got = measure_load(path, n_ctx)
                ratio = guess.load_bytes / got["measured_bytes"]
                buffers = ", ".join(f"{k} {v:.1f}" for k, v in got["llama_buffers_mib"].items())
                print(
                    f"| {name} | {n_ctx} | {format_bytes(guess.load_bytes)} | "
                    f"{format_bytes(got['measured_bytes'])} | {ratio:.3f} | {buffers} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Benchmark local GGUF generation: python generate.py [llm/model=tiny] [key=value ...] [-m]."""

from ml_engine.cli import launch
from ml_engine.llm.generate import generate

if __name__ == "__main__":
    launch(generate, config_name="generate")

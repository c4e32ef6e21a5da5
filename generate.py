"""Benchmark local GGUF generation: python generate.py [llm/model=tiny] [key=value ...] [-m]."""

from ml_engine.__main__ import launch_task

if __name__ == "__main__":
    launch_task("generate")

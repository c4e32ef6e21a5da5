"""Train a registered network: python train.py [model=cnn_mnist] [key=value ...] [-m for sweeps]."""

from ml_engine.__main__ import launch_task

if __name__ == "__main__":
    launch_task("train")

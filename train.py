"""Train a registered network: python train.py [model=cnn_mnist] [key=value ...] [-m for sweeps]."""

from ml_engine.cli import launch
from ml_engine.train import train

if __name__ == "__main__":
    launch(train, config_name="train")

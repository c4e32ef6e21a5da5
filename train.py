"""Train a registered network: python train.py [model=cnn_mnist] [key=value ...] [-m for sweeps]."""

from ml_engine.cli import launch
from ml_engine.validation import TRAIN_RULES

if __name__ == "__main__":
    launch("ml_engine.train:train", config_name="train", rules=TRAIN_RULES)

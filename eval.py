"""Test a checkpoint: python eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt"""

from ml_engine.cli import launch
from ml_engine.evaluate import evaluate

if __name__ == "__main__":
    launch(evaluate, config_name="eval")

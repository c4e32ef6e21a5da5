"""Test a checkpoint: python eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt"""

from ml_engine.cli import launch
from ml_engine.validation import TRAIN_RULES

if __name__ == "__main__":
    launch("ml_engine.evaluate:evaluate", config_name="eval", rules=TRAIN_RULES)

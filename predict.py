"""Predict digits: python predict.py ckpt_path=<best.ckpt> input=<image|folder> output=preds.csv"""

from ml_engine.cli import launch
from ml_engine.validation import PREDICT_RULES

if __name__ == "__main__":
    launch("ml_engine.predict:predict", config_name="predict", rules=PREDICT_RULES)

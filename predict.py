"""Predict digits: python predict.py ckpt_path=<best.ckpt> input=<image or folder> output=preds.csv"""

from ml_engine.cli import launch
from ml_engine.predict import predict

if __name__ == "__main__":
    launch(predict, config_name="predict")

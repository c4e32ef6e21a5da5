"""Predict digits: python predict.py ckpt_path=<best.ckpt> input=<image|folder> output=preds.csv"""

from ml_engine.__main__ import launch_task

if __name__ == "__main__":
    launch_task("predict")

"""Test a checkpoint: python eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt"""

from ml_engine.__main__ import launch_task

if __name__ == "__main__":
    launch_task("eval")

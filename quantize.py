"""Per-tensor quantization types to a size budget:
python quantize.py model_path=<f16.gguf> budget=4.5"""

from ml_engine.__main__ import launch_task

if __name__ == "__main__":
    launch_task("quantize")

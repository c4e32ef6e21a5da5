"""Export a language-model checkpoint to GGUF: python export.py ckpt_path=<best.ckpt>"""

from ml_engine.__main__ import launch_task

if __name__ == "__main__":
    launch_task("export")

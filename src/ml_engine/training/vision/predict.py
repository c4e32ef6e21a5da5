"""Prediction: a checkpoint and images in, one CSV row per image out.

torch and Lightning load once the output and the checkpoint file passed their checks.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from ml_engine.run.extras import apply_extras
from ml_engine.run.files import atomic_write, check_output_file, clean_stale_partials
from ml_engine.training.checkpoints import check_checkpoint_file
from ml_engine.training.vision.image_data import read_image
from ml_engine.training.vision.images import IMAGE_SUFFIXES, list_images, load_digit

if TYPE_CHECKING:
    import torch

    from ml_engine.training.vision.module import ClassifierModule


def predict_digits(model: torch.nn.Module, digits: np.ndarray, batch_size: int) -> torch.Tensor:
    """Class probabilities {N,classes} for uint8 images {N,C,H,W} (or digits {N,28,28})."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        chunks = [
            torch.softmax(model(torch.from_numpy(digits[i : i + batch_size]).to(device)), 1).cpu()
            for i in range(0, len(digits), batch_size)
        ]
        return torch.cat(chunks)


def load_inputs(model: ClassifierModule, paths: list[Path], invert: str | bool) -> np.ndarray:
    """The images as the model was trained on them: digit models get MNIST's centring and
    inversion (as the bundled digits were made); others the checkpoint's channels and size."""
    spec = model.hparams.data
    if spec["digits"]:
        return np.stack([load_digit(path, invert) for path in paths])
    size = tuple(spec["image_size"])
    return np.stack([read_image(path, spec["channels"], size) for path in paths])


def write_predictions(rows: list[dict[str, Any]], output: Path) -> None:
    """The whole CSV or nothing: written beside the target, then renamed over it."""

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=["path", "prediction", "confidence"])
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(output, write)


def report_skipped(folder: Path) -> int:
    """Say in one line which entries of ``folder`` were not read, and why; returns how many."""
    if not folder.is_dir():
        return 0
    entries = sorted(folder.iterdir())
    others = [p.name for p in entries if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
    folders = [p.name for p in entries if p.is_dir()]
    reasons = []
    if others:
        shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
        reasons.append(
            f"{len(others)} file(s) without an image extension ({shown}; "
            f"accepted: {', '.join(IMAGE_SUFFIXES)})"
        )
    if folders:
        reasons.append(f"{len(folders)} subfolder(s) (folders are not searched recursively)")
    if reasons:
        print(f"skipped {' and '.join(reasons)}", flush=True)
    return len(others) + len(folders)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image under ``cfg.input`` and write ``path,prediction,confidence`` rows;
    the prediction is the class name stored in the checkpoint ("0".."9" for digit models).

    ``cfg`` is checked against PREDICT_RULES by the job wrapper (run/launch.run_job)."""
    output = Path(to_absolute_path(str(cfg.output)))
    check_output_file(output)  # before any work: a bad output must not cost the predictions
    clean_stale_partials(output.parent)  # what an earlier, killed predict left half-written
    ckpt_path = to_absolute_path(cfg.ckpt_path)
    check_checkpoint_file(ckpt_path)  # before torch and Lightning load

    from ml_engine.training.vision.module import load_classifier

    model = load_classifier(ckpt_path, map_location=cfg.device, use="predict.py")
    source = Path(to_absolute_path(str(cfg.input)))
    paths = list_images(source)
    apply_extras(cfg)  # the checks passed: say what runs
    skipped = report_skipped(source)
    images = load_inputs(model, paths, cfg.invert)
    probabilities = predict_digits(model, images, cfg.batch_size)
    confidence, prediction = probabilities.max(dim=1)
    names = model.class_names
    rows = [
        {"path": str(path), "prediction": names[int(p)], "confidence": round(float(c), 6)}
        for path, p, c in zip(paths, prediction, confidence, strict=True)
    ]
    write_predictions(rows, output)
    print(f"predicted {len(rows)} image(s) → {output}")
    print(f"run_dir: {cfg.paths.output_dir}", flush=True)
    return {"images": len(rows), "skipped": skipped, "output": str(output)}

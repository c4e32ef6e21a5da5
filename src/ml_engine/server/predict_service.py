"""Digit prediction for the API: image decoding within limits, a checkpoint cache, inference."""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.run.helpers import first_line
from ml_engine.server.errors import ApiError, NotFound
from ml_engine.server.runs import RunIndex, RunInfo
from ml_engine.server.settings import Limits
from ml_engine.training.checkpoints import load_classifier
from ml_engine.training.images import load_reduced, to_mnist_digit
from ml_engine.training.module import ClassifierModule
from ml_engine.training.predict import predict_digits

ACCEPTED_FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, name: str, limits: Limits, invert: str = "auto") -> np.ndarray:
    """PNG/JPEG bytes → uint8 28×28 digit; sizes are checked before any pixel is decoded."""
    if len(data) > limits.max_image_bytes:
        raise UserError(
            f"image '{name}' is {len(data)} bytes; allowed: at most {limits.max_image_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in ACCEPTED_FORMATS:
                    raise UserError(
                        f"image '{name}' is {image.format or 'not an image'}; "
                        f"accepted: {', '.join(ACCEPTED_FORMATS)}"
                    )
                side = max(image.size)
                if side > limits.max_image_side or min(image.size) < 1:
                    raise UserError(
                        f"image '{name}' is {image.size[0]}×{image.size[1]} pixels; allowed: "
                        f"sides in [1, {limits.max_image_side}]"
                    )
                return to_mnist_digit(load_reduced(image), invert)
    except UserError:
        raise
    except UnidentifiedImageError:  # PIL's message names the BytesIO object: say it plainly
        raise UserError(
            f"cannot read image '{name}': not a PNG or JPEG image (accepted: PNG or JPEG)"
        ) from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        reason = first_line(exc) or type(exc).__name__
        raise UserError(f"cannot read image '{name}': {reason} (accepted: PNG or JPEG)") from exc


def image_pixels(data: bytes) -> int:
    """Width × height from the image's header (PIL opens lazily: no pixel is decoded); 0 when
    the header cannot be read (decode_image then names the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[0] * image.size[1]
    except Exception:  # any unreadable header: reported by decode_image, image by image
        return 0


def check_pixel_budget(images: list[tuple[str, bytes]], limits: Limits) -> None:
    """A 413 before decoding anything when the request's images hold more pixels in all than
    ``limits.max_total_pixels``: each image alone may be within its side limit, yet 64 of
    them took 20 s of CPU per request."""
    total = sum(image_pixels(data) for _, data in images)
    if total > limits.max_total_pixels:
        raise ApiError(
            413,
            f"{len(images)} image(s) hold {total} pixels; allowed: at most "
            f"{limits.max_total_pixels} pixels per request (limits.max_total_pixels)",
        )


def arrays_to_digits(images: list[list[list[float]]]) -> np.ndarray:
    """JSON 28×28 arrays → uint8 digits; values in [0, 255], or all in [0, 1] (scaled up)."""
    array = np.asarray(images, dtype=np.float64)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise UserError("image values must be finite numbers in [0, 255] (or all in [0, 1])")
    if array.max() <= 1.0:
        array = array * 255.0
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Prediction:
    run: RunInfo
    probabilities: np.ndarray
    # the checkpoint's class names ("0".."9" for digit models and older checkpoints)
    class_names: list[str]

    def to_dict(self, names: list[str]) -> dict[str, Any]:
        rows = []
        for index, (name, probs) in enumerate(zip(names, self.probabilities, strict=True)):
            rows.append(
                {
                    "index": index,
                    "name": name,
                    "digit": int(probs.argmax()),
                    "label": self.class_names[int(probs.argmax())],
                    "confidence": round(float(probs.max()), 6),
                    "probabilities": [round(float(p), 6) for p in probs],
                }
            )
        return {
            "model": self.run.network,
            "run": self.run.run,
            "val_acc": self.run.val_acc,
            "predictions": rows,
        }


class PredictService:
    """Loads each checkpoint once (LRU of ``cache_size``) and predicts batches of digits."""

    def __init__(self, runs: RunIndex, networks: list[str], cache_size: int = 4) -> None:
        self.runs, self.networks, self.cache_size = runs, networks, max(1, cache_size)
        self._models: OrderedDict[tuple[str, float], ClassifierModule] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def resolve_run(self, model: str | None, run: str | None, default_model: str) -> RunInfo:
        if run is not None:
            try:
                info = self.runs.get(run)
            except LookupError:
                accepted = [r.run for r in self.runs.runs()]
                raise UnknownNameError("run", run, accepted[-20:]) from None
            if model is not None and info.network != model:
                raise UserError(f"run '{run}' trained '{info.network}', not '{model}'")
            return info
        name = model or default_model
        if name not in self.networks:
            raise UnknownNameError("model", name, self.networks)
        best = self.runs.best_by_network().get(name)
        if best is None:
            raise NotFound(
                f"no trained checkpoint for model '{name}' yet; train one with POST /ml/train"
            )
        return best

    def _model(self, checkpoint: str) -> ClassifierModule:
        key = (checkpoint, Path(checkpoint).stat().st_mtime)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        with self._load_lock:  # one load at a time: concurrent first requests share it
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = load_classifier(checkpoint, map_location="cpu")
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.cache_size:
                    self._models.popitem(last=False)
        return model

    def cached_checkpoints(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self._models]

    def predict(self, digits: np.ndarray, info: RunInfo) -> Prediction:
        try:
            model = self._model(info.checkpoint)
        except FileNotFoundError:
            raise NotFound(f"checkpoint of run '{info.run}' is gone") from None
        probabilities = predict_digits(model, digits, batch_size=256).numpy()
        return Prediction(info, probabilities, model.class_names)

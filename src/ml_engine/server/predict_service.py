"""Prediction for the API: image decoding within limits (as each checkpoint's data spec asks),
a checkpoint cache, inference batched across concurrent requests."""

from __future__ import annotations

import asyncio
import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ml_engine.errors import UnknownNameError, UserError
from ml_engine.run.helpers import first_line
from ml_engine.server.errors import ApiError, NotFound
from ml_engine.server.metrics import ServerMetrics
from ml_engine.server.runs import RunIndex, RunInfo
from ml_engine.server.settings import Limits
from ml_engine.training.vision.image_data import convert_image
from ml_engine.training.vision.images import load_reduced, to_mnist_digit
from ml_engine.training.vision.module import ClassifierModule, load_classifier
from ml_engine.training.vision.predict import predict_digits

ACCEPTED_FORMATS = ("PNG", "JPEG")


def decode_image(
    data: bytes, name: str, limits: Limits, invert: str = "auto", spec: dict | None = None
) -> np.ndarray:
    """PNG/JPEG bytes → the model's input; sizes are checked before any pixel is decoded.

    As predict.py reads files (predict.load_inputs): a digit model (``spec`` None or
    ``digits``) gets a uint8 28×28 digit, centred and inverted as MNIST was made; any other
    classifier a plain resize to the checkpoint's channels and size, uint8 {C,H,W}."""
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
                if spec is None or spec.get("digits", True):
                    return to_mnist_digit(load_reduced(image), invert)
                return convert_image(image, spec["channels"], tuple(spec["image_size"]))
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


@dataclass
class _Batch:
    """Requests for one checkpoint waiting to share a forward pass."""

    model: ClassifierModule
    parts: list[tuple[np.ndarray, asyncio.Future]]

    def size(self) -> int:
        return sum(len(inputs) for inputs, _ in self.parts)


class PredictBatcher:
    """Concurrent predict requests for the same checkpoint answered by one forward pass.

    The first request of a batch waits up to ``window_s`` for others (as LitServe and
    TorchServe batch); a batch of ``max_batch`` images or more runs at once. Every request
    gets back the rows of its own images. Runs on the event loop: no locks needed."""

    def __init__(
        self,
        forward: Callable[[ClassifierModule, np.ndarray], np.ndarray],
        window_s: float,
        max_batch: int,
    ) -> None:
        self.forward, self.window_s, self.max_batch = forward, window_s, max_batch
        self._open: dict[int, _Batch] = {}
        self._running: set[asyncio.Task] = set()  # referenced, so none is collected mid-run
        self.batches = 0  # forward passes run, for tests

    async def predict(self, model: ClassifierModule, inputs: np.ndarray) -> np.ndarray:
        if self.window_s <= 0 or len(inputs) >= self.max_batch:
            self.batches += 1
            return await run_in_threadpool(self.forward, model, inputs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        batch = self._open.get(id(model))
        if batch is None:
            batch = self._open[id(model)] = _Batch(model, [])
            loop.call_later(self.window_s, self._flush, batch)
        batch.parts.append((inputs, future))
        if batch.size() >= self.max_batch:
            self._flush(batch)
        return await future

    def _flush(self, batch: _Batch) -> None:
        if self._open.get(id(batch.model)) is not batch:
            return  # already flushed (full before its window ended)
        del self._open[id(batch.model)]
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Batch) -> None:
        self.batches += 1
        try:
            inputs = np.concatenate([inputs for inputs, _ in batch.parts])
            probabilities = await run_in_threadpool(self.forward, batch.model, inputs)
        except BaseException as exc:  # every waiting request gets the error (4xx or 500)
            for _, future in batch.parts:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for inputs, future in batch.parts:
            rows = probabilities[start : start + len(inputs)]
            start += len(inputs)
            if not future.done():  # a client that went away cancelled its future
                future.set_result(rows)


def _forward(model: ClassifierModule, inputs: np.ndarray) -> np.ndarray:
    return predict_digits(model, inputs, batch_size=256).numpy()


class PredictService:
    """Loads each checkpoint once (LRU of ``cache_size``) and predicts batches of images."""

    def __init__(
        self,
        runs: RunIndex,
        networks: list[str],
        cache_size: int = 4,
        metrics: ServerMetrics | None = None,
        batch_window_ms: float = 0.0,
        max_batch: int = 64,
    ) -> None:
        self.runs, self.networks, self.cache_size = runs, networks, max(1, cache_size)
        self.metrics = metrics or ServerMetrics()
        self.batcher = PredictBatcher(_forward, batch_window_ms / 1000, max_batch)
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
            self.metrics.model_loaded("predict_checkpoint")
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.cache_size:
                    self._models.popitem(last=False)
        return model

    def cached_checkpoints(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self._models]

    def cached_model(self, info: RunInfo) -> ClassifierModule | None:
        """The run's classifier when loaded (and its file unchanged), else None: no disk
        read beyond one stat, so the event loop may ask."""
        try:
            key = (info.checkpoint, Path(info.checkpoint).stat().st_mtime)
        except OSError:
            return None
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def model_for(self, info: RunInfo) -> ClassifierModule:
        """The run's classifier, loaded once; its data spec says how to read images for it."""
        try:
            return self._model(info.checkpoint)
        except FileNotFoundError:
            raise NotFound(f"checkpoint of run '{info.run}' is gone") from None

    async def predict(
        self, inputs: np.ndarray, info: RunInfo, model: ClassifierModule
    ) -> Prediction:
        """Class probabilities for the model's inputs (``decode_image``'s arrays), in a
        forward pass shared with concurrent requests."""
        probabilities = await self.batcher.predict(model, inputs)
        return Prediction(info, probabilities, model.class_names)

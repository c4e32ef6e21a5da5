"""What a classifier needs to know about its images, and turning image files into uint8 arrays.

The *data spec* is a plain dict that a datamodule hands to the ClassifierModule and the module
keeps in its checkpoint: the input shape, the normalization and the class names. A checkpoint is
then enough to predict on new images, whatever data it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ml_engine.errors import UserError

# MNIST's pixel statistics: the spec of digit models and of checkpoints from before the spec
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# PIL modes that hold one channel: such images are grayscale unless channels=3 is asked for
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def data_spec(
    channels: int,
    image_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    digits: bool = False,
) -> dict[str, Any]:
    """The spec as plain containers (checkpoints load with torch's weights-only unpickler).

    ``digits``: inputs are MNIST-like digits, so predict.py centres and inverts user images the
    way MNIST was made (and the UI's canvas applies) instead of only resizing them.
    """
    return {
        "channels": int(channels),
        "image_size": [int(s) for s in image_size],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "class_names": [str(c) for c in class_names],
        "digits": bool(digits),
    }


def mnist_spec(num_classes: int = 10) -> dict[str, Any]:
    """28×28 grayscale digits named "0".."9", normalized with MNIST's statistics."""
    names = [str(i) for i in range(num_classes)]
    return data_spec(1, (28, 28), [MNIST_MEAN], [MNIST_STD], names, digits=True)


def size_pair(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``image_size`` (an int for squares, or [height, width]) as (height, width)."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def image_channels(mode: str) -> int:
    return 1 if mode in GRAY_MODES else 3


def convert_image(image: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A PIL image → uint8 {C,H,W} with ``channels`` (1 or 3) at ``size`` (height, width)."""
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.array(image, dtype=np.uint8)  # a copy: PIL's buffer is read-only
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def read_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """An image file as uint8 {C,H,W}; an unreadable file ends in a UserError naming it."""
    try:
        with Image.open(path) as image:
            return convert_image(image, channels, size)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def peek_image(path: Path) -> tuple[int, tuple[int, int]]:
    """Channels and (height, width) from the file's header, without decoding its pixels."""
    try:
        with Image.open(path) as image:
            return image_channels(image.mode), (image.height, image.width)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def channel_statistics(images: Any, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 {N,C,H,W} images, scaled to [0, 1].

    Summed in float64 chunk by chunk, so the statistics of a large set need no float copy of it.
    """
    channels = images.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk], dtype=np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        squares += (block**2).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0.0))
    # a constant channel would divide by zero; such a channel carries nothing anyway
    return mean.tolist(), [float(s) if s > 1e-6 else 1.0 for s in std]

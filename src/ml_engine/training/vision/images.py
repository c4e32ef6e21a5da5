"""Reading user images and turning them into MNIST-like 28×28 digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ml_engine.errors import UserError
from ml_engine.training.choices import INVERT_CHOICES, invert_mode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# A digit ends as 28×28 (its box fitted into 20×20): pixels beyond this side add decoding and
# centring work, not information, so larger images are read reduced to about this size.
REDUCED_SIDE = 256


def list_images(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else the images in the folder (sorted, not recursive)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"no images in {path} (accepted: {', '.join(IMAGE_SUFFIXES)})")
        return images
    raise UserError(f"input not found: {path} (give an image file or a folder of images)")


def _needs_inversion(gray: np.ndarray, invert: str | bool) -> bool:
    mode = invert_mode(invert)
    if mode is None:
        raise UserError(f"invert={invert!r} is not valid; accepted: {', '.join(INVERT_CHOICES)}")
    if mode == "auto":
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        return float(border.mean()) > 127  # dark digit on light paper
    return mode == "true"


def _center_like_mnist(gray: np.ndarray) -> np.ndarray:
    """Fit the digit's bounding box into 20×20 (aspect kept), then centre its mass in 28×28.

    This is how the MNIST digits themselves were made, so photos and drawings of any size
    reach the network in the form it was trained on.
    """
    mask = gray > 0.1 * gray.max() if gray.max() > 0 else gray > 0
    if not mask.any():
        return np.zeros((28, 28), dtype=np.uint8)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = 20.0 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    digit = np.asarray(
        Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), dtype=np.float64
    )
    canvas = np.zeros((28, 28), dtype=np.float64)
    top, left = (28 - digit.shape[0]) // 2, (28 - digit.shape[1]) // 2
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    total = canvas.sum()
    if total > 0:
        ys, xs = np.indices(canvas.shape)
        dy = round(13.5 - (ys * canvas).sum() / total)
        dx = round(13.5 - (xs * canvas).sum() / total)
        canvas = np.roll(canvas, (dy, dx), axis=(0, 1))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def to_mnist_digit(image: Image.Image, invert: str | bool = "auto") -> np.ndarray:
    """Any PIL image → uint8 {28,28}, white digit on black."""
    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    if _needs_inversion(gray, invert):
        gray = 255 - gray
    if gray.shape == (28, 28):
        return gray.copy()
    return _center_like_mnist(gray)


def load_reduced(image: Image.Image, side: int = REDUCED_SIDE) -> Image.Image:
    """Decode an opened image at about ``side`` pixels on its long side when it is larger.

    A JPEG is decoded reduced (``draft``: its DCT scaled by 1/2 to 1/8, most of the work never
    done); other formats are decoded whole, then ``reduce``d by an integer factor before the
    float work of centring, which would otherwise run on every pixel."""
    if image.format == "JPEG" and max(image.size) > 2 * side:
        image.draft("L", (side, side))
    image.load()
    factor = max(image.size) // side
    return image.reduce(factor) if factor >= 2 else image


def load_digit(path: Path, invert: str | bool = "auto") -> np.ndarray:
    """Read an image file as an MNIST-like digit; unreadable files end in a UserError."""
    try:
        with Image.open(path) as image:
            return to_mnist_digit(load_reduced(image), invert)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc} (accepted: PNG or JPEG files)") from exc

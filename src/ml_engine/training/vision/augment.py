"""Batch augmentation on the device: whole uint8-decoded batches, one grid sample per batch.

The datamodules call ``augment_batch`` from ``on_after_batch_transfer`` in training; its
``augment`` mapping is the config's ``datamodule.augment`` node (null: none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ml_engine.errors import UserError

AUGMENT_KEYS = ("hflip", "degrees", "translate", "scale", "elastic_alpha", "elastic_sigma")


def random_affine(
    images: Tensor,
    max_degrees: float,
    max_shift: float,
    scale: tuple[float, float],
    elastic_alpha: float = 0.0,
    elastic_sigma: float = 4.0,
) -> Tensor:
    """Random rotation, scale and shift of a float batch {N,C,H,W}, done as one grid sample;
    with ``elastic_alpha`` > 0 the sampling grid also gets an elastic distortion (Simard et al.,
    2003: uniform noise per pixel smoothed by a Gaussian of ``elastic_sigma`` pixels, scaled by
    ``elastic_alpha`` pixels), which varies a digit's strokes as handwriting does."""
    n = images.shape[0]
    angle = torch.empty(n, device=images.device).uniform_(-max_degrees, max_degrees)
    angle = torch.deg2rad(angle)
    factor = torch.empty(n, device=images.device).uniform_(*scale)
    shift = torch.empty(n, 2, device=images.device).uniform_(-max_shift, max_shift) * 2
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if elastic_alpha > 0:
        grid = grid + elastic_displacement(images, elastic_alpha, elastic_sigma)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def elastic_displacement(images: Tensor, alpha: float, sigma: float) -> Tensor:
    """A smooth random displacement field {N,H,W,2} in grid units (−1..1 spans the image)."""
    n, _, height, width = images.shape
    noise = torch.empty(n, 2, height, width, device=images.device).uniform_(-1, 1)
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    # separable Gaussian, x then y, each of the two displacement channels on its own
    along_x = kernel.view(1, 1, 1, -1).repeat(2, 1, 1, 1)
    along_y = kernel.view(1, 1, -1, 1).repeat(2, 1, 1, 1)
    smooth = F.conv2d(noise, along_x, padding=(0, radius), groups=2)
    smooth = F.conv2d(smooth, along_y, padding=(radius, 0), groups=2)
    to_grid = torch.tensor([2 / width, 2 / height], device=images.device, dtype=images.dtype)
    return smooth.permute(0, 2, 3, 1) * alpha * to_grid


def random_hflip(images: Tensor) -> Tensor:
    """Mirror a random half of the batch left to right."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def checked_augment(augment: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``datamodule.augment`` refused in one line when a key is unknown or a value is not a
    number of the right range, before any training starts."""
    if not augment:
        return None
    settings = dict(augment)
    for key, value in settings.items():
        if key not in AUGMENT_KEYS:
            raise UserError(
                f"unknown datamodule.augment key '{key}'; accepted: {', '.join(AUGMENT_KEYS)}"
            )
        if key == "hflip":
            valid = isinstance(value, bool)
        elif key == "scale":
            valid = (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and all(_is_number(v) and v > 0 for v in value)
                and value[0] <= value[1]
            )
        else:
            valid = _is_number(value) and value >= 0 and (key != "elastic_sigma" or value > 0)
        if not valid:
            expected = {
                "hflip": "true or false",
                "scale": "[low, high] with 0 < low ≤ high",
                "elastic_sigma": "a number > 0",
            }.get(key, "a number ≥ 0")
            raise UserError(f"datamodule.augment.{key}={value!r} is not valid; expected {expected}")
    return settings


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def augment_batch(
    images: Tensor, augment: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> Tensor:
    """``datamodule.augment`` applied to a float batch: ``hflip``, then one grid sample for
    ``degrees``, ``translate``, ``scale`` and ``elastic_alpha``/``elastic_sigma``; keys left out
    take ``defaults`` (a datamodule's own), else no change."""
    settings = {**(defaults or {}), **augment}
    if settings.get("hflip"):
        images = random_hflip(images)
    return random_affine(
        images,
        max_degrees=float(settings.get("degrees", 0.0)),
        max_shift=float(settings.get("translate", 0.0)),
        scale=tuple(settings.get("scale", (1.0, 1.0))),
        elastic_alpha=float(settings.get("elastic_alpha", 0.0)),
        elastic_sigma=float(settings.get("elastic_sigma", 4.0)),
    )

"""The names a training config chooses among, each listed once.

Stdlib only: the value rules (checked before torch loads), the server's request schemas, the
web UI (through the API) and the modules that act on a choice all read these lists.
"""

from __future__ import annotations

# datamodule.source (training/vision/data_sources.py): full MNIST if available, else the
# bundled digits
SOURCES: tuple[str, ...] = ("auto", "torchvision", "bundled")

# Lightning accelerator name (trainer.accelerator, the server's ``device``) → the torch device
# type it runs on; "auto" takes what is present, "cuda" is Lightning's alias of "gpu". Pickers
# offer them in this order.
ACCELERATORS: dict[str, str] = {
    "cpu": "cpu",
    "auto": "auto",
    "gpu": "cuda",
    "cuda": "cuda",
    "mps": "mps",
}
# torch device types, as predict.py's ``device`` (a ``map_location``) takes them
TORCH_DEVICES: tuple[str, ...] = tuple(
    dict.fromkeys(kind for kind in ACCELERATORS.values() if kind != "auto")
)

# inverting images to MNIST's white-on-black (predict.py's ``invert``, the server's form field)
INVERT_CHOICES: tuple[str, ...] = ("auto", "true", "false")


def invert_mode(value: object) -> str | None:
    """``value`` as one of INVERT_CHOICES (YAML's ``true``/``false`` arrive as booleans); None
    when it is none of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) and value in INVERT_CHOICES else None

"""``${fastest_precision:<accelerator>}``: bf16-mixed where the device multiplies bfloat16
natively, else 32-true.

On a CPU without native bfloat16 matrix products (AVX2 only: most laptops and desktops, AMD
before Zen 4), torch's bf16 matmul falls back to a slow reference kernel. There, 30 steps of
the test suite's small llama took 86.4 s in bf16-mixed and 5.3 s in 32-true. On AVX512-BF16 or
AMX, bf16-mixed ran about 1.5× the float32 rate. Presets that want the faster precision ask for
this resolver. A ``trainer.precision`` the user gives replaces it, and so is honoured as given.

torch is imported only when the value is resolved, so registering the resolver before the
config composes costs nothing.
"""

from __future__ import annotations

import functools
import logging

from omegaconf import OmegaConf

from ml_engine.training.choices import ACCELERATORS

log = logging.getLogger(__name__)

RESOLVER = "fastest_precision"
BF16 = "bf16-mixed"
FLOAT32 = "32-true"


def _device_kind(accelerator: str) -> str:
    """The torch device type Lightning's ``accelerator`` runs on (``auto`` as Lightning picks)."""
    import torch

    kind = ACCELERATORS.get(str(accelerator).lower(), "cpu")
    if kind != "auto":
        return kind
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def native_bf16(kind: str) -> bool:
    """Whether device type ``kind`` multiplies bfloat16 matrices in hardware-backed kernels."""
    import torch

    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        # torch's own test for routing bf16 matmuls to oneDNN (AVX512 BW/VL/DQ, AMX, ARM bf16)
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check is not None and check())
    return False  # MPS: not measured here; bf16-mixed stays the user's explicit choice


@functools.cache
def fastest_precision(accelerator: str = "auto") -> str:
    """``bf16-mixed`` where ``accelerator``'s device has native bfloat16, else ``32-true``."""
    kind = _device_kind(accelerator)
    if native_bf16(kind):
        return BF16
    device = {"cpu": "this CPU", "cuda": "this CUDA GPU"}.get(kind, f"{kind.upper()} devices")
    log.info(
        "trainer.precision=%s: bfloat16 is not native on %s, where %s can run many times "
        "slower (give trainer.precision=%s to use it anyway)",
        FLOAT32,
        device,
        BF16,
        BF16,
    )
    return FLOAT32


def register_precision_resolver() -> None:
    """Make ``${fastest_precision:...}`` available to the configs (before they compose)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, fastest_precision)

"""Which accelerators this machine has, checked before a Trainer is built (and before
Lightning loads: torch loads only to probe for a CUDA device).

The device names themselves are listed once, in training/choices.py (ACCELERATORS).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from ml_engine.errors import UserError
from ml_engine.run.distributed import external_launcher
from ml_engine.training.choices import ACCELERATORS


def device_type_present(kind: str) -> bool:
    """Whether this machine has a device of torch type ``kind`` ("auto" always works)."""
    if kind == "cuda":
        return _cuda_present()
    if kind == "mps":  # Apple's GPUs: macOS only, where torch is asked
        return sys.platform == "darwin" and _mps_present()
    return kind in ("cpu", "auto")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps_present() -> bool:
    import torch

    return torch.backends.mps.is_available()


def usable_accelerators() -> tuple[str, ...]:
    """Every accelerator name, aliases and ``auto`` included, that works on this machine."""
    return tuple(name for name, kind in ACCELERATORS.items() if device_type_present(kind))


def available_accelerators() -> list[str]:
    """The devices present, one name each (``gpu`` for CUDA), without ``auto``."""
    names: dict[str, str] = {}
    for name, kind in ACCELERATORS.items():
        if kind != "auto" and device_type_present(kind):
            names.setdefault(kind, name)
    return list(names.values())


def check_accelerator(requested: str | None) -> None:
    """A UserError naming the accelerators present when ``requested`` is not one of them."""
    if requested is None or not isinstance(requested, str):
        return  # an Accelerator instance: Lightning checks it
    kind = ACCELERATORS.get(requested.lower())
    if kind is None:
        accepted = "auto, " + ", ".join(available_accelerators())
        raise UserError(
            f"trainer.accelerator='{requested}' is not known; accepted here: {accepted}"
        )
    if not device_type_present(kind):
        what = "no CUDA GPU" if kind == "cuda" else "no Apple MPS device"
        raise UserError(
            f"trainer.accelerator='{requested}' but this machine has {what}; "
            f"available here: auto, {', '.join(available_accelerators())}"
        )


def check_sync_batchnorm(trainer_cfg: Mapping[str, Any]) -> None:
    """SyncBatchNorm runs on CUDA only; refuse it up front instead of failing in every rank."""
    if not trainer_cfg.get("sync_batchnorm"):
        return
    requested = trainer_cfg.get("accelerator")
    if not isinstance(requested, str):
        return
    kind = ACCELERATORS.get(requested.lower())
    on_cpu = kind == "cpu" or (kind == "auto" and not _cuda_present())
    if on_cpu or kind == "mps":
        raise UserError(
            f"trainer.sync_batchnorm=true needs CUDA GPUs, but trainer.accelerator='{requested}' "
            "runs on " + ("MPS" if kind == "mps" else "CPU") + "; set trainer.sync_batchnorm=false"
        )


def check_num_nodes(trainer_cfg: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """``trainer.num_nodes > 1`` needs one process per node started by a launcher: run as a
    plain command, Lightning would wait for nodes that never come."""
    nodes = trainer_cfg.get("num_nodes") or 1
    if not isinstance(nodes, int) or nodes <= 1:
        return
    if external_launcher(env) is not None or _launched_by_cluster(env):
        return
    raise UserError(
        f"trainer.num_nodes={nodes} needs a launcher that starts the processes on every node: "
        f"torchrun --nnodes={nodes} --node-rank=<this node> --master-addr=<node 0> "
        "--nproc-per-node=<devices> train.py …, or srun on SLURM (see README, Scale-out)"
    )


def _launched_by_cluster(env: Mapping[str, str] | None) -> bool:
    """torchrun with one process per node, or an environment Lightning reads itself (SLURM,
    MPI, Kubeflow's MASTER_ADDR/WORLD_SIZE)."""
    import os

    env = os.environ if env is None else env
    return any(
        key in env for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
    )

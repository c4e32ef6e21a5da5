"""Which process of a distributed run this is, and the one run dir all of them share.

Three launchers start the processes of one run: Lightning itself (``trainer.devices=N``: it
re-runs the command for ranks 1…N-1 with rank 0's ``hydra.run.dir``), ``torchrun`` and SLURM's
``srun`` (one command per process, started independently on every node). The last two need the
run dir agreed before Hydra creates it: each process would otherwise stamp its own
(``<time>_<random id>``) and every node would write a run of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ml_engine.errors import UserError


def _int(env: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(env.get(key, default))
    except ValueError:
        return default


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank over all nodes: torchrun's ``RANK``, srun's ``SLURM_PROCID`` (when
    it started several tasks), else Lightning's node and local ranks (0 for a plain run)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return _int(env, "RANK")
    if _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        return _int(env, "SLURM_PROCID")
    node = max(_int(env, "NODE_RANK"), _int(env, "GROUP_RANK"))
    local = _int(env, "LOCAL_RANK")
    return local if node == 0 else node * 1_000_000 + local  # any non-zero value will do


def is_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    return global_rank(env) == 0


def external_launcher(env: Mapping[str, str] | None = None) -> str | None:
    """``torchrun`` or ``srun`` when one of them started this process as one of several."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and _int(env, "WORLD_SIZE", 1) > 1:
        return "torchrun"
    if _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        return "srun"
    return None


def shared_run_name(env: Mapping[str, str] | None = None, parent_pid: int | None = None) -> str:
    """A run dir name every process of this launch computes alike.

    srun: the job and step ids. torchrun: its ``--rdzv-id``; on one node without it, the id of
    the torchrun agent that started every process here. Several nodes without ``--rdzv-id``
    share nothing: refused in one line.
    """
    env = os.environ if env is None else env
    launcher = external_launcher(env)
    if launcher == "srun":
        return f"slurm-{env.get('SLURM_JOB_ID', 'job')}.{env.get('SLURM_STEP_ID', '0')}"
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if _int(env, "GROUP_WORLD_SIZE", 1) == 1:
        return f"torchrun-{os.getppid() if parent_pid is None else parent_pid}"
    raise UserError(
        f"{env.get('GROUP_WORLD_SIZE')} nodes started by torchrun need one run dir for all of "
        "them: give torchrun --rdzv-id=<run name> (the run dir becomes runs/torchrun-<run name>) "
        "or hydra.run.dir=<a dir every node sees>"
    )


def shared_run_dir_override(
    argv: Sequence[str], env: Mapping[str, str] | None = None
) -> str | None:
    """The ``hydra.run.dir`` override that puts every process of a torchrun/srun launch in one
    run dir, or None: not such a launch, a sweep (``-m``), or the user chose the dir."""
    if external_launcher(env) is None:
        return None
    if any(arg in ("-m", "--multirun") for arg in argv):
        return None
    if any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in argv):
        return None
    name = shared_run_name(env)
    return f"hydra.run.dir=${{paths.log_dir}}/${{task_name}}/runs/{name}"

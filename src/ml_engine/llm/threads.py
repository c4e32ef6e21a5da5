"""How many threads llama.cpp gets when none are named: the one notion of "cores" in llm/.

``llm.n_threads: null`` (the backend, and quantizing a missing file) and the target search's
thread candidates (``llm.target.n_threads: null``: 1, 2, 4, … up to this count) all mean
``physical_core_count()``.
"""

from __future__ import annotations

import os
from pathlib import Path

_CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def physical_core_count(topology: Path | None = None) -> int:
    """Physical cores this process may run on: llama-bench's default thread count.

    As llama.cpp's ``cpu_get_num_math`` does on Linux: distinct (package, core) pairs among the
    CPUs in this process's affinity mask, so hyper-threads sharing a core count once (they share
    its vector units, which is what the matrix kernels use). Elsewhere, or when the topology
    cannot be read: ``os.cpu_count()``. ``topology``: the sysfs CPU folder (tests give their own).
    """
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        folder = (topology or _CPU_TOPOLOGY) / f"cpu{cpu}" / "topology"
        try:
            package = (folder / "physical_package_id").read_text().strip()
            core = (folder / "core_id").read_text().strip()
        except OSError:
            return len(allowed) or os.cpu_count() or 1
        cores.add((package, core))
    return len(cores) or os.cpu_count() or 1

"""One notion of cores in llm/: physical cores in this process's affinity mask."""

from __future__ import annotations

from pathlib import Path

from ml_engine.llm import threads
from ml_engine.llm.backends import open_backend
from ml_engine.llm.target_search import thread_candidates
from ml_engine.llm.threads import physical_core_count
from tests.llm.conftest import llm_node


def _topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in cores.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_count_hyperthread_siblings_once(tmp_path, monkeypatch) -> None:
    # two cores with two hyper-threads each, on one package; a second package with one core
    root = _topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)})
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert physical_core_count(root) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2})  # siblings of one core
    assert physical_core_count(root) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 7})  # cpu7 has no topology
    assert physical_core_count(root) == 2


def test_without_affinity_the_cpu_count_is_used(monkeypatch) -> None:
    def unsupported(pid: int) -> set[int]:
        raise AttributeError("sched_getaffinity")  # macOS, Windows

    monkeypatch.setattr("os.sched_getaffinity", unsupported)
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert physical_core_count() == 6


def test_null_threads_mean_the_same_cores_everywhere(tmp_path, monkeypatch, models_dir) -> None:
    # 4 logical CPUs on 2 cores, one of them outside the affinity mask: 1 physical core
    root = _topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    monkeypatch.setattr(threads, "_CPU_TOPOLOGY", root)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2})
    assert physical_core_count() == 1
    # the target search's candidates stop where llm.n_threads=null runs
    assert thread_candidates(None) == [1]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert thread_candidates(None) == [1, 2]
    # open_backend (and the backend under it) resolve null to the same count
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2})
    with open_backend(llm_node(n_threads=None, n_ctx=64), models_dir) as backend:
        assert backend.describe()["n_threads"] == 1 == backend.describe()["n_threads_batch"]

"""``hydra/sweeper=grid``: Hydra's basic sweeper (the cartesian product of ``a=1,2 b=x,y``)
that resumes.

Run the same ``-m`` command into the same sweep dir (``hydra.sweep.dir=…``) after the sweep
was killed: a job whose ``job.json`` says ``ok`` is not run again, a job killed mid-run (its
record says ``running``, or it has none) runs again in its own dir, and a failed job runs again
only with ``+sweep.retry_failed=true``. Jobs keep their numbers, so the summary lists each once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from ml_engine.run.files import JOB_RECORD, read_job_record, redact_override

log = logging.getLogger(__name__)

# overrides that steer the sweep itself, not a job: they may differ between a run and its rerun
SWEEP_KEYS = ("sweep.", "+sweep.", "++sweep.")


def job_identity(overrides: Sequence[str]) -> tuple[str, ...]:
    """What names a job across reruns: its overrides as its record holds them (redacted),
    without the sweep's own settings."""
    return tuple(redact_override(o) for o in overrides if not o.startswith(SWEEP_KEYS))


def finished_jobs(sweep_dir: Path, retry_failed: bool) -> set[tuple[str, ...]]:
    """The jobs an earlier run of this sweep finished: ``ok`` ones, and ``failed`` ones unless
    they are to be retried."""
    done = set()
    for path in sweep_dir.glob(f"*/{JOB_RECORD}"):
        record = read_job_record(path.parent) or {}
        status = record.get("status")
        if status == "ok" or (status == "failed" and not retry_failed):
            done.add(job_identity(record.get("overrides") or []))
    return done


def contiguous_runs(numbers: Sequence[int]) -> list[list[int]]:
    """``[0, 1, 3, 4, 5]`` → ``[[0, 1], [3, 4, 5]]``: each run is one launch, its jobs keeping
    their numbers (the launcher numbers a batch from its first job)."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and runs[-1][-1] == number - 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return runs


class ResumingGridSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: Any = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)

    def sweep(self, arguments: list[str]) -> Any:
        params = self._parse_config()
        params.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        batches = self.split_arguments(parser.parse_overrides(params), None)
        jobs = [list(job) for batch in batches for job in batch]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        retry = bool(OmegaConf.select(self.config, "sweep.retry_failed", default=False))
        done = finished_jobs(sweep_dir, retry)
        todo = [n for n, job in enumerate(jobs) if job_identity(job) not in done]
        if len(todo) < len(jobs):
            log.info(
                "resuming %s: %d of %d jobs finished earlier, %d to run",
                sweep_dir,
                len(jobs) - len(todo),
                len(jobs),
                len(todo),
            )
        returns: list[Sequence[JobReturn]] = []
        size = self.max_batch_size or len(jobs) or 1
        for run in contiguous_runs(todo):
            for start in range(0, len(run), size):
                numbers = run[start : start + size]
                results = self.launcher.launch(
                    [jobs[n] for n in numbers], initial_job_idx=numbers[0]
                )
                for result in results:
                    _ = result.return_value  # a job's error that ends the sweep
                returns.append(results)
        return returns

"""Everything the routes share, built once per app from the settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ml_engine.run.files import clean_stale_partials_under
from ml_engine.server.generation_queue import GenerationQueue
from ml_engine.server.job_runner import JobRunner
from ml_engine.server.jobs_store import JobStore
from ml_engine.server.llm_service import LlmService
from ml_engine.server.metrics import ServerMetrics
from ml_engine.server.predict_service import PredictService
from ml_engine.server.runs import RunIndex
from ml_engine.server.settings import Settings
from ml_engine.training.accelerators import usable_accelerators
from ml_engine.training.registry import CLASSIFIER, network_names

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    networks: list[str]
    trainable: list[str]
    devices: tuple[str, ...]
    store: JobStore
    jobs: JobRunner
    runs: RunIndex
    predictor: PredictService
    llm: LlmService
    generation: GenerationQueue
    metrics: ServerMetrics

    @classmethod
    def build(cls, settings: Settings) -> ServerState:
        # a quantization or export killed mid-write (a server killed with it) left a partial
        # file of up to gigabytes that no later write of the same name would ever meet
        for path in clean_stale_partials_under(settings.models_dir):
            log.warning("removed %s, left half-written by a process that died", path)
        networks = network_names(CLASSIFIER)  # the digit classifiers it trains and serves
        allowed = settings.train_models
        trainable = [n for n in networks if allowed is None or n in allowed]
        store = JobStore(settings.jobs_db)
        runs = RunIndex(settings.runs_dir)
        metrics = ServerMetrics()
        metrics.watch_jobs(store.count)
        return cls(
            settings=settings,
            networks=networks,
            trainable=trainable,
            # devices a training request may name on this machine
            devices=usable_accelerators(),
            store=store,
            jobs=JobRunner(
                store,
                settings.runs_dir,
                extra_overrides=settings.extra_overrides,
                max_running=settings.max_running_jobs,
                poll_interval_s=settings.poll_interval_s,
                kill_grace_s=settings.kill_grace_s,
                max_queued=settings.max_queued_jobs,
                max_queued_per_owner=settings.max_queued_per_key,
            ),
            runs=runs,
            predictor=PredictService(
                runs,
                networks,
                settings.predict_cache_size,
                metrics=metrics,
                batch_window_ms=settings.predict_batch_window_ms,
                max_batch=settings.predict_max_batch,
            ),
            llm=LlmService(
                settings.models_dir,
                settings.llm_config_name,
                settings.llm_models,
                settings.llm_cache_size,
                settings.llm_produce_missing,
                settings.llm_exports_dir,
                settings.llm_files,
                cache_mb=settings.llm_cache_mb,
                worker_timeout_s=settings.llm_worker_timeout_s,
                stream_interval_ms=settings.llm_stream_interval_ms,
                memory_budget=settings.llm_memory_budget,
                idle_unload_s=settings.llm_idle_unload_s,
                # a crashed worker's log stays here, next to the jobs database
                log_dir=settings.jobs_db.parent / "llm_workers",
                metrics=metrics,
            ),
            generation=GenerationQueue(
                settings.llm_max_running, settings.llm_max_queued, settings.llm_retry_after_s
            ),
            metrics=metrics,
        )

    def start(self) -> None:
        threads = self.settings.predict_torch_threads
        if threads is not None:
            import torch

            # the server's forward passes are small (one request's images, or a batch of a
            # few): more intra-op threads only spin against the event loop and decoding, a
            # 28×28 digit took 46 ms with torch's 2 threads and 4 ms with one on a busy
            # 2-core machine. Training jobs and LLM workers are other processes.
            torch.set_num_threads(threads)
        self.jobs.start()

    def begin_shutdown(self) -> None:
        """The server was told to stop (SIGTERM, Ctrl-C): generations waiting are refused,
        running ones cancelled between two tokens, so that open streams end now rather than
        when their last token is made. Idempotent."""
        self.generation.close()

    def stop(self) -> None:
        self.begin_shutdown()
        self.jobs.stop()
        self.llm.close(grace_s=3.0)  # a worker still busy after that is killed
        self.store.close()

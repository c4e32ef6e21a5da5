"""``hparams_search=llm_target``: the target search as a Hydra sweeper.

Each measurement is an ordinary generate job, launched through the configured launcher with
overrides such as ``llm.quantization=q4_k_m llm.n_threads=2 llm.n_gpu_layers=0``, so every job
has its run dir, ``result.json`` and ``job.json``, and the sweep summary sees them all. The
search (``target_search``) decides what to measure next from the jobs' records.

Hydra instantiates only sweepers defined under the ``hydra_plugins`` package (it checks the
class's module name), so ``hydra_plugins.ml_engine_target_search`` holds a subclass of this one,
which ``conf/hydra/sweeper/llm_target.yaml`` names.

Every probe is also a trial of an Optuna study (``target_study``): ``hydra.sweeper.storage``
(null: ``<sweep dir>/optuna.journal``) under ``hydra.sweeper.study_name`` (null: ``llm_target``).
With ``llm.target.objectives=[speed,kld]`` the study has two objectives and the sweep dir gets
the Pareto front (``pareto.md``, ``study/pareto_front.png``); the verdict is the same either way.

A job that fails (a missing file, a file llama.cpp cannot read, a crash) ends the search at once
with that job's own one-line error: a search over settings of a file that does not run is no
search. A target no setting meets still writes the verdict (``search.md``, ``search.json``) and
the sweep summary, then ends with one ``error:`` line and exit status 1, so scripts can tell.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from ml_engine.errors import UserError
from ml_engine.llm.backends.llama_cpp import gpu_offload_supported
from ml_engine.llm.metrics import METRICS, std_of
from ml_engine.llm.progress import duration
from ml_engine.llm.target_report import (
    RunContext,
    probe_line,
    shown_path,
    verdict_lines,
    write_verdict,
)
from ml_engine.llm.target_search import (
    CPU_ONLY_NOTE,
    Probe,
    Setting,
    Target,
    TargetSearch,
    Verdict,
    misses,
    parse_target,
    quantization_candidates,
    thread_candidates,
)
from ml_engine.llm.target_study import (
    KLD,
    TargetStudy,
    open_target_study,
    parse_objectives,
)
from ml_engine.run.files import read_job_record
from ml_engine.run.helpers import finite_or_none

log = logging.getLogger(__name__)

# the settings the search chooses: a command line that fixes them contradicts the search
CHOSEN = ("llm.quantization", "llm.n_gpu_layers")
THREADS = "llm.n_threads"


def gpu_offload() -> bool:
    return gpu_offload_supported()


class TargetSweeper(Sweeper):
    """Measures settings one job at a time until the target search has its verdict."""

    def __init__(self, storage: str | None = None, study_name: str | None = None) -> None:
        super().__init__()
        self.storage, self.study_name = storage, study_name
        self.study: TargetStudy | None = None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.job_index = 0
        self.search: TargetSearch | None = None
        self.n_layer: int | None = None
        self.started = time.monotonic()

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---- before anything is measured

    def _base_overrides(self, arguments: list[str]) -> list[str]:
        """The command line's overrides, passed to every job; sweep lists and the settings the
        search chooses are refused, ``llm.n_threads`` becomes the thread count tried first."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        kept = []
        for override, text in zip(parser.parse_overrides(arguments), arguments, strict=True):
            key = override.get_key_element()
            if override.is_sweep_override():
                raise UserError(
                    f"{text}: a target search takes no sweep lists; it chooses llm.quantization, "
                    "llm.n_threads and llm.n_gpu_layers itself (candidates: "
                    "llm.target.quantizations=[...], llm.target.n_threads=[...])"
                )
            if key in CHOSEN:
                raise UserError(
                    f"{text}: the target search chooses {key} itself; name the candidates with "
                    "llm.target.quantizations=[...] instead"
                )
            if key != THREADS:  # the configured count reaches each job through Setting
                kept.append(text)
        return kept

    def _check(self, cfg: DictConfig, target: Target, objectives: tuple[str, ...]) -> None:
        if cfg.llm.backend.name != "llama_cpp":
            raise UserError(
                f"llm/backend={cfg.llm.backend.name}: a target search measures llama.cpp; "
                "the mock backend only echoes"
            )
        if not target.speed_only and not cfg.quality.enabled:
            raise UserError(
                "quality.enabled=false, but the target bounds quality (llm.target.max_kld / "
                "max_ppl_increase_pct): enable quality or drop the bound"
            )
        if KLD in objectives and not cfg.quality.enabled:
            raise UserError(
                "quality.enabled=false, but llm.target.objectives has kld (the Pareto front "
                "needs each probe's mean KLD): enable quality or search [speed] only"
            )

    # ---- one measurement = one job

    def _announce(self, setting: Setting) -> None:
        """Which job starts, and how long the search may still take: a probe's job reports
        its own phases, this line the search's."""
        assert self.search is not None
        budget = self.search.probe_budget(self.n_layer)
        pace = ""
        if self.job_index:
            each = (time.monotonic() - self.started) / self.job_index
            left = max(budget - self.job_index, 1) * each
            pace = f" ({duration(each)} per job so far, ETA ≤ {duration(left)})"
        shown = " ".join(setting.overrides())
        print(f"search job {self.job_index + 1} of ≤ {budget}: {shown}{pace}", flush=True)

    def _measure(self, base: list[str], setting: Setting, target: Target) -> Probe:
        assert self.launcher is not None
        self._announce(setting)
        overrides = [*base, *setting.overrides()]
        (job,) = self.launcher.launch([overrides], initial_job_idx=self.job_index)
        self.job_index += 1
        run_dir = Path(job.hydra_cfg.hydra.runtime.output_dir)
        try:
            _ = job.return_value  # a failure outside the job wrapper is raised here
        except BaseException as error:
            self._record_failure(setting, run_dir, str(error) or type(error).__name__)
            raise
        record = read_job_record(run_dir)
        if record is None:
            error = f"job {run_dir} left no readable job.json; the search stops"
            self._record_failure(setting, run_dir, error)
            raise UserError(error)
        if record.get("status") != "ok":
            # the job's own one-line reason (no such file, not a GGUF, …): measuring the
            # other settings of the same file would only repeat it
            error = str(record.get("error") or f"job {run_dir} failed")
            self._record_failure(setting, run_dir, error)
            raise UserError(error)
        probe = probe_from_records(setting, target, record, _read_result(run_dir), run_dir)
        assert self.study is not None
        self.study.record(probe, target)
        self.n_layer = self.n_layer or probe.n_layer
        print(f"[{run_dir.name}] {probe_line(probe, target)}", flush=True)
        return probe

    def _record_failure(self, setting: Setting, run_dir: Path, error: str) -> None:
        assert self.study is not None
        self.study.record_failure(setting, str(run_dir), error)

    # ---- the sweep

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        cfg = self.config
        base = self._base_overrides(list(arguments))
        units = {m.name: m.unit for m in METRICS}
        target = parse_target(OmegaConf.to_container(cfg.llm.target, resolve=True), units)
        objectives = parse_objectives(cfg.llm.target.get("objectives"))
        self._check(cfg, target, objectives)
        models_dir = Path(cfg.paths.models_dir)
        model = OmegaConf.to_container(cfg.llm.model, resolve=True)
        quantizations = quantization_candidates(
            cfg.llm.target.quantizations, model, models_dir, bool(cfg.llm.allow_requantize)
        )
        threads = thread_candidates(cfg.llm.target.n_threads)
        offload = gpu_offload()
        header = _header(target, quantizations, threads, cfg.llm.n_threads, offload)
        for line in header:
            print(line, flush=True)

        sweep_dir = Path(cfg.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, sweep_dir / "multirun.yaml")
        # opened before any job: a storage that cannot be opened costs no measurement
        self.study = open_target_study(
            self.storage, self.study_name, sweep_dir, objectives, target.metric
        )
        self.search = TargetSearch(
            target,
            quantizations,
            threads,
            offload=offload,
            measure=lambda setting: self._measure(base, setting, target),
            default_threads=cfg.llm.n_threads,
        )
        self.started = time.monotonic()
        verdict = self.search.run()
        context = self._context(cfg, base)
        path = write_verdict(sweep_dir, verdict, context, header)
        for line in verdict_lines(verdict, context):
            print(line, flush=True)
        print(f"search: {shown_path(path)}", flush=True)
        self._report_study(sweep_dir, target)
        if not verdict.meets:
            self._fail(cfg, verdict, path)
        return [verdict]

    def _report_study(self, sweep_dir: Path, target: Target) -> None:
        """The study's place (what optuna-dashboard opens) and, with two objectives, the front."""
        study = self.study
        assert study is not None
        if study.multi_objective:
            for path in study.write_pareto(sweep_dir, target.unit, target.metric):
                print(f"pareto: {shown_path(path)}", flush=True)
        url = study.url if "://" in study.url else shown_path(study.url)
        print(f"study: {study.name} ({len(study.study.trials)} trials) in {url}", flush=True)

    def _fail(self, cfg: DictConfig, verdict: Verdict, path: Path) -> None:
        """The verdict and the summary are written; the exit status says the target is not met."""
        assert self.hydra_context is not None
        # Hydra writes the sweep summary only when the sweep returns: write it before raising
        self.hydra_context.callbacks.on_multirun_end(config=cfg)
        closest = verdict.closest
        why = ""
        if closest is not None:
            missed = "; ".join(
                m.describe(verdict.target.unit) for m in misses(closest, verdict.target)
            )
            why = f"; closest {closest.label} {missed}"
        raise UserError(
            f"no config meets the target ({verdict.target.describe()}){why}; "
            f"verdict in {shown_path(path)}"
        )

    def _context(self, cfg: DictConfig, base: list[str]) -> RunContext:
        choices = cfg.hydra.runtime.choices
        models_dir = next((o for o in base if o.startswith("paths.models_dir=")), None)
        prompt = cfg.get("prompt") or (cfg.prompts.get("items") or [""])[0]
        return RunContext(
            llm=OmegaConf.to_container(cfg.llm, resolve=True),
            prompt=str(prompt),
            model_choice=choices.get("llm/model"),
            given_file=cfg.llm.model.get("path"),
            user_overrides=base,
            models_dir_override=models_dir,
        )


def _read_result(run_dir: Path) -> dict[str, Any]:
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}


def probe_from_records(
    setting: Setting, target: Target, record: dict[str, Any], result: dict[str, Any], run_dir: Path
) -> Probe:
    """A job's figures as the search reads them: the searched rate, and quality from the job's
    own quality step (the base file's own row is the reference: KLD 0, PPL ratio 1)."""
    metrics = record.get("metrics") or {}
    std_key = std_of(target.metric)
    reference = metrics.get("quality/reference") is True
    kld = 0.0 if reference else finite_or_none(metrics.get("quality/kl_mean"))
    ppl_ratio = 1.0 if reference else finite_or_none(metrics.get("quality/ppl_ratio"))
    return Probe(
        setting=setting,
        speed=finite_or_none(metrics.get(target.metric)),
        speed_std=finite_or_none(metrics.get(std_key)) if std_key else None,
        kld=kld,
        ppl_ratio=ppl_ratio,
        quantization=metrics.get("quantization"),
        n_threads_used=metrics.get("n_threads"),
        n_layer=result.get("n_layer"),
        file=result.get("model_path"),
        cached=bool(metrics.get("cached")),
        job=str(run_dir),
    )


def _header(
    target: Target,
    quantizations: list[str | None],
    threads: list[int],
    configured: int | None,
    offload: bool,
) -> list[str]:
    names = ", ".join(q or "(the file as it is)" for q in quantizations)
    first = f"llm.n_threads={configured}" if configured else "the physical cores (the default)"
    lines = [f"target: {target.describe()}"]
    if target.speed_only:
        lines.append(
            "no quality bound (llm.target.max_kld, llm.target.max_ppl_increase_pct): speed only, "
            "the most precise quantization that reaches it wins"
        )
    if offload:
        lines.append(
            "GPU offload: quantizations searched with every layer offloaded, then the fewest "
            "n_gpu_layers (0 … n_layer+1) that still meet the target"
        )
    else:
        lines.append(f"{CPU_ONLY_NOTE}: searching quantization × threads")
    lines.append(f"quantizations (most precise first): {names}")
    lines.append(
        f"threads: {first} first; {', '.join(map(str, threads))} tried only where it misses"
    )
    return lines

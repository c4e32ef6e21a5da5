"""The target search's probes as an Optuna study: one trial per probe, the Pareto front of a
two-objective study checked against a brute-force dominance count, a shared storage added to,
and the refusals (a storage that cannot be opened, a study of other objectives) in one line."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from ml_engine.errors import UserError
from ml_engine.llm.target_search import Probe, Setting, Target, TargetSearch
from ml_engine.llm.target_study import (
    KLD,
    SPEED,
    TargetStudy,
    open_target_study,
    parse_objectives,
)
from ml_engine.run import study_plots
from ml_engine.run.optuna_study import open_storage
from tests.llm.conftest import generate_cli

METRIC = "gen/tokens_per_s"
QUANTS = ["f16", "q8_0", "q6_k", "q4_k_m", "q2_k"]
# made-up figures: faster and worse as precision falls
SPEEDS = dict(zip(QUANTS, [10.0, 20.0, 30.0, 40.0, 50.0], strict=True))
KLDS = dict(zip(QUANTS, [0.0, 0.001, 0.01, 0.1, 1.0], strict=True))


def _probe(quantization: str, speed: float | None, kld: float | None, threads: int = 1) -> Probe:
    return Probe(
        Setting(quantization, threads, 0),
        speed=speed,
        speed_std=0.5,
        kld=kld,
        ppl_ratio=None if kld is None else 1.0 + kld,
        quantization=quantization,
        n_threads_used=threads,
        job=f"/runs/{quantization}-{threads}",
    )


def _open(tmp_path: Path, objectives: tuple[str, ...], **kwargs: str) -> TargetStudy:
    return open_target_study(
        kwargs.get("storage"),
        kwargs.get("name"),
        tmp_path,
        objectives,
        kwargs.get("metric", METRIC),
    )


def _non_dominated(trials: list) -> set[int]:
    """Brute force: the complete trials no other is at least as fast and as close and better on
    one of the two."""
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]

    def beats(a, b) -> bool:
        (sa, ka), (sb, kb) = a.values, b.values
        return sa >= sb and ka <= kb and (sa > sb or ka < kb)

    return {t.number for t in done if not any(beats(o, t) for o in done)}


def _pareto_rows(path: Path) -> list[list[str]]:
    rows = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_each_probe_is_one_trial_with_its_setting_and_values(tmp_path: Path) -> None:
    target = Target(25)
    study = _open(tmp_path, (SPEED, KLD))

    def measure(setting: Setting) -> Probe:
        probe = _probe(
            setting.quantization, SPEEDS[setting.quantization], KLDS[setting.quantization]
        )
        study.record(probe, target)
        return probe

    verdict = TargetSearch(target, QUANTS, [1], offload=False, measure=measure).run()
    trials = study.study.trials
    assert len(trials) == len(verdict.probes) >= 2
    for trial, probe in zip(trials, verdict.probes, strict=True):
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.params == {
            "quantization": probe.quantization,
            "n_threads": 1,
            "n_gpu_layers": 0,
        }
        assert trial.values == [probe.speed, probe.kld]
        assert trial.user_attrs["job"] == probe.job and trial.user_attrs["cached"] is False
        assert trial.user_attrs["tokens_per_s_std"] == 0.5
    assert (tmp_path / "optuna.journal").is_file()  # the default storage: the sweep dir's journal


def test_the_pareto_table_holds_exactly_the_non_dominated_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the pictures are the end-to-end test's; drawing them here would triple this test's time
    drawn = []
    monkeypatch.setattr(study_plots, "write_study_plots", lambda *args: drawn.append(args) or [])
    study = _open(tmp_path, (SPEED, KLD))
    figures = [(10, 0.0), (20, 0.001), (20, 0.001), (15, 0.01), (30, 0.5), (25, 0.5), (30, 0.4)]
    figures += [(5, 0.0), (40, None)]  # the last: no KLD measured, a FAIL trial
    for index, (speed, kld) in enumerate(figures):
        study.record(_probe(QUANTS[index % len(QUANTS)], speed, kld, threads=index + 1), Target(1))
    study.record_failure(Setting("q2_k", 2, 0), "/runs/x", "llama.cpp could not load it")
    paths = study.write_pareto(tmp_path, "tok/s", METRIC)
    assert paths == [tmp_path / "pareto.md"]
    assert drawn == [(tmp_path, study.url, "llm_target", [f"{METRIC} (tok/s)", "mean KLD (nats)"])]
    rows = _pareto_rows(tmp_path / "pareto.md")
    front = _non_dominated(study.study.trials)
    assert {int(row[0]) for row in rows} == front == {0, 1, 2, 6}
    speeds = [float(row[4].split()[0]) for row in rows]
    assert speeds == sorted(speeds, reverse=True)  # fastest first
    assert rows[0][4] == "30.0 ± 0.5 tok/s" and rows[0][5] == "0.4"
    states = [t.state.name for t in study.study.trials[-2:]]
    assert states == ["FAIL", "FAIL"]
    assert study.study.trials[-2].user_attrs["reason"] == "not measured: kld"
    assert study.study.trials[-1].user_attrs["error"] == "llama.cpp could not load it"


def test_a_study_of_other_objectives_or_another_rate_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "shared.journal")
    _open(tmp_path, (SPEED,), storage=url, name="s")
    with pytest.raises(UserError, match=r"is a study to maximize; .* name another study$"):
        _open(tmp_path, (SPEED, KLD), storage=url, name="s")
    with pytest.raises(UserError, match="records gen/tokens_per_s; this search measures"):
        _open(tmp_path, (SPEED,), storage=url, name="s", metric="prompt/tokens_per_s")
    assert _open(tmp_path, (SPEED, KLD), storage=url, name="other").multi_objective


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (SPEED,)),
        (["speed"], (SPEED,)),
        (["kld", "speed"], (SPEED, KLD)),
        ("speed", (SPEED,)),
    ],
)
def test_objectives(value, expected) -> None:
    assert parse_objectives(value) == expected


@pytest.mark.parametrize("value", [["kld"], ["speed", "ppl"], [], 3])
def test_invalid_objectives_are_refused(value) -> None:
    with pytest.raises(
        UserError, match=r"^llm.target.objectives=.* is not valid; expected \[speed\]"
    ):
        parse_objectives(value)


# ---- end to end on the tiny model

PARETO = ("hparams_search=llm_target", "llm.target.objectives=[speed,kld]")


def _sweep_dir(outputs: Path) -> Path:
    (path,) = outputs.glob("generate/multiruns/*")
    return path


def _study(url: str | Path, name: str = "llm_target") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(url)))


def test_a_two_objective_search_writes_the_pareto_front_of_its_probes(
    tmp_path: Path, models_dir: Path
) -> None:
    result = generate_cli(
        *PARETO,
        "llm.target.tokens_per_s=1",
        "llm.target.max_kld=0.05",
        "llm.target.quantizations=[f16,q8_0,q6_k,q4_k_m,q2_k]",
        models_dir=models_dir,
        outputs=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sweep = _sweep_dir(tmp_path)
    verdict = json.loads((sweep / "search.json").read_text())
    study = _study(sweep / "optuna.journal")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.trials
    # one trial per probe, in the order measured, with the figures the verdict shows
    assert [t.user_attrs["job"] for t in trials] == [p["job"] for p in verdict["probes"]]
    for trial, probe in zip(trials, verdict["probes"], strict=True):
        assert trial.params["quantization"] == probe["quantization"]
        assert trial.params["n_threads"] == probe["n_threads"] == 1
        assert trial.values == [probe["gen/tokens_per_s"], probe["kl_mean"]]
    rows = _pareto_rows(sweep / "pareto.md")
    assert {int(row[0]) for row in rows} == _non_dominated(trials)
    assert (sweep / "study" / "pareto_front.png").stat().st_size > 1000
    for name in ("pareto.md", "study/pareto_front.html", "study/pareto_front.png"):
        assert f"pareto: {sweep / name}" in result.stdout
    # the verdict is today's: nothing of the study in search.md / search.json
    assert "pareto" not in (sweep / "search.md").read_text()
    assert "optuna" not in json.dumps(verdict) and "pareto" not in json.dumps(verdict)


def test_a_rerun_with_the_same_storage_adds_to_the_study(tmp_path: Path, models_dir: Path) -> None:
    storage = tmp_path / "llm.journal"
    args = (
        "hparams_search=llm_target",
        "llm.target.tokens_per_s=1",
        "llm.target.quantizations=[q8_0,q4_k_m]",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=shared",
    )
    first = generate_cli(*args, models_dir=models_dir, outputs=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    count = len(_study(storage, "shared").trials)
    again = generate_cli(*args, models_dir=models_dir, outputs=tmp_path / "b")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"study: shared ({2 * count} trials) in {storage}" in again.stdout
    trials = _study(storage, "shared").trials
    assert [t.number for t in trials] == list(range(2 * count))
    assert all(t.state.name == "COMPLETE" and len(t.values) == 1 for t in trials)
    assert all(t.user_attrs["cached"] for t in trials[count:])  # the measurement cache's
    assert not (_sweep_dir(tmp_path / "a") / "optuna.journal").exists()


def test_a_failed_job_is_a_failed_trial(tmp_path: Path, models_dir: Path) -> None:
    missing = tmp_path / "nothere.gguf"
    result = generate_cli(
        "hparams_search=llm_target",
        "llm.target.tokens_per_s=5",
        f"llm.model.path={missing}",
        models_dir=models_dir,
        outputs=tmp_path,
    )
    assert result.returncode == 1
    (trial,) = _study(_sweep_dir(tmp_path) / "optuna.journal").trials
    assert trial.state.name == "FAIL"
    assert trial.params["quantization"] == "as_is"
    assert trial.user_attrs["error"].endswith("no such file (expected a .gguf)")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("hydra.sweeper.storage={tmp}/missing/llm.journal",),
            "error: hydra.sweeper.storage={tmp}/missing/llm.journal: the folder {tmp}/missing "
            "does not exist; expected an RDB URL",
        ),
        (
            ("hydra.sweeper.storage=sqlite:///{tmp}/missing/llm.db",),
            "error: hydra.sweeper.storage=sqlite:///{tmp}/missing/llm.db: the folder",
        ),
        (("llm.target.objectives=[speed,ppl]",), "error: llm.target.objectives=['speed', 'ppl']"),
        (
            ("llm.target.objectives=[speed,kld]", "quality.enabled=false"),
            "error: quality.enabled=false, but llm.target.objectives has kld",
        ),
    ],
)
def test_a_study_that_cannot_be_kept_is_one_line_before_any_job(
    tmp_path: Path, models_dir: Path, overrides: tuple[str, ...], message: str
) -> None:
    result = generate_cli(
        "hparams_search=llm_target",
        "llm.target.tokens_per_s=5",
        *(o.format(tmp=tmp_path) for o in overrides),
        models_dir=models_dir,
        outputs=tmp_path,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(message.format(tmp=tmp_path)), errors[0]
    assert not list(tmp_path.rglob("job.json"))

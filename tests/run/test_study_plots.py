"""A study's pictures: Optuna's plots as offline HTML and PNG in ``<sweep dir>/study/``."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import optuna
import pytest
from PIL import Image

from ml_engine.run.optuna_study import open_storage
from ml_engine.run.study_plots import INDEX_JSON, PLOTLY_JS, STUDY_DIR, write_study_plots

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    width = trial.suggest_int("width", 8, 64)
    kind = trial.suggest_categorical("kind", ["cnn", "mlp"])
    return (lr * 10 - 0.3) ** 2 + width / 100 + (kind == "mlp")


def _study(storage: str, name: str, n_trials: int, directions: list[str]) -> optuna.Study:
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(storage),
        directions=directions,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    if len(directions) == 1:
        study.optimize(_objective, n_trials=n_trials)
    else:
        study.optimize(lambda t: (_objective(t), float(t.params["width"])), n_trials=n_trials)
    return study


def _in_json(text: str, page: str) -> bool:
    # plotly's JSON writes "/" as \u002f (no "</script>" can end its script early)
    return text.replace("/", "\\u002f") in page


def _check_written(sweep_dir: Path, written: list[Path]) -> dict:
    folder = sweep_dir / STUDY_DIR
    index = json.loads((folder / INDEX_JSON).read_text())
    assert folder / INDEX_JSON in written and folder / PLOTLY_JS in written
    assert (folder / PLOTLY_JS).stat().st_size > 1_000_000  # plotly.js itself, not a stub
    for plot in index["plots"]:
        html, png = folder / plot["html"], folder / plot["png"]
        assert html in written and png in written
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 0 and image.height > 0
        page = html.read_text()
        sources = re.findall(r"<script[^>]*\bsrc=\"([^\"]*)\"", page)
        assert sources == [PLOTLY_JS], sources  # the folder's own copy: opens offline
        assert "cdn" not in page.lower() and 'src="https://' not in page
        assert _in_json(plot["title"], page)
    assert not list(folder.glob(".*.partial"))  # every file renamed into place whole
    return index


def test_a_single_objective_study_gets_history_importances_and_coordinates(
    tmp_path: Path,
) -> None:
    journal = str(tmp_path / "optuna.journal")
    _study(journal, "mnist", 12, ["maximize"])
    written = write_study_plots(tmp_path, journal, "mnist", target_names=["val/acc_best"])
    index = _check_written(tmp_path, written)
    names = [p["name"] for p in index["plots"]]
    assert names == ["history", "importances", "parallel_coordinate"]
    assert index["objectives"] == ["val/acc_best"] and index["skipped"] == []
    assert _in_json("val/acc_best", (tmp_path / STUDY_DIR / "history.html").read_text())
    assert (index["study"], index["trials"], index["directions"]) == ("mnist", 12, ["maximize"])


def test_a_multi_objective_study_gets_a_pareto_front_and_a_history_per_objective(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _study(url, "two", 8, ["minimize", "maximize"])
    written = write_study_plots(tmp_path, url, "two", target_names=["val/loss", "tokens_per_s"])
    index = _check_written(tmp_path, written)
    names = {p["name"] for p in index["plots"]}
    assert {"history_0", "history_1", "importances_0", "pareto_front"} <= names
    assert {"parallel_coordinate_0", "parallel_coordinate_1", "importances_1"} <= names
    pareto = next(p for p in index["plots"] if p["name"] == "pareto_front")
    assert pareto["title"] == "Pareto front: val/loss vs tokens_per_s"


def test_plots_optuna_cannot_draw_are_skipped_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = str(tmp_path / "optuna.journal")
    study = _study(journal, "one", 1, ["maximize"])
    with caplog.at_level(logging.INFO, logger="ml_engine.run.study_plots"):
        index = _check_written(tmp_path, write_study_plots(tmp_path / ".", journal, "one"))
    assert [p["name"] for p in index["plots"]] == ["history", "parallel_coordinate"]
    reason = "parameter importances need 2 complete trials, the study has 1"
    assert index["skipped"] == [{"name": "importances", "reason": reason}]
    assert f"study plot importances skipped: {reason}" in caplog.text

    # only pruned and failed trials: nothing to draw, still no exception
    empty = tmp_path / "empty"
    pruned = optuna.create_study(study_name="pruned", storage=open_storage(journal))
    trial = pruned.ask()
    trial.report(0.5, step=1)
    pruned.tell(trial, state=optuna.trial.TrialState.PRUNED)
    pruned.tell(pruned.ask(), state=optuna.trial.TrialState.FAIL)
    written = write_study_plots(empty, journal, "pruned")
    index = json.loads((empty / STUDY_DIR / INDEX_JSON).read_text())
    assert written == [empty / STUDY_DIR / INDEX_JSON] and index["plots"] == []
    assert {s["reason"] for s in index["skipped"]} == {"the study has no complete trial"}
    assert study.best_value is not None


def test_a_study_that_cannot_be_loaded_writes_nothing_and_raises_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = str(tmp_path / "optuna.journal")
    _study(journal, "there", 2, ["maximize"])
    assert write_study_plots(tmp_path, journal, "not-there") == []
    assert write_study_plots(tmp_path, str(tmp_path / "no" / "such.journal"), "there") == []
    assert not (tmp_path / STUDY_DIR).exists()
    assert "cannot load study 'not-there'" in caplog.text


def test_a_single_parameter_study_skips_importances_and_pruned_trials_are_left_out(
    tmp_path: Path,
) -> None:
    journal = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="lr", storage=open_storage(journal))
    for index in range(5):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.report(lr, step=1)
        state = optuna.trial.TrialState.PRUNED if index == 2 else optuna.trial.TrialState.COMPLETE
        study.tell(trial, lr if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    index = _check_written(tmp_path, write_study_plots(tmp_path, journal, "lr"))
    assert [p["name"] for p in index["plots"]] == ["history", "parallel_coordinate"]
    assert index["skipped"][0]["reason"] == (
        "parameter importances need 2 varied parameters, the study has 1"
    )

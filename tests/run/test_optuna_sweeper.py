"""The Optuna sweeper's pieces: the params syntax, every sampler option, directions, pruners;
and a grid-sampler and a two-objective sweep as users run them."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from ml_engine.errors import UserError
from ml_engine.run.optuna_study import open_storage
from ml_engine.run.optuna_sweeper import OptunaSweeper, directions_of
from ml_engine.run.optuna_trial import make_pruner
from ml_engine.run.search_space import parse_search_space
from tests.conftest import CLI_TEST_OVERRIDES, compose_config, run_entrypoint

PARSER = OverridesParser.create()
SAMPLERS = sorted(p.stem for p in Path("conf/hydra/sweeper/sampler").glob("*.yaml"))


def space(params: dict | None = None, *arguments: str):
    return parse_search_space(params, arguments, PARSER)


def test_the_params_syntax_of_hydra_optuna_sweeper() -> None:
    parsed = space(
        {
            "lr": "tag(log, interval(0.0001, 0.1))",
            "dropout": "interval(0.0, 0.5)",
            "layers": "tag(int, interval(1, 4))",
            "scale": "interval(1, 4)",
            "batch": "choice(32, 64)",
            "widths": "choice([16,32], [24,48])",
            "seed": "range(1, 7, 2)",
            "epochs": 3,
        },
        "batch=16,128",  # the command line wins, a comma list is a choice
    )
    d = parsed.distributions
    assert d["lr"] == FloatDistribution(0.0001, 0.1, log=True)
    assert d["dropout"] == FloatDistribution(0.0, 0.5)
    assert d["layers"] == IntDistribution(1, 4)
    assert d["scale"] == FloatDistribution(1.0, 4.0)  # Hydra reads interval bounds as floats
    assert d["batch"] == CategoricalDistribution([16, 128])
    assert d["widths"] == CategoricalDistribution(["[16,32]", "[24,48]"])
    assert d["seed"] == CategoricalDistribution([1, 3, 5])
    assert parsed.fixed == ["epochs=3"]
    overrides = parsed.overrides({"widths": "[16,32]", "lr": 0.01})
    assert overrides == ["epochs=3", "widths=[16,32]", "lr=0.01"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lr": "tag(log, interval(0, 1))"}, "log interval needs a low bound > 0"),
        ({"lr": "interval(1, 0.5)"}, "is empty"),
        ({"lr": 0.1}, "nothing to search"),
        ({"lr": "choice(1,"}, "hydra.sweeper.params"),
    ],
)
def test_a_bad_search_space_is_one_line(params, message) -> None:
    with pytest.raises(UserError, match=message):
        space(params)


def test_the_grid_needs_finite_values() -> None:
    assert space({"a": "choice(1, 2)", "b": "range(0, 3)"}).grid() == {"a": [1, 2], "b": [0, 1, 2]}
    with pytest.raises(UserError, match="grid sampler needs a finite set of values"):
        space({"a": "interval(0.0, 1.0)"}).grid()


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_option_samples_the_search_space(name: str) -> None:
    assert set(SAMPLERS) == {"cmaes", "grid", "nsgaii", "random", "tpe"}
    cfg = compose_config("train", ["hydra/sweeper=optuna", f"hydra/sweeper/sampler={name}"])
    sampler_cfg = cfg.hydra.sweeper.sampler
    directions = ["maximize", "minimize"] if name == "nsgaii" else ["maximize"]
    sweeper = OptunaSweeper(sampler=sampler_cfg, directions=directions)
    searched = space(
        {"a": "choice(1, 2)", "b": "interval(0.0, 1.0)" if name != "grid" else "range(0, 2)"}
    )
    study = optuna.create_study(sampler=sweeper._sampler(searched), directions=directions)
    seen = []
    for _ in range(4):
        trial = study.ask(fixed_distributions=searched.distributions)
        seen.append(tuple(trial.params.values()))
        # the grid sampler stops the study after its last cell (outside optimize(): an error)
        with contextlib.suppress(RuntimeError):
            study.tell(trial, [1.0] * len(directions))
    assert all(trial.params.keys() == {"a", "b"} for trial in study.trials)
    if name == "grid":  # every combination once
        assert sorted(seen) == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_a_setting_the_chosen_sampler_does_not_take_is_one_line() -> None:
    # mnist_optuna's TPE settings, with another sampler chosen
    cfg = compose_config("train", ["hparams_search=mnist_optuna", "hydra/sweeper/sampler=random"])
    sweeper = OptunaSweeper(sampler=cfg.hydra.sweeper.sampler)
    with pytest.raises(UserError) as error:
        sweeper._sampler(space({"a": "choice(1, 2)"}))
    assert str(error.value) == (
        "hydra.sweeper.sampler.n_startup_trials is not a setting of RandomSampler; accepted: "
        "seed (remove it with ~hydra.sweeper.sampler.n_startup_trials)"
    )


def test_directions_and_pruners_are_checked() -> None:
    assert directions_of("maximize", None) == ["maximize"]
    assert directions_of("minimize", ["maximize", "minimize"]) == ["maximize", "minimize"]
    with pytest.raises(UserError, match="accepted: minimize, maximize"):
        directions_of("up", None)
    assert isinstance(make_pruner("median"), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    with pytest.raises(UserError, match="accepted: none, median, hyperband"):
        make_pruner("sometimes")
    with pytest.raises(UserError, match="single-objective studies only"):
        OptunaSweeper(directions=["maximize", "minimize"], pruner="median")
    with pytest.raises(UserError, match="unknown key 'search_spaces'"):
        OptunaSweeper(search_spaces={})


FAST = (
    *CLI_TEST_OVERRIDES,
    "logger=none",
    "model=mlp_mnist",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "test=false",
)


@pytest.mark.slow
def test_a_grid_sampler_sweep_runs_every_combination_once(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py",
        "-m",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=grid",
        *FAST,
        "optimized_metric=val/acc_best",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=10",  # the grid has 4: the study stops when it is walked
        "model.optimizer.lr=choice(0.001, 0.003)",
        "datamodule.batch_size=32,64",
        f"hydra.sweep.dir={tmp_path / 'grid'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "grid" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    combos = sorted(
        tuple(
            o
            for o in r["overrides"].split()
            if o.startswith(("model.optimizer.lr=", "datamodule.batch_size="))
        )
        for r in rows
    )
    assert len(rows) == 4 and len(set(combos)) == 4


@pytest.mark.slow
def test_a_two_objective_sweep_keeps_the_pareto_front(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "pareto"
    result = run_entrypoint(
        "train.py",
        "-m",
        "hydra/sweeper=optuna",
        "hydra/sweeper/sampler=nsgaii",
        *FAST,
        "optimized_metric=[val/acc_best,wall_s]",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.seed=1",
        "model.optimizer.lr=interval(0.0005, 0.01)",
        "datamodule.batch_size=choice(32, 128)",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(
        study_name="train", storage=open_storage(str(sweep_dir / "optuna.journal"))
    )
    assert len(study.directions) == 2 and len(study.trials) == 4
    jobs = {j["trial"]: j for j in json.loads((sweep_dir / "summary.json").read_text())["jobs"]}
    for trial in study.trials:  # each trial's values are its job's two metrics
        metrics = jobs[trial.number]["metrics"]
        assert trial.values == pytest.approx([metrics["val/acc_best"], metrics["wall_s"]])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    front = {s["trial"] for s in results["solutions"]}
    assert front == {t.number for t in study.best_trials} and front
    index = json.loads((sweep_dir / "study" / "index.json").read_text())
    assert "pareto_front" in {plot["name"] for plot in index["plots"]}
    assert "value0" in (sweep_dir / "study.md").read_text()


def test_a_corrupt_journal_is_one_line_and_leaves_no_sweep_dir(tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    journal.write_text("not a journal\n")
    result = run_entrypoint(
        "train.py", "-m", "hparams_search=mnist_optuna", *CLI_TEST_OVERRIDES,
        f"hydra.sweeper.storage={journal}", f"paths.log_dir={tmp_path / 'logs'}",
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"hydra.sweeper.storage={journal}: cannot read its studies" in errors[0]
    assert not (tmp_path / "logs").exists()

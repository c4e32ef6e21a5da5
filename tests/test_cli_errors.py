"""Mistakes a user can make end in one line, a non-zero exit and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CLI_TEST_OVERRIDES, ok_job_records, run_entrypoint


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def common(tmp_path: Path) -> list[str]:
    return [*CLI_TEST_OVERRIDES, f"paths.log_dir={tmp_path}", "logger=none"]


def eval_common(tmp_path: Path) -> list[str]:
    return [f"paths.log_dir={tmp_path}", "datamodule.source=bundled", "extras.print_config=false"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            "model=resnet",
            (
                "unknown model 'resnet'",
                "cnn_mnist, efficientnet_b0, llama_char, mlp_mnist, mobilenet_v3_small, resnet18",
            ),
        ),
        ("datamodule=cifar", ("unknown datamodule 'cifar'", "mnist")),
        ("trainer=tpu", ("unknown trainer 'tpu'", "ddp_cpu")),
        ("logger=neptune", ("unknown logger 'neptune'", "tensorboard, wandb")),
        ("model.optimizer.lr=abc", ("model.optimizer.lr='abc'", "a number > 0")),
        ("datamodule.batch_size=0", ("datamodule.batch_size=0", "an integer ≥ 1")),
        ("datamodule.source=kaggle", ("datamodule.source='kaggle'", "auto, torchvision, bundled")),
        ("model.net.name=resnet", ("unknown network 'resnet'", "cnn_mnist")),
        ("trainer.accelerator=mps", ("trainer.accelerator='mps'", "no Apple MPS", "cpu")),
        ("trainer=gpu", ("trainer.accelerator='gpu'", "no CUDA GPU", "available here: auto, cpu")),
        ("trainer.accelerator=tpu9", ("not known", "auto, cpu")),
    ],
)
def test_train_user_errors(tmp_path: Path, override: str, fragments: tuple[str, ...]) -> None:
    overrides = common(tmp_path)
    if override.startswith("trainer"):  # let the trainer option choose its own accelerator
        overrides.remove("trainer.accelerator=cpu")
    result = run_entrypoint("train.py", *overrides, override)
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.rglob("*.ckpt")) and not ok_job_records(tmp_path)


def test_full_traceback_when_asked(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py", *common(tmp_path), "model.optimizer.lr=abc", env={"HYDRA_FULL_ERROR": "1"}
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    result = run_entrypoint("eval.py", *eval_common(tmp_path), f"ckpt_path={missing}")
    assert_one_line_error(result, "checkpoint not found", str(missing))


@pytest.mark.slow
def test_resume_from_missing_checkpoint(tmp_path: Path) -> None:
    result = run_entrypoint("train.py", *common(tmp_path), f"ckpt_path={tmp_path}/last.ckpt")
    assert_one_line_error(result, "checkpoint not found")


@pytest.mark.slow
def test_corrupt_checkpoint(tmp_path: Path) -> None:
    corrupt = tmp_path / "best.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    result = run_entrypoint(
        "predict.py", f"paths.log_dir={tmp_path}", f"ckpt_path={corrupt}", f"input={tmp_path}"
    )
    assert_one_line_error(result, "could not load checkpoint", str(corrupt))


@pytest.mark.slow
def test_eval_without_ckpt_path(tmp_path: Path) -> None:
    result = run_entrypoint("eval.py", *eval_common(tmp_path))
    assert_one_line_error(result, "ckpt_path")


def runs_listing(log_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(log_dir)) for p in log_dir.rglob("*"))


@pytest.mark.parametrize(
    ("script", "overrides", "fragments"),
    [
        # the command: three optional groups, Hydra skipped every one silently
        (
            "train.py",
            ("experiment=nope", "hparams_search=nada", "debug=fdr"),
            ("unknown experiment 'nope'", "accepted: mlp_quick"),
        ),
        ("train.py", ("hparams_search=nada",), ("unknown hparams_search 'nada'", "mnist_optuna")),
        ("train.py", ("debug=fdrx",), ("unknown debug 'fdrx'", "fdr, limit, overfit, profiler")),
        ("train.py", ("-m", "model=cnn_mnist,mlpx"), ("unknown model 'mlpx'", "cnn_mnist")),
        ("train.py", ("hydra/launcher=slurmm",), ("unknown hydra/launcher 'slurmm'", "basic")),
        ("eval.py", ("ckpt_path=x.ckpt", "datamodule=nope"), ("unknown datamodule 'nope'",)),
        ("predict.py", ("ckpt_path=x", "input=y", "paths=nope"), ("unknown paths 'nope'",)),
        ("generate.py", ("llm/model=tiny2",), ("unknown llm/model 'tiny2'", "tiny")),
        ("generate.py", ("llm/backend=mok",), ("unknown llm/backend 'mok'", "llama_cpp, mock")),
        ("generate.py", ("prompts=german",), ("unknown prompts 'german'", "code, english")),
        ("serve.py", ("hydra/sweeper=optuna2",), ("unknown hydra/sweeper 'optuna2'", "optuna")),
    ],
)
def test_unknown_group_options_are_refused(
    tmp_path: Path, script: str, overrides: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    result = run_entrypoint(script, *overrides, f"paths.log_dir={tmp_path}", timeout=120)
    assert_one_line_error(result, *fragments)
    assert runs_listing(tmp_path) == []  # refused before Hydra made a run dir


def test_slurm_launcher_without_its_extra_names_the_install(tmp_path: Path) -> None:
    from ml_engine.run.group_options import SLURM, is_importable

    if is_importable(SLURM.module):
        pytest.skip("hydra-submitit-launcher is installed here")
    result = run_entrypoint(
        "train.py", "-m", "hydra/launcher=slurm", f"paths.log_dir={tmp_path}", "seed=1,2"
    )
    assert_one_line_error(result, "hydra/launcher=slurm", "hydra-submitit-launcher")
    assert 'pip install -e ".[slurm]"' in result.stderr  # this test runs from a checkout
    assert runs_listing(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "override", "fragment"),
    [
        ("train.py", "model.optimizer.lr=abc", "model.optimizer.lr='abc'"),
        ("train.py", "trainer.accelerator=mps", "no Apple MPS"),
        ("train.py", "experiment=nope", "unknown experiment"),
        ("train.py", "ckpt_path=missing.ckpt", "checkpoint not found"),
        ("eval.py", "ckpt_path=missing.ckpt", "checkpoint not found"),
        ("predict.py", "batch_size=0", "batch_size=0"),
    ],
)
def test_refused_runs_leave_no_run_dir(
    tmp_path: Path, script: str, override: str, fragment: str
) -> None:
    task = {"train.py": "train", "eval.py": "eval", "predict.py": "predict"}[script]
    earlier_run = tmp_path / task / "runs" / "2020-01-01_00-00-00_abcdef"
    earlier_run.mkdir(parents=True)
    (earlier_run / "job.json").write_text('{"status": "ok", "metrics": {}}')
    before = runs_listing(tmp_path)
    required = {"eval.py": ["ckpt_path=missing.ckpt"], "predict.py": ["ckpt_path=x", "input=y"]}
    overrides = [*eval_common(tmp_path), *required.get(script, [])]
    if script == "predict.py":
        overrides = [f"paths.log_dir={tmp_path}", *required[script]]
    result = run_entrypoint(script, *overrides, override, timeout=300)
    assert_one_line_error(result, fragment)
    assert runs_listing(tmp_path) == before


def test_failed_sweep_jobs_keep_their_record(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py", "-m", *common(tmp_path), "model.optimizer.lr=abc,-1", timeout=300
    )
    records = sorted(tmp_path.glob("train/multiruns/*/*/job.json"))
    assert len(records) == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert all('"status": "failed"' in record.read_text() for record in records)

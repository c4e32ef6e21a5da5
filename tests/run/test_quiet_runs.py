"""Issue 24, points 3 and 6: a run says what it runs in one line (the config tree on request),
sweep jobs do not repeat Lightning's tips, and a refused run leaves the runs folder as it was."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_engine.llm.models import model_path
from ml_engine.run.group_options import SLURM, is_importable
from tests.conftest import CLI_TEST_OVERRIDES, run_entrypoint
from tests.llm.conftest import models_dir, tiny_f32, tiny_model_cfg  # noqa: F401 (fixtures)
from tests.llm.test_model_path import _unknown_architecture

QUICK_TRAIN = (
    "experiment=mlp_quick",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
)
# Lightning's lines that every sweep job printed again (issue 24: an 809-line log for 4 jobs)
REPEATED_NOISE = (
    "Tip:",
    "GPU available: False",
    "TPU available: False",
    "Trainer already configured with model summary callbacks",
    "to estimate number of stepping batches",
    "Instantiating callback",
)


def summary_lines(stdout: str, task: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"{task}: ")]


@pytest.mark.slow
def test_a_sweep_prints_one_summary_per_job_and_no_repeated_tips(tmp_path: Path) -> None:
    result = run_entrypoint(
        "train.py", "-m", *QUICK_TRAIN, f"paths.log_dir={tmp_path}", "seed=1,2", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    summaries = summary_lines(result.stdout, "train")
    assert len(summaries) == 2, output[-3000:]
    for job, line in enumerate(summaries):
        assert "model=mlp_mnist data=mnist(bundled) device=cpu precision=32-true" in line, line
        assert "logger=tensorboard" in line and "/train/multiruns/" in line, line
        assert line.endswith(f"/{job}"), line
    assert "CONFIG" not in output  # the tree is off by default
    for noise in REPEATED_NOISE:
        assert noise not in output, noise
    for job in ("0", "1"):  # the tree a run no longer prints is in its dir
        job_dir = next(tmp_path.glob(f"train/multiruns/*/{job}"))
        assert (job_dir / ".hydra" / "config.yaml").is_file()
        assert "mlp_mnist" in (job_dir / "config_resolved.yaml").read_text()


MOCK_GENERATE = ("llm/backend=mock", "logger=none", "llm.max_tokens=4", "bench.repetitions=1")


@pytest.mark.parametrize("print_config", [False, True])
def test_generate_prints_its_summary_and_the_tree_only_on_request(
    tmp_path: Path, print_config: bool
) -> None:
    result = run_entrypoint(
        "generate.py",
        *MOCK_GENERATE,
        f"paths.log_dir={tmp_path}",
        f"extras.print_config={str(print_config).lower()}",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = summary_lines(result.stdout, "generate")
    # the packaged default model by its name, not its file inside the package
    assert "model=shakespeare " in summary and "backend=mock" in summary
    assert "prompts=code" in summary
    run_dir = result.stdout.strip().splitlines()[-1].removeprefix("run_dir: ")
    assert summary.endswith(f"run_dir={run_dir}"), summary
    assert ("CONFIG" in result.stdout) is print_config
    assert ("max_tokens: 4" in result.stdout) is print_config


@pytest.mark.parametrize(
    ("task", "overrides", "expected"),
    [
        ("train", ["experiment=shakespeare_char", "logger=csv"], "model=llama data=text(bundled)"),
        ("eval", ["ckpt_path=a/best.ckpt", "datamodule.source=bundled"], "data=mnist(bundled)"),
        ("predict", ["ckpt_path=a/best.ckpt", "input=pics", "output=p.csv"], "input=pics"),
        ("export", ["ckpt_path=a/last.ckpt", "quantization=q8_0"], "quantization=q8_0"),
        ("generate", ["llm.n_gpu_layers=99"], "model=shakespeare quantization=f16"),
    ],
)
def test_each_task_summary_names_its_own_choices(
    tmp_path: Path, task: str, overrides: list[str], expected: str
) -> None:
    """The summary of the tasks whose runs need a checkpoint or a model file, from the config
    their entrypoint composes (run_summary reads nothing else)."""
    from hydra.core.hydra_config import HydraConfig

    from ml_engine.run.extras import run_summary
    from tests.conftest import compose_config

    cfg = compose_config(task, [*overrides, f"paths.output_dir={tmp_path}/run"])
    HydraConfig().set_config(cfg)
    line = run_summary(cfg)
    assert line.startswith(f"{task}: ") and expected in line, line
    assert line.endswith(f"run_dir={tmp_path}/run"), line
    if task in ("eval", "predict", "export"):
        assert f"ckpt={overrides[0].removeprefix('ckpt_path=')}" in line, line
    if task in ("train", "eval"):
        assert "device=" in line and "precision=" in line, line


# --- point 6: every one-line error the README lists leaves the runs folder as it was ---------


@pytest.fixture
def materials(tmp_path: Path, tiny_f32: Path) -> Iterator[dict[str, str]]:  # noqa: F811
    """The files and folders the README's mistakes name, made under tmp_path."""
    made = tmp_path / "made"
    made.mkdir()
    notes = made / "notes.txt"
    notes.write_bytes(b"no\xef\xbb text \xff")
    (made / "notes.gguf").write_bytes(b"not a GGUF, only words" * 20)
    data = tiny_f32.read_bytes()
    (made / "half.gguf").write_bytes(data[: len(data) // 2])
    _unknown_architecture(made / "future.gguf")
    (made / "half.ckpt").write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    (made / "plain.txt").write_text("just some notes\n")
    truncated_models = made / "truncated_models"
    truncated = model_path(tiny_model_cfg(), "q8_0", truncated_models)
    truncated.parent.mkdir(parents=True, exist_ok=True)
    truncated.write_bytes(data[: len(data) // 2])
    images = made / "images"
    (images / "ten").mkdir(parents=True)
    (images / "one").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "one" / "ok.png")
    for label in ("one", "two"):
        (made / "good" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(made / "good" / label / "ok.png")
    (made / "broken").mkdir()
    (made / "broken" / "one").mkdir()
    (made / "broken" / "one" / "broken.png").write_bytes(b"\x89PNG broken")
    (made / "empty").mkdir()
    (made / "link_target").write_text("x")
    (made / "link").symlink_to(made / "link_target")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield {
            "made": str(made),
            "notes": str(notes),
            "port": str(busy.getsockname()[1]),
            "truncated_models": str(truncated_models),
        }


ACCELERATOR_FREE = [a for a in CLI_TEST_OVERRIDES if not a.startswith("trainer.accelerator")]
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
TORCHRUN_TWO_NODES = {
    "TORCHELASTIC_RUN_ID": "none",
    "WORLD_SIZE": "2",
    "RANK": "0",
    "GROUP_WORLD_SIZE": "2",
}


def readme_mistake(
    script: str,
    args: str,
    fragment: str,
    *marks,
    env: dict | None = None,
    name: str = "",
    quick: bool = False,
):
    """One README mistake: ``script`` with ``args`` (``{name}``: a path of ``materials``) ends
    in one line holding ``fragment``. All of them take minutes on 2 cores: ``quick`` ones, a
    sample refused before torch loads and the issue's own, stay in ``-m "not slow"``."""
    marks = marks if quick else (*marks, pytest.mark.slow)
    return pytest.param(script, args, fragment, env or {}, marks=marks, id=name or args[:60])


needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_no_slurm = pytest.mark.skipif(is_importable(SLURM.module), reason="submitit installed")
needs_no_mlflow = pytest.mark.skipif(is_importable("mlflow"), reason="mlflow installed")

# Each README "error:" line, as its command (paths made by ``materials``); those left out need
# a finished piece of work first (a sweep's metric, a target search, a trained run's split, a
# plugin network) or a real network (a failed download) and are named in the report.
README_MISTAKES = [
    readme_mistake("train.py", "model=resnet", "unknown model 'resnet'", quick=True),
    readme_mistake("train.py", "model.optimizer.lr=abc", "model.optimizer.lr='abc'", quick=True),
    readme_mistake("train.py", "trainer.accelerator=mps", "no Apple MPS device"),
    readme_mistake("train.py", "trainer=gpu", "no CUDA GPU", needs_no_cuda),
    readme_mistake("eval.py", "ckpt_path=missing.ckpt", "checkpoint not found: missing.ckpt"),
    readme_mistake("train.py", "ckpt_path={made}/plain.txt", "not a PyTorch checkpoint file"),
    readme_mistake("train.py", "ckpt_path=last", "no last.ckpt under"),
    readme_mistake(
        "train.py", "trainer=ddp_cpu trainer.sync_batchnorm=true", "sync_batchnorm=true needs CUDA"
    ),
    readme_mistake(
        "train.py", "experiment=nope hparams_search=nada debug=fdr", "unknown experiment 'nope'"
    ),
    readme_mistake(
        "train.py",
        "-m hydra/launcher=slurm model.optimizer.lr=1e-3,3e-3",
        "needs hydra-submitit-launcher",
        needs_no_slurm,
    ),
    readme_mistake("train.py", "trainer.max_epoch=3", "no config key 'trainer.max_epoch'"),
    readme_mistake("train.py", "logger=mlflow", "needs the mlflow package", needs_no_mlflow),
    readme_mistake(
        "train.py", "trainer=ddp_cpu trainer.num_nodes=2", "needs a launcher that starts"
    ),
    readme_mistake(
        "train.py",
        "trainer=ddp_cpu trainer.num_nodes=2",
        "need one run dir for all of them",
        env=TORCHRUN_TWO_NODES,
        name="torchrun without --rdzv-id",
    ),
    readme_mistake(
        "train.py",
        "-m hparams_search=mnist_optuna hydra.sweeper.storage=postgresql://u:pw@127.0.0.1:9/db",
        "cannot open the study storage",
    ),
    readme_mistake(
        "train.py",
        "experiment=shakespeare_char datamodule.path={notes}",
        "is not UTF-8 text",
    ),
    readme_mistake(
        "train.py",
        "datamodule=image_folder model=resnet18 datamodule.root={made}/flowers",
        "no such folder",
    ),
    readme_mistake(
        "train.py",
        "datamodule=image_folder model=resnet18 datamodule.root={made}/images",
        "holds no images",
    ),
    readme_mistake(
        "train.py",
        "datamodule=image_folder model=resnet18 datamodule.root={made}/broken",
        "cannot read image",
    ),
    readme_mistake(
        "train.py",
        "datamodule=image_folder model=resnet18 datamodule.root={made}/empty",
        "no class folders in",
    ),
    readme_mistake(
        "train.py",
        "datamodule=torchvision model=resnet18 datamodule.name=CIFAR11",
        "is not a torchvision dataset",
    ),
    readme_mistake(
        "train.py",
        "datamodule=torchvision model=resnet18 datamodule.name=CIFAR10 datamodule.download=false",
        "did not find torchvision's CIFAR10",
    ),
    readme_mistake(
        "train.py",
        "datamodule=image_folder model=resnet18 datamodule.root={made}/good "
        "model.net.pretrained=true",
        "no weights for resnet18",
        name="pretrained weights not on disk",
        env={"TORCH_HOME": "{made}/torch_home", **NO_NETWORK},
    ),
    readme_mistake("generate.py", "llm/model=tiny2", "unknown llm/model 'tiny2'"),
    readme_mistake("generate.py", "llm.n_ctx=-5", "llm.n_ctx=-5 is not valid", quick=True),
    readme_mistake("generate.py", "llm.quantization=q9", "llm.quantization='q9' is not valid"),
    readme_mistake("generate.py", "prompts.items=[]", "is empty"),
    readme_mistake(
        "generate.py",
        "llm/model=qwen2_5_coder_7b llm.quantization=q4_k_m llm.n_gpu_layers=99",
        "model file not found",
    ),
    readme_mistake(
        "generate.py",
        "llm/model=tiny llm.quantization=q8_0 paths.models_dir={truncated_models}",
        "(corrupt or truncated GGUF)",
    ),
    readme_mistake(
        "generate.py", "llm.model.path={made}/notes.gguf", "(not a GGUF file)", quick=True
    ),
    readme_mistake("generate.py", "llm.model.path={made}/half.gguf", "corrupt or truncated"),
    readme_mistake(
        "generate.py",
        "llm.model.path={made}/future.gguf llm.quantization=q4_k_m",
        "this llama.cpp build does not know",
    ),
    readme_mistake("generate.py", "llm.model.path={made}/nothere.gguf", "no such file"),
    readme_mistake("export.py", "ckpt_path=missing.ckpt", "checkpoint not found"),
    readme_mistake("export.py", "ckpt_path={made}/half.ckpt", "could not load checkpoint"),
    readme_mistake(
        "export.py", "ckpt_path={made}/half.ckpt quantization=q9", "quantization='q9' is not valid"
    ),
    readme_mistake(
        "export.py", "ckpt_path={made}/half.ckpt output=model.bin", "output='model.bin' is not"
    ),
    readme_mistake(
        "predict.py",
        "ckpt_path={made}/half.ckpt input={made}/images output={made}/link",
        "is a symlink",
    ),
    readme_mistake("serve.py", "port=99999", "port=99999 is not valid", quick=True),
    readme_mistake("serve.py", "port={port}", "Address already in use"),
    readme_mistake("serve.py", "llm.files=[{made}/notes.gguf]", "is not a readable GGUF file"),
]


def tree_of(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "fragment", "env"), README_MISTAKES)
def test_a_refused_run_leaves_the_runs_folder_as_it_was(
    tmp_path: Path,
    materials: dict[str, str],
    script: str,
    args: str,
    fragment: str,
    env: dict[str, str],
) -> None:
    outputs = tmp_path / "outputs"
    task = script.removesuffix(".py")
    earlier = outputs / task / "runs" / "2020-01-01_00-00-00_abcdef"
    earlier.mkdir(parents=True)
    (earlier / "job.json").write_text('{"status": "ok", "metrics": {}}')
    before = tree_of(outputs)
    common = [f"paths.log_dir={outputs}", f"paths.data_dir={tmp_path}/data"]
    if script == "train.py":
        common += [f for f in ACCELERATOR_FREE if "source" not in f]
    if script == "generate.py" and "models_dir" not in args:
        common.append(f"paths.models_dir={tmp_path}/models")
    if script == "serve.py":
        common += [f"jobs_db={tmp_path}/jobs.sqlite", f"runs_dir={outputs}/train/runs"]
    result = run_entrypoint(
        script,
        *args.format(**materials).split(),
        *common,
        env={key: value.format(**materials) for key, value in env.items()},
        timeout=180,
    )
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert fragment in lines[0], lines[0]
    assert tree_of(outputs) == before

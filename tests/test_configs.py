"""Every option of every config group composes, and the ones this machine can build, build."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ml_engine.errors import UserError
from ml_engine.run.locations import CONFIG_DIR
from ml_engine.run.rules import check_config
from ml_engine.training.choices import ACCELERATORS, SOURCES, TORCH_DEVICES
from ml_engine.training.rules import PREDICT_RULES, TRAIN_RULES
from tests.conftest import compose_config, shrink


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_has_its_documented_options() -> None:
    assert options("model") == [
        "cnn_mnist",
        "efficientnet_b0",
        "llama_char",
        "mlp_mnist",
        "mobilenet_v3_small",
        "resnet18",
        "torchvision",
    ]
    assert options("model/net") == ["cnn_mnist", "llama", "mlp_mnist", "torchvision"]
    assert options("datamodule") == ["image_folder", "mnist", "text", "torchvision"]
    assert options("trainer") == ["cpu", "ddp", "ddp_cpu", "default", "gpu", "mps"]
    assert {"default", "none", "model_checkpoint", "early_stopping"} <= set(options("callbacks"))
    assert options("logger") == ["csv", "mlflow", "none", "tensorboard", "wandb"]
    assert options("debug") == ["fdr", "limit", "overfit", "profiler"]
    assert options("hparams_search") == ["llm_target", "mnist_optuna", "shakespeare_optuna"]


@pytest.mark.parametrize("model", options("model"))
def test_model_options_build_a_lightning_module(model: str, tmp_path: Path) -> None:
    cfg = shrink(compose_config("train", [f"model={model}"]), tmp_path)
    module = instantiate(cfg.model)
    assert isinstance(module, L.LightningModule)
    # the torchvision architectures are one network, "torchvision", with an ``arch``
    name = module.hparams.net["name"]
    assert name == {"llama_char": "llama"}.get(model, model) or module.hparams.net["arch"] in (
        model,
        "resnet18",
    )


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options_compose(trainer: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"
    expected = {"cpu": "cpu", "gpu": "gpu", "mps": "mps", "ddp": "gpu", "ddp_cpu": "cpu"}
    assert cfg.trainer.accelerator == expected.get(trainer, "auto")


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_cpu"])
def test_trainers_available_here_instantiate(trainer: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"trainer={trainer}"])
    shrink(cfg, tmp_path)
    built = instantiate(cfg.trainer)
    assert isinstance(built, L.Trainer)
    assert built.num_devices == (2 if trainer == "ddp_cpu" else 1)


@pytest.mark.slow
@pytest.mark.parametrize("callbacks", ["default", "none"])
@pytest.mark.parametrize("logger", options("logger"))
def test_callback_and_logger_options_instantiate(
    callbacks: str, logger: str, tmp_path: Path
) -> None:
    from ml_engine.training.instantiators import instantiate_callbacks, instantiate_loggers

    cfg = compose_config("train", [f"callbacks={callbacks}", f"logger={logger}"])
    cfg.paths.output_dir = str(tmp_path)
    built_callbacks = instantiate_callbacks(cfg.get("callbacks"))
    built_loggers = instantiate_loggers(cfg.get("logger"))
    assert len(built_callbacks) == (5 if callbacks == "default" else 0)
    assert len(built_loggers) == (0 if logger == "none" else 1)


def test_template_style_keys_are_where_users_expect_them() -> None:
    cfg = compose_config(
        "train",
        [
            "callbacks.model_checkpoint.monitor=val/loss",
            "callbacks.early_stopping.patience=3",
            "trainer.max_epochs=2",
            "datamodule.batch_size=128",
            "model.optimizer.lr=0.01",
        ],
    )
    assert cfg.callbacks.early_stopping.patience == 3
    assert cfg.trainer.max_epochs == 2
    assert cfg.datamodule.batch_size == 128
    assert cfg.model.scheduler.max_lr == 0.01  # follows the optimizer's lr


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_options_compose(debug: str) -> None:
    cfg = compose_config("train", [f"debug={debug}"])
    assert cfg.trainer


def test_experiment_and_hparams_search_compose() -> None:
    cfg = compose_config("train", ["experiment=mlp_quick"])
    assert cfg.model.net.name == "mlp_mnist"
    assert cfg.trainer.max_epochs == 5
    cfg = compose_config("train", ["hparams_search=mnist_optuna"])
    assert cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/acc_best"
    cfg = compose_config(
        "train", ["experiment=shakespeare_char", "hparams_search=shakespeare_optuna"]
    )
    assert cfg.hydra.sweeper.direction == "minimize"
    assert cfg.optimized_metric == "val/loss_best"


@pytest.mark.parametrize("experiment", ["shakespeare_char", "shakespeare_char_long"])
def test_language_model_experiments_select_and_rank_by_the_lowest_val_loss(experiment) -> None:
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.model.net.name == "llama" and cfg.datamodule.path is None
    assert cfg.model.net.n_embd % 256 == 0 and cfg.model.net.n_ff % 256 == 0  # K-quants apply
    assert cfg.test is False  # datamodule=text has no test split
    for name in ("model_checkpoint", "early_stopping"):
        assert (cfg.callbacks[name].monitor, cfg.callbacks[name].mode) == ("val/loss", "min")
    assert cfg.optimized_metric == cfg.hydra.callbacks.sweep_summary.metric == "val/loss_best"
    assert cfg.hydra.callbacks.sweep_summary.mode == "min"


@pytest.fixture
def precision_module():
    from ml_engine.training import precision

    precision.fastest_precision.cache_clear()
    yield precision
    precision.fastest_precision.cache_clear()


def test_language_model_presets_train_in_bf16_only_where_it_is_native(
    precision_module, monkeypatch, caplog
) -> None:
    import torch

    # on this machine: what torch itself routes bf16 matmuls by (AVX2-only CPUs: 32-true)
    cpu_native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    cfg = compose_config("train", ["experiment=shakespeare_char", "trainer.accelerator=cpu"])
    assert cfg.trainer.precision == ("bf16-mixed" if cpu_native else "32-true")

    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        precision_module.fastest_precision.cache_clear()
        monkeypatch.setattr(precision_module, "native_bf16", lambda kind, native=native: native)
        with caplog.at_level("INFO", logger=precision_module.__name__):
            cfg = compose_config("train", ["experiment=shakespeare_char_long"])
            assert cfg.trainer.precision == expected
        said = "trainer.precision=bf16-mixed to use it anyway" in caplog.text
        assert said is not native  # the fallback says so, once, and how to override it
        caplog.clear()
    # the user's own choice is taken as given
    cfg = compose_config("train", ["experiment=shakespeare_char", "trainer.precision=bf16-mixed"])
    assert cfg.trainer.precision == "bf16-mixed"


def test_eval_and_predict_configs_compose() -> None:
    assert compose_config("eval", ["ckpt_path=x.ckpt"]).ckpt_path == "x.ckpt"
    cfg = compose_config("predict", ["ckpt_path=x.ckpt", "input=digits/"])
    assert (cfg.input, cfg.invert) == ("digits/", "auto")
    # the CSV lands in the run dir, not wherever the command ran
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["output"] == "${paths.output_dir}/predictions.csv"


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        ({"invert": True, "device": "cuda"}, None),  # YAML's true is a boolean
        ({"invert": "false", "device": "mps"}, None),
        ({"invert": "yes"}, "invert='yes' is not valid; expected one of auto, true, false"),
        ({"device": "gpu"}, "device='gpu' is not valid; expected one of cpu, cuda, mps"),
        ({"batch_size": 0}, "batch_size=0 is not valid; expected an integer ≥ 1"),
    ],
)
def test_predict_rules(values: dict, refusal: str | None) -> None:
    cfg = compose_config("predict", ["ckpt_path=x.ckpt", "input=digits/"])
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    if refusal is None:
        check_config(cfg, PREDICT_RULES)
    else:
        with pytest.raises(UserError) as caught:
            check_config(cfg, PREDICT_RULES)
        assert str(caught.value) == refusal


@pytest.mark.parametrize(
    ("override", "refusal"),
    [
        ("model.channels_last=false", None),
        ("model.channels_last=1", "model.channels_last=1 is not valid; expected true or false"),
        ("model.label_smoothing=1.5", "model.label_smoothing=1.5 is not valid; expected a number"),
    ],
)
def test_train_rules(override: str, refusal: str | None) -> None:
    cfg = compose_config("train", [override])
    if refusal is None:
        check_config(cfg, TRAIN_RULES)
    else:
        with pytest.raises(UserError, match=re.escape(refusal)):
            check_config(cfg, TRAIN_RULES)


def test_configured_choices_are_in_the_lists() -> None:
    assert compose_config("train").datamodule.source in SOURCES
    assert compose_config("predict", ["ckpt_path=x", "input=y"]).device in TORCH_DEVICES
    assert compose_config("serve").train.defaults.device in ACCELERATORS
    for trainer in options("trainer"):
        accelerator = compose_config("train", [f"trainer={trainer}"]).trainer.accelerator
        assert accelerator in ACCELERATORS, trainer


def test_run_dirs_carry_a_random_id_and_are_grouped_by_task() -> None:
    cfg = compose_config("train")
    stamp = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}$"
    assert re.search(r"/train/runs/" + stamp, cfg.hydra.run.dir)
    assert re.search(r"/train/multiruns/" + stamp, cfg.hydra.sweep.dir)

"""Checkpoints and runs written before training/ split into a harness and two wings (issue 25)
name the old dotted paths (``ml_engine.training.module.ClassifierModule``, ...): they still
predict, evaluate, resume, export and serve."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, open_dict

import ml_engine.training.checkpoints as checkpoints
from ml_engine.server.runs import run_data
from ml_engine.training.evaluate import evaluate
from ml_engine.training.lm.export import EXPORT_RULES, export
from ml_engine.training.lm.module import CausalLMModule
from ml_engine.training.lm.tokenizer import CharTokenizer
from ml_engine.training.optimizers import MODULE_CLASS_KEY
from ml_engine.training.registry import MOVED_MODULES, current_path, module_classes
from ml_engine.training.rules import PREDICT_RULES, TRAIN_RULES
from ml_engine.training.train import train
from ml_engine.training.vision.module import ClassifierModule, load_classifier
from ml_engine.training.vision.predict import predict
from tests.conftest import run_as_job

OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


def _old_paths(value: Any) -> list[str]:
    return [s for s in _strings(value) if any(s.startswith(f"{old}.") for old in MOVED_MODULES)]


def _name_the_old_paths(path: Path, module_target: str, net_target: str) -> None:
    """Rewrite ``path`` as an engine before the move could have: the module class (as its
    kind and in the hyperparameters) and the network under their old dotted paths."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint[MODULE_CLASS_KEY] = module_target
    checkpoint["hyper_parameters"]["_target_"] = module_target
    checkpoint["hyper_parameters"]["net_target"] = net_target
    torch.save(checkpoint, path)


def test_every_old_path_names_a_module_of_today() -> None:
    for old, new in MOVED_MODULES.items():
        assert current_path(old) == new
        importlib.import_module(new)
    assert current_path("ml_engine.training.module.ClassifierModule") == (
        "ml_engine.training.vision.module.ClassifierModule"
    )
    assert current_path("ml_engine.training.llama.Llama") == "ml_engine.training.lm.llama.Llama"
    for today in ("ml_engine.training.train.train", "ml_engine.training.lm.module", "torch.nn"):
        assert current_path(today) == today


def test_an_old_run_config_shows_its_data_in_the_runs_listing() -> None:
    node = {"_target_": "ml_engine.training.datamodules.MNISTDataModule", "source": "bundled"}
    assert run_data(node, None, None)["kind"] == "mnist"


def _elsewhere(cfg: DictConfig, output_dir: Path) -> DictConfig:
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def _lm_checkpoint(path: Path) -> Path:
    tokenizer = CharTokenizer.from_text("abcdefgh ijklmnop\nqrstuvwxyz.,;")
    net = {"name": "llama", "n_layer": 1, "n_head": 2, "n_head_kv": 2, "n_embd": 32, "n_ff": 64}
    module = CausalLMModule(net, OPTIMIZER, tokenizer=tokenizer.to_config(), block_size=16)
    old_target = "ml_engine.training.lm_module.CausalLMModule"
    hparams = {
        **module.hparams,
        "_target_": old_target,
        "net_target": "ml_engine.training.llama.Llama",
    }
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": {
                **hparams,
                "_target_": "ml_engine.training.lm_module.CausalLMModule",
            },
            MODULE_CLASS_KEY: "ml_engine.training.lm_module.CausalLMModule",
        },
        path,
    )
    return path


def test_a_language_model_naming_old_paths_exports_reading_its_checkpoint_once(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _lm_checkpoint(tmp_path / "old.ckpt")
    read = checkpoints.read_checkpoint(path)
    assert not _old_paths(read) and read[MODULE_CLASS_KEY].endswith("lm.module.CausalLMModule")
    assert checkpoints.module_class(read) is CausalLMModule

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    output = tmp_path / "old-f32.gguf"
    cfg = make_cfg("export", [f"ckpt_path={path}", f"output={output}", "val_text=false"])
    metrics = run_as_job(export, cfg, EXPORT_RULES)[1]["metrics"]
    assert metrics["gguf"] == str(output) and output.stat().st_size > 0
    assert len(loads) == 1  # checked, rebuilt and exported from one read


@pytest.mark.slow
def test_the_wings_are_found_without_installed_metadata() -> None:
    # PYTHONPATH=src, or an editable install made before the ml_engine.modules group existed
    script = (
        "import importlib.metadata as m\n"
        "real = m.entry_points\n"
        "m.entry_points = lambda **k: [] if k.get('group') == 'ml_engine.modules' else real(**k)\n"
        "from ml_engine.training import registry\n"
        "print(sorted(registry.module_classes()), registry.network_names())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == (
        "['CausalLMModule', 'ClassifierModule'] ['cnn_mnist', 'llama', 'mlp_mnist', 'torchvision']"
    )
    assert sorted(module_classes()) == ["CausalLMModule", "ClassifierModule"]


@pytest.mark.slow
def test_a_classifier_naming_old_paths_predicts_evaluates_and_resumes(
    make_cfg, tmp_path: Path, digit_pngs
) -> None:
    folder, _ = digit_pngs
    cfg = make_cfg(
        "train",
        [
            "model=mlp_mnist",
            "model.scheduler=null",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "test=false",
        ],
    )
    trained = run_as_job(train, cfg, TRAIN_RULES)[1]["metrics"]
    last = Path(trained["last_ckpt"])
    _name_the_old_paths(
        last, "ml_engine.training.module.ClassifierModule", "ml_engine.training.networks.MLP"
    )

    assert isinstance(load_classifier(last), ClassifierModule)
    predict_cfg = _elsewhere(
        make_cfg("predict", [f"ckpt_path={last}", f"input={folder}"]), tmp_path / "predict"
    )
    predicted = run_as_job(predict, predict_cfg, PREDICT_RULES)[1]["metrics"]
    assert predicted["images"] == len(list(folder.iterdir()))

    eval_cfg = _elsewhere(
        make_cfg("eval", [f"ckpt_path={last}", "trainer.limit_test_batches=1"]), tmp_path / "eval"
    )
    assert "test/acc" in run_as_job(evaluate, eval_cfg, TRAIN_RULES)[1]["metrics"]

    resume_cfg = make_cfg(
        "train",
        [
            "model=mlp_mnist",
            "model.scheduler=null",
            f"ckpt_path={last}",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "test=false",
        ],
    )
    resume_cfg = _elsewhere(resume_cfg, tmp_path / "resumed")
    assert run_as_job(train, resume_cfg, TRAIN_RULES)[1]["metrics"]["epochs_run"] == 2

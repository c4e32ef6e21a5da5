"""Classification beyond MNIST: image folders and torchvision datasets written on disk from the
bundled digits (grayscale, and tinted into RGB at 32×32), trained and predicted for real."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml_engine.errors import UserError
from ml_engine.training.evaluate import evaluate
from ml_engine.training.train import train
from ml_engine.training.vision.image_datamodules import ImageFolderDataModule
from ml_engine.training.vision.module import load_classifier
from tests.conftest import run_entrypoint

CLASS_NAMES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]
FAST_TRAINING = [
    "trainer.max_epochs=4",
    "datamodule.batch_size=16",
    "callbacks.early_stopping=null",
]


def tint(digit: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """A grayscale digit as a coloured RGB image: a random ink on a random dark background, so
    that colour says nothing about the class."""
    ink = rng.uniform(0.4, 1.0, 3)
    paper = rng.uniform(0.0, 0.3, 3)
    alpha = digit.astype(np.float64)[..., None] / 255
    rgb = (alpha * ink + (1 - alpha) * paper) * 255
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return image.resize((size, size), Image.Resampling.BILINEAR)


def write_digit_folder(
    root: Path, bundled_digits, per_class: int, rgb: bool = False, offset: int = 0
) -> Path:
    """``root/<class name>/<i>.png`` from the bundled digits, named like a user's classes."""
    images, labels = bundled_digits
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name
        folder.mkdir(parents=True)
        members = np.flatnonzero(labels == label)[offset : offset + per_class]
        for i in members:
            image = tint(images[i], rng, 32) if rgb else Image.fromarray(images[i])
            image.save(folder / f"{i}.png")
    return root


def flatten_to_photos(class_folder: Path, photos: Path) -> Path:
    """The images of a class folder moved into one folder, named ``<class>_<file>``: what a
    user hands predict.py."""
    photos.mkdir()
    for path in sorted(class_folder.rglob("*.png")):
        path.rename(photos / f"{path.parent.name}_{path.name}")
    return photos


@pytest.fixture
def digits(bundled_digits) -> tuple[np.ndarray, np.ndarray]:
    return bundled_digits


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_image_folder_trains_and_predicts_class_names(make_cfg, tmp_path: Path, digits) -> None:
    root = write_digit_folder(tmp_path / "digits", digits, per_class=60)
    cfg = make_cfg(
        "train",
        [
            "datamodule=image_folder",
            f"datamodule.root={root}",
            "datamodule.image_size=28",
            *FAST_TRAINING,
        ],
    )
    metrics = train(cfg)
    assert metrics["data_source"] == "image_folder"
    assert metrics["test/acc"] > 0.5  # chance is 0.10

    model = load_classifier(metrics["best_ckpt"])
    spec = model.hparams.data
    assert spec["class_names"] == sorted(CLASS_NAMES)
    assert spec["channels"] == 1 and spec["image_size"] == [28, 28]
    assert spec["mean"][0] == pytest.approx(0.13, abs=0.03)  # measured on the training split

    unseen = write_digit_folder(tmp_path / "unseen", digits, per_class=2, offset=400)
    photos = flatten_to_photos(unseen, tmp_path / "photos")
    output = tmp_path / "preds.csv"
    result = run_entrypoint(
        "predict.py",
        f"ckpt_path={metrics['best_ckpt']}",
        f"input={photos}",
        f"output={output}",
        f"paths.log_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(output)
    assert len(rows) == 20
    assert {r["prediction"] for r in rows} <= set(CLASS_NAMES)
    correct = sum(Path(r["path"]).name.split("_")[0] == r["prediction"] for r in rows)
    assert correct >= 8, rows


@pytest.mark.slow
def test_rgb_image_folder_with_split_folders_and_eval(make_cfg, tmp_path: Path, digits) -> None:
    root = tmp_path / "tinted"
    write_digit_folder(root / "train", digits, per_class=60, rgb=True)
    write_digit_folder(root / "val", digits, per_class=10, rgb=True, offset=300)
    write_digit_folder(root / "test", digits, per_class=10, rgb=True, offset=400)
    cfg = make_cfg(
        "train",
        [
            "datamodule=image_folder",
            f"datamodule.root={root}",
            "datamodule.image_size=32",
            *FAST_TRAINING,
        ],
    )
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.3
    spec = load_classifier(metrics["best_ckpt"]).hparams.data
    assert spec["channels"] == 3 and spec["image_size"] == [32, 32]
    assert len(spec["mean"]) == 3

    eval_cfg = make_cfg("eval", [f"ckpt_path={metrics['best_ckpt']}"])
    evaluated = evaluate(eval_cfg)  # finds datamodule=image_folder and its root in the checkpoint
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"])


def test_streamed_image_folder_gives_the_same_batches(tmp_path: Path, digits) -> None:
    root = write_digit_folder(tmp_path / "digits", digits, per_class=6, rgb=True)
    common = {"root": str(root), "image_size": 32, "eval_batch_size": 8}
    in_memory = ImageFolderDataModule(**common)
    streamed = ImageFolderDataModule(**common, max_memory_mb=0)
    in_memory.setup()
    streamed.setup()
    assert in_memory.splits["train"].images is not None
    assert streamed.splits["train"].images is None
    memory_spec, streamed_spec = in_memory.data_spec(), streamed.data_spec()
    for key in ("mean", "std"):  # the same images, summed in another order
        assert streamed_spec.pop(key) == pytest.approx(memory_spec.pop(key))
    assert memory_spec == streamed_spec
    for a, b in zip(in_memory.val_dataloader(), streamed.val_dataloader(), strict=True):
        assert a[0].dtype == b[0].dtype == torch.uint8
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_image_folder_errors_are_one_line(tmp_path: Path, digits) -> None:
    def error(root: Path) -> str:
        with pytest.raises(UserError) as caught:
            ImageFolderDataModule(root=str(root)).setup()
        message = str(caught.value)
        assert "\n" not in message
        return message

    assert "no such folder" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no class folders" in error(tmp_path / "empty")
    root = write_digit_folder(tmp_path / "digits", digits, per_class=2)
    (root / "ten").mkdir()
    assert "ten holds no images" in error(root)
    (root / "ten").rmdir()
    (root / "one" / "broken.png").write_bytes(b"not a png")
    assert "broken.png" in error(root)


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx-ubyte format of MNIST's files: magic (0x08 = uint8, dims), sizes, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file uncompressed, as torchvision leaves it after a download."""
    path.write_bytes(idx_bytes(array))


@pytest.mark.slow
def test_torchvision_dataset_from_files_on_disk(make_cfg, tmp_path: Path, digits) -> None:
    images, labels = digits
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    order = np.random.default_rng(0).permutation(len(labels))  # the digits come sorted by class
    train_idx, test_idx = order[:800], order[800:1000]
    for prefix, index in (("train", train_idx), ("t10k", test_idx)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[index])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[index])
    cfg = make_cfg(
        "train",
        [
            "datamodule=torchvision",
            "datamodule.name=FashionMNIST",
            "datamodule.download=false",
            *FAST_TRAINING,
        ],
    )
    metrics = train(cfg)
    assert metrics["data_source"] == "torchvision:FashionMNIST"
    assert metrics["test/acc"] > 0.5
    spec = load_classifier(metrics["best_ckpt"]).hparams.data
    assert spec["class_names"][0] == "T-shirt/top"  # torchvision's names of the classes
    assert spec["channels"] == 1 and spec["image_size"] == [28, 28]


def test_torchvision_errors_are_one_line(make_cfg, tmp_path: Path) -> None:
    from ml_engine.training.vision.image_datamodules import TorchvisionDataModule

    def error(**kwargs) -> str:
        with pytest.raises(UserError) as caught:
            TorchvisionDataModule(data_dir=str(tmp_path / "data"), **kwargs).setup()
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "CIFAR10" in error(name="CIFAR11")  # the accepted names are listed
    missing = error(name="CIFAR10", download=False)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in missing


def serve_downloads(monkeypatch, files: dict[str, bytes], drop_after: int | None = None):
    """torchvision's downloader answered from ``files`` (by the URL's file name), offline; with
    ``drop_after``, every response is cut after that many bytes, as a dropped connection is
    (the half-written file stays where torchvision wrote it)."""
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def urlretrieve(url: str, filename, chunk_size: int = 0) -> None:
        payload = files[url.rsplit("/", 1)[-1]]
        Path(filename).write_bytes(payload if drop_after is None else payload[:drop_after])
        if drop_after is not None:
            raise urllib.error.URLError("connection reset by peer")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", urlretrieve)


def fashion_mnist_archives(monkeypatch, digits) -> dict[str, bytes]:
    """FashionMNIST's four .gz files, made of bundled digits (so its checksums are switched off)."""
    import gzip

    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "resources", [(f, None) for f, _ in FashionMNIST.resources])
    images, labels = digits
    files = {}
    for prefix, index in (("train", np.arange(0, 5000, 10)), ("t10k", np.arange(5, 5000, 25))):
        for kind, array in (("images-idx3", images[index]), ("labels-idx1", labels[index])):
            files[f"{prefix}-{kind}-ubyte.gz"] = gzip.compress(idx_bytes(array))
    return files


def test_a_torchvision_download_lands_whole(monkeypatch, tmp_path: Path, digits) -> None:
    from ml_engine.training.vision.image_datamodules import TorchvisionDataModule

    serve_downloads(monkeypatch, fashion_mnist_archives(monkeypatch, digits))
    data_dir = tmp_path / "data"
    datamodule = TorchvisionDataModule(name="FashionMNIST", data_dir=str(data_dir), download=True)
    datamodule.setup()
    assert datamodule.class_names[0] == "T-shirt/top"
    assert sum(len(split.labels) for split in datamodule.splits.values()) == 500 + 200
    raw = data_dir / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").is_file()
    assert (raw / "t10k-labels-idx1-ubyte").is_file()
    assert [p.name for p in data_dir.iterdir()] == ["FashionMNIST"]  # no temporary folder left


@pytest.mark.parametrize("data_dir_exists", [False, True])
def test_a_dropped_torchvision_download_leaves_nothing(
    monkeypatch, tmp_path: Path, digits, data_dir_exists: bool
) -> None:
    from ml_engine.training.vision.image_datamodules import TorchvisionDataModule

    serve_downloads(monkeypatch, fashion_mnist_archives(monkeypatch, digits), drop_after=100)
    data_dir = tmp_path / "data" / "vision"
    if data_dir_exists:
        data_dir.mkdir(parents=True)
        (data_dir / "notes.txt").write_text("the user's own file")
    datamodule = TorchvisionDataModule(name="FashionMNIST", data_dir=str(data_dir), download=True)
    with pytest.raises(UserError) as caught:
        datamodule.setup()
    message = str(caught.value)
    assert "\n" not in message and "could not download torchvision's FashionMNIST" in message
    assert "connection reset by peer" in message
    assert str(data_dir / "FashionMNIST" / "raw") in message  # where the files go
    if data_dir_exists:
        assert [p.name for p in data_dir.iterdir()] == ["notes.txt"]
    else:
        assert not (tmp_path / "data").exists()  # the folders the download made are gone too


def test_torchvision_architecture_trains_on_small_rgb_images(make_cfg, tmp_path: Path, digits):
    root = write_digit_folder(tmp_path / "tinted", digits, per_class=20, rgb=True)
    cfg = make_cfg(
        "train",
        [
            "datamodule=image_folder",
            f"datamodule.root={root}",
            "datamodule.image_size=32",
            "model=mobilenet_v3_small",
            "trainer.max_epochs=1",
            "callbacks.early_stopping=null",
        ],
    )
    metrics = train(cfg)
    model = load_classifier(metrics["best_ckpt"])
    assert model.hparams.net["arch"] == "mobilenet_v3_small"
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_pretrained_weights_come_from_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    from torchvision.models import get_model, get_model_weights

    from ml_engine.training.registry import build_network

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    supplied = {"num_classes": 5, "in_channels": 1, "image_size": [28, 28]}
    with pytest.raises(UserError, match=r"put the file https://download\.pytorch\.org/models/"):
        build_network("torchvision", supplied, arch="mobilenet_v3_small", pretrained=True)

    # a stand-in for the downloaded file: the same architecture's state dict, at the cache path
    reference = get_model("mobilenet_v3_small", weights=None)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = get_model_weights("mobilenet_v3_small").DEFAULT.url
    torch.save(reference.state_dict(), cache / Path(url).name)
    net = build_network("torchvision", supplied, arch="mobilenet_v3_small", pretrained=True)
    inner = "features.1.block.0.0.weight"  # neither the first convolution nor the head
    assert torch.equal(net.state_dict()[inner], reference.state_dict()[inner])
    first = net.features[0][0]
    assert first.in_channels == 1  # RGB filters summed into the one gray channel
    summed = reference.features[0][0].weight.sum(dim=1, keepdim=True)
    assert torch.allclose(first.weight, summed)
    assert net.classifier[-1].out_features == 5

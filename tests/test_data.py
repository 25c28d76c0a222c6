"""Datasets on the device: the real torchvision loading path, the missing-dataset error,
augmentation against torchvision's transforms, shuffling, and synthetic data."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from conftest import write_idx
from PIL import Image

from pnn.config import CIFAR_MEAN, CIFAR_STD, load_config
from pnn.train.data import (
    DatasetUnavailableError,
    crop_flip,
    load_data,
    normalize,
    random_crop_flip,
    synthetic_split,
)

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Writing datasets in their real on-disk formats
# --------------------------------------------------------------------------------------------


def _python2_pickle(obj: dict, as_py2_str: set[str]) -> bytes:
    """Pickle ``obj`` the way the CIFAR files were made (Python 2): the strings named in
    ``as_py2_str`` become py2 ``str`` (SHORT_BINSTRING), which Python 3 reads as ``bytes`` with
    ``encoding="bytes"`` (``b"data"``) and as ``str`` with torchvision's ``encoding="latin1"``.
    Protocol 2 has no frames, so opcodes can be swapped without fixing any offsets."""
    raw = pickle.dumps(obj, protocol=2)
    ops = list(pickletools.genops(raw))
    out = io.BytesIO()
    for (op, arg, pos), (_, _, end) in zip(ops, ops[1:] + [(None, None, len(raw))], strict=True):
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE") and arg in as_py2_str:
            encoded = arg.encode("latin1")
            out.write(b"U" + bytes([len(encoded)]) + encoded)  # SHORT_BINSTRING
        else:
            out.write(raw[pos:end])
    return out.getvalue()


def write_cifar10(root: Path, per_batch: int, test_size: int, seed: int = 0) -> dict:
    """A small CIFAR-10 in the real ``cifar-10-batches-py`` layout; returns the arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays = {}
    for name in names:
        n = test_size if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        arrays[name] = (data, labels)
        entry = {"batch_label": f"{name} of 5", "labels": labels, "data": data}
        keys = {"batch_label", "labels", "data"}
        (folder / name).write_bytes(_python2_pickle(entry, keys))
    label_names = ["airplane", "automobile", "bird", "cat", "deer"]
    label_names += ["dog", "frog", "horse", "ship", "truck"]
    meta = {"num_cases_per_batch": per_batch, "label_names": label_names, "num_vis": 3072}
    keys = set(meta) | set(label_names)
    (folder / "batches.meta").write_bytes(_python2_pickle(meta, keys))
    return arrays


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """Our small CIFAR-10, and torchvision told its md5 sums.

    torchvision checks every file against the md5 of the real CIFAR-10 in the class's
    ``train_list``/``test_list``/``meta`` tables. Those tables are data, so the test points
    them at our files' sums; the loading code itself (integrity check, unpickling, meta) runs
    unchanged.
    """
    arrays = write_cifar10(tmp_path, per_batch=7, test_size=9)
    folder = tmp_path / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls = torchvision.datasets.CIFAR10
    train_list = [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)]
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5("batches.meta")})
    return tmp_path, arrays


def cifar_config(root: Path, *overrides: str):
    return load_config([f"dataset.root={root}", "dataset.download=false", *overrides])


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_written_files_have_the_real_format(cifar_root: tuple[Path, dict]) -> None:
    root, arrays = cifar_root
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # the recipe on the CIFAR-10 page
    assert set(entry) == {b"batch_label", b"labels", b"data"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (7, 3072)
    assert entry[b"labels"] == arrays["data_batch_1"][1]


def test_cifar10_through_torchvision(cifar_root: tuple[Path, dict]) -> None:
    root, arrays = cifar_root
    data = load_data(cifar_config(root), CPU, root)

    train = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert data.train_images.dtype == torch.uint8
    assert data.train_images.shape == (35, 3, 32, 32)
    # A CIFAR row is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major: NCHW.
    assert torch.equal(data.train_images, torch.from_numpy(train.reshape(-1, 3, 32, 32)))
    assert data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == train_labels

    test, test_labels = arrays["test_batch"]
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    expected = normalize(torch.from_numpy(test.reshape(-1, 3, 32, 32)), mean, std)
    assert torch.equal(data.test_inputs, expected)
    assert data.test_labels.tolist() == test_labels
    assert data.augment and data.num_classes == 10


def test_test_name_picks_another_test_set(cifar_root: tuple[Path, dict]) -> None:
    root, _ = cifar_root
    cfg = cifar_config(root, "dataset.test_name=synthetic", "dataset.test_size=13")
    data = load_data(cfg, CPU, root)
    assert len(data.train_labels) == 35 and len(data.test_labels) == 13
    assert (data.name, data.test_name) == ("cifar10", "synthetic")


def test_corrupted_file_is_reported(cifar_root: tuple[Path, dict]) -> None:
    root, _ = cifar_root
    with open(root / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"x")
    with pytest.raises(DatasetUnavailableError, match="not found or corrupted"):
        load_data(cifar_config(root), CPU, root)


def test_missing_dataset_explains_how_to_provide_it(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetUnavailableError) as caught:
        load_data(cifar_config(root), CPU, root)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert str(root.resolve() / "cifar-10-batches-py") in message
    assert "dataset.download is false" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "dataset=synthetic" in message and "profile=smoke" in message
    assert "\n" not in message  # one paragraph


def test_mnist_through_torchvision(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    sizes = {"train": 6, "t10k": 4}
    images = {s: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) for s, n in sizes.items()}
    labels = {s: rng.integers(0, 10, size=len(images[s]), dtype=np.uint8) for s in images}
    for split in images:
        write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])

    data = load_data(cifar_config(tmp_path, "dataset=mnist", "model=lenet"), CPU, tmp_path)
    assert data.train_images.shape == (6, 1, 28, 28)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(images["train"]))
    assert data.train_labels.tolist() == labels["train"].tolist()
    assert not data.augment  # the reference does not augment MNIST
    pil = [Image.fromarray(image, mode="L") for image in images["t10k"]]
    expected = torch.stack([TF.normalize(TF.to_tensor(p), (0.1307,), (0.3081,)) for p in pil])
    assert torch.equal(data.test_inputs, expected)


def test_missing_mnist_names_its_folder(tmp_path: Path) -> None:
    cfg = cifar_config(tmp_path, "dataset=mnist", "model=lenet")
    with pytest.raises(DatasetUnavailableError, match="MNIST/raw"):
        load_data(cfg, CPU, tmp_path)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def test_crop_flip_normalize_equals_torchvision() -> None:
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=rng, dtype=torch.uint8)
    # Every extreme offset and both flips appear, plus random ones.
    top = torch.tensor([0, 8, 0, 8, 4, 4] + torch.randint(0, 9, (18,), generator=rng).tolist())
    left = torch.tensor([0, 0, 8, 8, 4, 4] + torch.randint(0, 9, (18,), generator=rng).tolist())
    flip = torch.tensor([False, True] * 12)
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)

    ours = normalize(crop_flip(images, top, left, flip), mean, std)

    for i in range(len(images)):
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        # What RandomCrop(32, padding=4) does for offsets (top, left), then the flip.
        pil = TF.crop(TF.pad(pil, 4, fill=0), int(top[i]), int(left[i]), 32, 32)
        if flip[i]:
            pil = TF.hflip(pil)
        expected = TF.normalize(TF.to_tensor(pil), CIFAR_MEAN, CIFAR_STD)
        assert torch.equal(ours[i], expected), f"image {i}"


def test_random_crop_flip_draws_every_offset_and_both_flips() -> None:
    # White images with a dark left half: the zero padding shows the offsets, the dark half
    # shows the flip.
    n = 2000
    images = torch.full((n, 1, 32, 32), 255, dtype=torch.uint8)
    images[..., :16] = 100
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    zero_rows = (out[:, 0] == 0).all(dim=2)  # (n, 32)
    top = torch.where(zero_rows[:, 0], 4 - zero_rows.sum(1), 4 + zero_rows.sum(1))
    zero_cols = (out[:, 0] == 0).all(dim=1)
    dark_left = out[:, 0, 16, :].eq(100).float().argmax(1) < 12
    assert set(top.tolist()) == set(range(9))
    assert zero_cols.any(1).float().mean() > 0.7  # 8 of 9 left offsets pad a column
    assert 0.45 < dark_left.float().mean() < 0.55


def test_training_epoch_shuffles_every_sample_once_and_keeps_the_partial_batch() -> None:
    images, labels = synthetic_split(50, seed=0, train=True)
    data = load_data(load_config(["profile=smoke", "dataset.train_size=50"]), CPU, Path("."))
    assert torch.equal(data.train_images, images) and torch.equal(data.train_labels, labels)
    assert data.steps_per_epoch(16) == 4  # 16 + 16 + 16 + 2
    assert data.steps_per_epoch(16, max_steps=3) == 3

    generator = torch.Generator().manual_seed(0)
    inputs, first = data.training_epoch(16, generator)
    _, second = data.training_epoch(16, generator)
    assert inputs.shape == (50, 3, 32, 32) and inputs.dtype == torch.float32
    assert sorted(first.tolist()) == sorted(labels.tolist())  # a permutation
    assert not torch.equal(first, second)  # reshuffled each epoch
    _, again = data.training_epoch(16, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)  # the seed decides
    capped, _ = data.training_epoch(16, generator, max_steps=2)
    assert len(capped) == 32

    # Each image keeps its own label: images that carry their index in every pixel, which the
    # crop (at most 4 pixels off) and the flip leave at the centre.
    indexed = torch.arange(50, dtype=torch.uint8)[:, None, None, None].expand(50, 3, 32, 32)
    tagged = dataclasses.replace(data, train_images=indexed.contiguous())
    inputs, paired = tagged.training_epoch(16, torch.Generator().manual_seed(0))
    assert torch.equal(paired, first)  # the same draws as above
    centre = inputs[:, 0, 16, 16] * data.std[0] + data.mean[0]  # Normalize undone
    index = (centre * 255).round().long()
    assert sorted(index.tolist()) == list(range(50))  # every sample once
    assert torch.equal(paired, labels[index])  # each with its label


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_cifar_shaped() -> None:
    images, labels = synthetic_split(100, seed=3, train=True)
    again, again_labels = synthetic_split(100, seed=3, train=True)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert set(labels.tolist()) == set(range(10))
    assert not torch.equal(images, synthetic_split(100, seed=4, train=True)[0])
    # The test split does not depend on the training split's size.
    small = load_config(["dataset=synthetic", "dataset.train_size=10", "dataset.test_size=20"])
    large = load_config(["dataset=synthetic", "dataset.train_size=90", "dataset.test_size=20"])
    a, b = load_data(small, CPU, Path(".")), load_data(large, CPU, Path("."))
    assert torch.equal(a.test_inputs, b.test_inputs)


def test_synthetic_classes_differ_more_than_the_noise() -> None:
    # A nearest-class-mean classifier, fitted on the training split, on the test split.
    images, labels = synthetic_split(2000, seed=0, train=True)
    test, test_labels = synthetic_split(500, seed=0, train=False)
    means = torch.stack([images[labels == c].float().mean(0) for c in range(10)])
    distances = torch.cdist(test.float().flatten(1), means.flatten(1))
    accuracy = (distances.argmin(1) == test_labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1

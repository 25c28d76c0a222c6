"""Datasets as uint8 tensors on the training device, and augmentation as batched tensor ops.

Each split is read once through torchvision's dataset classes (so their integrity checks and
download logic stay in charge) and kept on the device as one (N, C, H, W) uint8 tensor plus
int64 labels. An epoch's training inputs are then made in a handful of kernels: shuffle,
random crop + flip (two ``gather`` s over the zero-padded images), ToTensor's /255 and Normalize.
Nothing goes through PIL or a DataLoader in the loop, and nothing waits for the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from filelock import FileLock

from pnn.config import DATASETS

if TYPE_CHECKING:
    from omegaconf import DictConfig

# RandomCrop(32, padding=4) as in the reference's CIFAR transform.
CROP_PADDING = 4


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable. The message says how to provide it."""


@dataclass
class DeviceData:
    """Both splits of a dataset on one device, ready for :meth:`training_epoch`."""

    name: str
    test_name: str
    train_images: torch.Tensor  # (N, C, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_inputs: torch.Tensor  # (M, C, H, W) float32, already ToTensor + Normalize'd
    test_labels: torch.Tensor  # (M,) int64
    mean: torch.Tensor  # (C,) float32, the training split's Normalize constants
    std: torch.Tensor
    augment: bool  # random crop + horizontal flip on training inputs (the CIFAR-style sets)

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    @property
    def num_classes(self) -> int:
        return DATASETS[self.name].num_classes

    def steps_per_epoch(self, batch_size: int, max_steps: int | None = None) -> int:
        """Optimizer steps in one epoch; the last, smaller batch counts (drop_last=False)."""
        steps = math.ceil(len(self.train_labels) / batch_size)
        return steps if max_steps is None else min(steps, max_steps)

    def training_epoch(
        self, batch_size: int, generator: torch.Generator, max_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of shuffled, augmented, normalised inputs and their labels.

        Batch ``i`` is rows ``[i * batch_size, (i + 1) * batch_size)``. With ``max_steps`` only
        the images those steps use are gathered and augmented; they are a random subset,
        since the permutation is drawn over the whole set.
        """
        order = torch.randperm(len(self.train_labels), generator=generator, device=self.device)
        order = order[: self.steps_per_epoch(batch_size, max_steps) * batch_size]
        images = self.train_images[order]
        if self.augment:
            images = random_crop_flip(images, generator)
        return normalize(images, self.mean, self.std), self.train_labels[order]


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize on uint8 (N, C, H, W): the same float ops, in the same order, as
    torchvision's, so the results are bit-identical."""
    return images.float().div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])


def crop_flip(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    padding: int = CROP_PADDING,
) -> torch.Tensor:
    """Crop every image at its own offset from its zero-padded version, then mirror it.

    ``top``/``left`` (N,) are offsets into the padded image, in ``[0, 2 * padding]``, as
    ``RandomCrop(size, padding)`` draws them; ``flip`` (N,) bool. The flip is folded into the
    column indices (``crop[:, w - 1 - x]``), so the whole thing is two gathers.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING
) -> torch.Tensor:
    """RandomCrop(H, padding, fill=0) then RandomHorizontalFlip(0.5), batched on the device."""
    n, device = images.shape[0], images.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return crop_flip(images, top, left, flip, padding)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def synthetic_split(
    size: int, seed: int, train: bool, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped uint8 images: one smooth colour pattern per class plus pixel noise.

    The class patterns come from ``seed`` alone and each split from its own stream, so the
    test set does not change with the training set's size. The patterns are 4x4 blobs
    upsampled to 32x32, coarse enough to survive the 4-pixel random crop; the noise (std 64)
    makes the task not quite trivial for a small model.
    """
    spec = DATASETS["synthetic"]
    channels, side = spec.in_channels, spec.image_size
    patterns_rng = torch.Generator().manual_seed(3 * seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=patterns_rng)
    patterns = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    rng = torch.Generator().manual_seed(3 * seed + (1 if train else 2))
    labels = torch.randint(0, num_classes, (size,), generator=rng)
    noise = torch.randn(size, channels, side, side, generator=rng) * 64
    images = (patterns[labels] * 255 + noise).round_().clamp_(0, 255).to(torch.uint8)
    return images, labels


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_data(cfg: DictConfig, device: torch.device, root: Path) -> DeviceData:
    """Both splits of ``cfg.dataset.name`` (test split from ``cfg.dataset.test_name`` if set)."""
    name = cfg.dataset.name
    test_name = cfg.dataset.test_name or name
    train_images, train_labels = _load_split(cfg, name, root, train=True)
    test_images, test_labels = _load_split(cfg, test_name, root, train=False)

    def constants(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
        spec = DATASETS[dataset]
        return (
            torch.tensor(spec.mean, dtype=torch.float32, device=device),
            torch.tensor(spec.std, dtype=torch.float32, device=device),
        )

    mean, std = constants(name)
    return DeviceData(
        name=name,
        test_name=test_name,
        train_images=train_images.to(device),
        train_labels=train_labels.to(device),
        test_inputs=normalize(test_images.to(device), *constants(test_name)),
        test_labels=test_labels.to(device),
        mean=mean,
        std=std,
        # The reference augments the CIFAR sets only; MNIST gets ToTensor + Normalize.
        augment=name != "mnist",
    )


def _load_split(
    cfg: DictConfig, name: str, root: Path, train: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "synthetic":
        spec = DATASETS["synthetic"]
        size = cfg.dataset.train_size if train else cfg.dataset.test_size
        if size is None:
            size = spec.train_size if train else spec.test_size
        return synthetic_split(size, cfg.dataset.seed, train, spec.num_classes)

    dataset_class = _torchvision_class(name)
    try:
        # Parallel jobs share dataset.root: one downloads and extracts, the others wait for it.
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(root / ".pnn-download.lock"):
            dataset = dataset_class(str(root), train=train, download=cfg.dataset.download)
    except (RuntimeError, OSError) as error:  # not found, corrupted, or the download failed
        detail = f"torchvision said: {str(error).strip()}"
        raise DatasetUnavailableError(
            _unavailable_message(name, dataset_class, Path(root), cfg.dataset.download, detail)
        ) from error
    if name == "mnist":
        return dataset.data.unsqueeze(1).contiguous(), dataset.targets.long()
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return images, torch.tensor(dataset.targets, dtype=torch.int64)


def _torchvision_class(name: str) -> type:
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}.get(name, datasets.MNIST)


def _expected_files(name: str, dataset_class: type, root: Path) -> list[Path]:
    """The files torchvision reads for ``name`` under ``root`` (both splits)."""
    if name == "mnist":
        raw = root / dataset_class.__name__ / "raw"
        return [raw / Path(url).name.removesuffix(".gz") for url, _ in dataset_class.resources]
    folder = root / dataset_class.base_folder
    lists = dataset_class.train_list + dataset_class.test_list
    return [folder / file for file, _ in lists] + [folder / dataset_class.meta["filename"]]


def check_available(cfg: DictConfig, root: Path) -> None:
    """Fail fast, before a job's run is created, if its datasets are not on disk.

    Looks only for the files (no md5, no loading); :func:`load_data` still checks their
    integrity. A missing dataset with ``dataset.download=true`` is downloaded here, so that a
    failed download is a set-up error too.
    """
    for name in dict.fromkeys((cfg.dataset.name, cfg.dataset.test_name or cfg.dataset.name)):
        if name == "synthetic":
            continue
        dataset_class = _torchvision_class(name)
        missing = [f for f in _expected_files(name, dataset_class, root) if not f.is_file()]
        if not missing:
            continue
        if cfg.dataset.download:
            _load_split(cfg, name, root, train=True)  # downloads, or raises our message
            continue
        detail = f"missing: {missing[0].resolve()}"
        raise DatasetUnavailableError(
            _unavailable_message(name, dataset_class, Path(root), False, detail)
        )


def _unavailable_message(
    name: str, dataset_class: type, root: Path, download: bool, detail: str
) -> str:
    root = root.resolve()
    if name == "mnist":
        wanted = f"{root / 'MNIST' / 'raw'} with the four *-idx?-ubyte files"
        source = f"the four files listed at {dataset_class.mirrors[0]}"
        place = f"and gunzip them into {root / 'MNIST' / 'raw'}"
    else:
        folder = dataset_class.base_folder
        wanted = f"{root / folder} (checked against torchvision's md5 sums)"
        source = dataset_class.url
        place = (
            f"and extract it in {root} so that {root / folder} exists, or copy an existing "
            f"{folder} folder there"
        )
    how = "downloading it failed" if download else "dataset.download is false"
    fetch = "" if download else ", or set dataset.download=true on a machine with internet access"
    return (
        f"Dataset {name} is not available: looked for {wanted} and {how} ({detail}). "
        f"To provide it, download {source} {place}, or point "
        f"dataset.root at the folder that holds it{fetch}. To run without it, use "
        f"dataset=synthetic or profile=smoke."
    )

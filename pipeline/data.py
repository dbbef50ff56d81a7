"""Datasets by name. Every dataset yields float32 images in [0, 1] (N x C x H x W) and int64 labels.

- ``digits``: the embedded default, scikit-learn's bundled 1,797 real 8x8 handwritten digits (pixels / 16),
  with a fixed stratified train/test split. Needs no network.
- ``cifar10`` / ``svhn``: torchvision's loaders over a local ``root`` (never downloaded at run time).
- ``imagefolder``: an ImageNet-style folder (``root/train/<class>/*``, ``root/val/<class>/*``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pipeline.config import DataParams
from pipeline.errors import HydraPipeError
from pipeline.registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    info: DatasetInfo


DATASETS: Registry[Callable[[DataParams], Splits]] = Registry("dataset", "data.name")


def load_dataset(params: DataParams) -> Splits:
    return DATASETS.get(params.name)(params)


def digits_arrays(test_fraction: float = 0.25, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The embedded default: (x_train, y_train, x_test, y_test), x float32 N x 1 x 8 x 8 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


@DATASETS.register("digits")
def _digits(params: DataParams) -> Splits:
    x_tr, y_tr, x_te, y_te = digits_arrays(params.test_fraction, params.split_seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    info = DatasetInfo(channels=1, size=8, classes=10, mean=(mean,), std=(std,))
    return Splits(TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
                  TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)), info)


def _require_root(params: DataParams) -> Path:
    if params.root is None:
        raise HydraPipeError(f"data.root: dataset {params.name!r} needs a local folder (nothing is downloaded)")
    root = Path(params.root)
    if not root.is_dir():
        raise HydraPipeError(f"data.root: {root} is not a folder; dataset {params.name!r} is read from disk only")
    return root


def _torchvision_split(factory, root: Path, name: str, **kwargs):
    try:
        return factory(root=str(root), download=False, **kwargs)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise HydraPipeError(f"data.root: no {name} data under {root} ({e})") from None


@DATASETS.register("cifar10")
def _cifar10(params: DataParams) -> Splits:
    from torchvision import datasets, transforms

    root = _require_root(params)
    tf = transforms.ToTensor()
    train = _torchvision_split(datasets.CIFAR10, root, "CIFAR-10", train=True, transform=tf)
    test = _torchvision_split(datasets.CIFAR10, root, "CIFAR-10", train=False, transform=tf)
    info = DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    return Splits(train, test, info)


@DATASETS.register("svhn")
def _svhn(params: DataParams) -> Splits:
    from torchvision import datasets, transforms

    root = _require_root(params)
    tf = transforms.ToTensor()
    train = _torchvision_split(datasets.SVHN, root, "SVHN", split="train", transform=tf)
    test = _torchvision_split(datasets.SVHN, root, "SVHN", split="test", transform=tf)
    info = DatasetInfo(3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
    return Splits(train, test, info)


@DATASETS.register("imagefolder")
def _imagefolder(params: DataParams) -> Splits:
    from torchvision import datasets, transforms

    root = _require_root(params)
    size = params.image_size or 224
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    parts = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise HydraPipeError(f"data.root: {root} has no {split}/ folder (expected ImageNet layout root/{split}/<class>/)")
        try:
            parts[split] = datasets.ImageFolder(str(root / split), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise HydraPipeError(f"data.root: {root / split}: {e}") from None
    info = DatasetInfo(3, size, len(parts["train"].classes), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return Splits(parts["train"], parts["val"], info)


def loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


def as_arrays(ds: Dataset, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (seeded, stratification-free) subset of a dataset as numpy arrays, for calibration and audits."""
    n = len(ds)
    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        return x[idx].numpy().astype(np.float32), y[idx].numpy().astype(np.int64)
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(list(xs)).numpy().astype(np.float32), np.asarray(ys, dtype=np.int64)

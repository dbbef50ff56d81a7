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
    """What a model built for the dataset needs, and what its shipped model says about its outputs. Saved in
    checkpoint sidecars: fields added later have defaults, so sidecars written before them still load."""

    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...] = ()  # class index -> name; () where not recorded (sidecars older than labels)


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image of a dataset becomes one model input (float32 1 x C x H x W in [0, 1]): ``text`` for a
    person, ``code`` Python lines (numpy, PIL) that read a raw image and define ``x``. A shipped model is only as
    right as what it is fed, so its card states both; ``{size}`` stands for the dataset's image side."""

    text: str
    code: str


PREPROCESSING: dict[str, Preprocessing] = {}
"""Dataset name -> its preprocessing, registered next to each dataset below."""

_UNKNOWN = Preprocessing("not recorded for this dataset: images as float32 in [0, 1]",
                         "x = ...  # float32, 1 x C x H x W, values in [0, 1]")


def preprocessing(name: str, info: DatasetInfo) -> Preprocessing:
    """The preprocessing of dataset ``name`` at ``info``'s image size (a dataset registered elsewhere: generic)."""
    p = PREPROCESSING.get(name, _UNKNOWN)
    return Preprocessing(p.text.format(size=info.size), p.code.format(size=info.size))


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


DIGIT_LABELS = tuple(str(d) for d in range(10))
PREPROCESSING["digits"] = Preprocessing(
    "scikit-learn's load_digits images (8 x 8, one channel, integer pixel values 0..16) divided by 16 into [0, 1]",
    "from sklearn.datasets import load_digits\n"
    "image = load_digits().images[0]                    # raw: 8 x 8, pixel values 0..16\n"
    "x = (image / 16.0).astype(np.float32)[None, None]  # 1 x 1 x 8 x 8 in [0, 1]")


@DATASETS.register("digits")
def _digits(params: DataParams) -> Splits:
    x_tr, y_tr, x_te, y_te = digits_arrays(params.test_fraction, params.split_seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    info = DatasetInfo(channels=1, size=8, classes=10, mean=(mean,), std=(std,), labels=DIGIT_LABELS)
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


_RGB_CODE = ("from PIL import Image\n"
             "image = np.asarray(Image.open(\"image.png\").convert(\"RGB\"))    # raw: {size} x {size} x 3, uint8\n"
             "x = (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]  # 1 x 3 x {size} x {size} in [0, 1]")
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PREPROCESSING["cifar10"] = Preprocessing(
    "CIFAR-10's {size} x {size} RGB images (uint8, H x W x C) divided by 255 into [0, 1], channels first "
    "(torchvision's ToTensor)", _RGB_CODE)


@DATASETS.register("cifar10")
def _cifar10(params: DataParams) -> Splits:
    from torchvision import datasets, transforms

    root = _require_root(params)
    tf = transforms.ToTensor()
    train = _torchvision_split(datasets.CIFAR10, root, "CIFAR-10", train=True, transform=tf)
    test = _torchvision_split(datasets.CIFAR10, root, "CIFAR-10", train=False, transform=tf)
    info = DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), CIFAR10_LABELS)
    return Splits(train, test, info)


PREPROCESSING["svhn"] = Preprocessing(
    "SVHN's {size} x {size} RGB house-number crops (uint8, H x W x C) divided by 255 into [0, 1], channels first "
    "(torchvision's ToTensor); label d is the digit d (torchvision maps SVHN's 10 to 0)", _RGB_CODE)


@DATASETS.register("svhn")
def _svhn(params: DataParams) -> Splits:
    from torchvision import datasets, transforms

    root = _require_root(params)
    tf = transforms.ToTensor()
    train = _torchvision_split(datasets.SVHN, root, "SVHN", split="train", transform=tf)
    test = _torchvision_split(datasets.SVHN, root, "SVHN", split="test", transform=tf)
    info = DatasetInfo(3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), DIGIT_LABELS)
    return Splits(train, test, info)


PREPROCESSING["imagefolder"] = Preprocessing(
    "any image as RGB, its shorter side resized to {size} (bilinear), the centre {size} x {size} crop, uint8 "
    "divided by 255 into [0, 1], channels first (torchvision's Resize({size}), CenterCrop({size}), ToTensor)",
    "from PIL import Image\n"
    "image, s = Image.open(\"image.jpg\").convert(\"RGB\"), {size}                # raw: any size\n"
    "w, h = image.size\n"
    "image = image.resize((s, int(s * h / w)) if w <= h else (int(s * w / h), s), Image.BILINEAR)\n"
    "left, top = round((image.width - s) / 2), round((image.height - s) / 2)\n"
    "image = np.asarray(image.crop((left, top, left + s, top + s)))         # s x s x 3, uint8\n"
    "x = (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]        # 1 x 3 x s x s in [0, 1]")


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
    info = DatasetInfo(3, size, len(parts["train"].classes), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                       tuple(parts["train"].classes))
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

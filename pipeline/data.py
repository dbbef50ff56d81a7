"""Datasets by name. Every dataset yields float32 images in [0, 1] (N x C x H x W) and int64 labels.

- ``digits``: the embedded default, scikit-learn's bundled 1,797 real 8x8 handwritten digits (pixels / 16),
  with a fixed stratified train/test split. Needs no network.
- ``fashion_mnist`` / ``mnist``: any MNIST-format IDX set (the four ``*-ubyte`` files, gzipped or not, in ``root``
  or in torchvision's ``root/FashionMNIST/raw/`` / ``root/MNIST/raw/``), read with numpy. ``fashion_mnist`` reads
  Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) unless ``root`` says otherwise.
- ``cifar10`` / ``svhn``: torchvision's loaders over a local ``root`` (never downloaded at run time).
- ``imagefolder``: an ImageNet-style folder (``root/train/<class>/*``, ``root/val/<class>/*``).

**Validation split** (``data.validation``): a stratified, seeded (``split_seed``) part of the training data held
out of training (``Splits.val``): the quantize stage calibrates the int8 model on it, and the test split stays the
audit's. Its default is 5,000 images for ``fashion_mnist`` / ``mnist`` and none for the others, so the digits run
trains on exactly the data it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gzip
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

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
    """``train`` trains, ``val`` (None without a validation split) calibrates and tunes, ``test`` is the audit's."""

    train: Dataset
    test: Dataset
    info: DatasetInfo
    val: Dataset | None = None


DATASETS: Registry[Callable[[DataParams], Splits]] = Registry("dataset", "data.name")


VALIDATION_DEFAULT: dict[str, int] = {"fashion_mnist": 5000, "mnist": 5000}
"""``data.validation: null`` means this many images (0 for a dataset not listed: its training data is unchanged)."""


def load_dataset(params: DataParams) -> Splits:
    """The dataset ``params.name``, with the validation split ``params.validation`` carved from its training data."""
    splits = DATASETS.get(params.name)(params)
    if splits.val is not None:  # the loader carved its own (it needed the split for its statistics)
        return splits
    labels = _labels_of(splits.train)
    keep, val = validation_indices(labels, params.validation, VALIDATION_DEFAULT.get(params.name, 0),
                                   params.split_seed) if labels is not None else (None, None)
    if val is None:
        if labels is None and params.validation:
            raise HydraPipeError(f"data.validation: dataset {params.name!r} does not list its labels; "
                                 "no stratified validation split")
        return splits
    return Splits(_subset(splits.train, keep), splits.test, splits.info, _subset(splits.train, val))


def validation_indices(labels: np.ndarray, validation: int | float | None, default: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training indices, validation indices or None): ``validation`` images (a count, or a fraction of the
    training data; None = ``default``) drawn stratified by label with ``seed``; training indices stay in order."""
    n = len(labels)
    count = default if validation is None else validation
    if isinstance(count, float):
        count = int(round(count * n))
    if count == 0:
        return np.arange(n), None
    if count >= n:
        raise HydraPipeError(f"data.validation: {count} images asked for, the training data has only {n}")
    from sklearn.model_selection import train_test_split

    classes = len(np.unique(labels))
    stratify = labels if count >= classes and n - count >= classes else None  # tiny splits: plain random
    keep, val = train_test_split(np.arange(n), test_size=count, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(val)


def _labels_of(ds: Dataset) -> np.ndarray | None:
    """Every label of a dataset without reading its images, where it lists them (None otherwise)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy()
    for attr in ("targets", "labels"):  # torchvision's CIFAR10 / ImageFolder, SVHN
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr))
    return None


def _subset(ds: Dataset, idx: np.ndarray) -> Dataset:
    if isinstance(ds, TensorDataset):  # stays a TensorDataset (as_arrays' fast path)
        t = torch.from_numpy(idx)
        return TensorDataset(*(x[t] for x in ds.tensors))
    return Subset(ds, idx.tolist())


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
    "# a sample image (a zero: load_digits().images[0]); raw: 8 x 8, integer pixel values 0..16\n"
    "image = np.array([[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],\n"
    "                  [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],\n"
    "                  [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]])\n"
    "x = (image / 16.0).astype(np.float32)[None, None]  # 1 x 1 x 8 x 8 in [0, 1]")


@DATASETS.register("digits")
def _digits(params: DataParams) -> Splits:
    x_tr, y_tr, x_te, y_te = digits_arrays(params.test_fraction, params.split_seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    info = DatasetInfo(channels=1, size=8, classes=10, mean=(mean,), std=(std,), labels=DIGIT_LABELS)
    return Splits(TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
                  TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)), info)


# ---------------------------------------------------------------------------------------------------------------
# MNIST-format IDX files (Fashion-MNIST, MNIST), read with numpy

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped or not) as a numpy array; anything else is one line naming it.

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then each dimension as a
    big-endian uint32; the data follow, exactly as many bytes as the dimensions say."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip's magic, whatever the file's name
            raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a truncated or corrupt gzip stream
        raise HydraPipeError(f"{path}: corrupt gzip data ({e or type(e).__name__})") from None
    except OSError as e:
        raise HydraPipeError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise HydraPipeError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'}; "
                             "expected 0000 08 0n, e.g. 00000803 for images)")
    ndim, dtype = raw[3], _IDX_DTYPES[raw[2]]
    if len(raw) < 4 + 4 * ndim:
        raise HydraPipeError(f"{path}: IDX header cut short ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    size = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - 4 - 4 * ndim != size:
        raise HydraPipeError(f"{path}: IDX dimensions {'x'.join(map(str, dims))} need {size} bytes of data, "
                             f"the file has {len(raw) - 4 - 4 * ndim}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class IdxSet:
    """One MNIST-format dataset: its name for people, torchvision's folder name, its default folder, how to get it."""

    title: str
    torchvision: str
    default_root: str | None
    install: str
    labels: tuple[str, ...]


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
IDX_SETS = {
    "fashion_mnist": IdxSet("Fashion-MNIST", "FashionMNIST", "/usr/share/datasets/fashion-mnist",
                            "install them with `apt-get install dataset-fashion-mnist` (Debian, Ubuntu), or run "
                            "torchvision's datasets.FashionMNIST(ROOT, download=True) on a machine with internet "
                            "and set data.root to ROOT", FASHION_LABELS),
    "mnist": IdxSet("MNIST", "MNIST", None, "run torchvision's datasets.MNIST(ROOT, download=True) on a machine with "
                    "internet and set data.root to ROOT", DIGIT_LABELS),
}


def idx_files(name: str, root: Path) -> dict[str, Path]:
    """The four IDX files of dataset ``name`` under ``root`` (flat, or torchvision's ``root/<Name>/raw/``; each
    gzipped or not), or one line saying what is missing and how to get the files."""
    s = IDX_SETS[name]
    for folder in (root, root / s.torchvision / "raw"):
        found = {}
        for f in IDX_FILES:
            path = next((c for c in (folder / f, folder / f"{f}.gz") if c.is_file()), None)
            if path is not None:
                found[f] = path
        if len(found) == len(IDX_FILES):
            return found
    raise HydraPipeError(f"data.root: no {s.title} files under {root} (need {', '.join(IDX_FILES)}, .gz or not, "
                         f"there or in {s.torchvision}/raw/); {s.install}")


def idx_arrays(name: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of an MNIST-format set: x uint8 N x H x W, y int64, checked together."""
    files = idx_files(name, root)
    arrays = {f: read_idx(path) for f, path in files.items()}
    out = []
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        x, y = arrays[images], arrays[labels]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise HydraPipeError(f"{files[images]}: expected uint8 images N x H x W, got {x.dtype} "
                                 f"{'x'.join(map(str, x.shape))}")
        if y.ndim != 1 or len(y) != len(x):
            raise HydraPipeError(f"{files[labels]}: expected {len(x)} labels (one per image of {files[images].name}),"
                                 f" got shape {'x'.join(map(str, y.shape))}")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(IDX_SETS[name].labels):
            raise HydraPipeError(f"{files[labels]}: labels outside 0..{len(IDX_SETS[name].labels) - 1}")
        out += [x, y.astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise HydraPipeError(f"{files['t10k-images-idx3-ubyte']}: test images are {out[2].shape[1:]}, training "
                             f"images {out[0].shape[1:]}")
    return out[0], out[1], out[2], out[3]


def _idx_dataset(params: DataParams) -> Splits:
    s = IDX_SETS[params.name]
    root = params.root if params.root is not None else s.default_root
    if root is None:
        raise HydraPipeError(f"data.root: dataset {params.name!r} needs the folder of its IDX files (nothing is "
                             f"downloaded); {s.install}")
    x_tr, y_tr, x_te, y_te = idx_arrays(params.name, Path(root))
    keep, val = validation_indices(y_tr, params.validation, VALIDATION_DEFAULT[params.name], params.split_seed)

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy((x.astype(np.float32) / 255.0)[:, None]), torch.from_numpy(y))

    train = tensors(x_tr[keep], y_tr[keep])
    images = train.tensors[0]
    info = DatasetInfo(channels=1, size=int(x_tr.shape[1]), classes=len(s.labels),
                       mean=(float(images.double().mean()),), std=(float(images.double().std()),), labels=s.labels)
    return Splits(train, tensors(x_te, y_te), info, tensors(x_tr[val], y_tr[val]) if val is not None else None)


_GRAY_CODE = ("from PIL import Image\n"
              "image = np.asarray(Image.open(\"image.png\").convert(\"L\"))  # raw: {size} x {size}, uint8\n"
              "x = (image.astype(np.float32) / 255.0)[None, None]          # 1 x 1 x {size} x {size} in [0, 1]")
PREPROCESSING["fashion_mnist"] = Preprocessing(
    "Fashion-MNIST's {size} x {size} grayscale images (uint8, the article light on a black background, as in the "
    "IDX files) divided by 255 into [0, 1]", _GRAY_CODE)
PREPROCESSING["mnist"] = Preprocessing(
    "MNIST's {size} x {size} grayscale digits (uint8, white on black, as in the IDX files) divided by 255 into "
    "[0, 1]", _GRAY_CODE)
DATASETS.register("fashion_mnist")(_idx_dataset)
DATASETS.register("mnist")(_idx_dataset)


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

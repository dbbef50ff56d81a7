"""Dataset loaders: the embedded digits, and torchvision's CIFAR-10 / SVHN / ImageFolder on tiny data made here."""

import pickle

import numpy as np
import pytest
import torch

from pipeline.config import DataParams
from pipeline.data import as_arrays, load_dataset
from pipeline.errors import HydraPipeError
from pipeline.models import build_model, model_names


def test_digits_split_is_fixed_stratified_and_in_unit_range():
    a, b = load_dataset(DataParams()), load_dataset(DataParams())
    xa, ya = as_arrays(a.test)
    xb, yb = as_arrays(b.test)
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 450
    assert xa.dtype == np.float32 and xa.shape[1:] == (1, 8, 8) and 0.0 <= xa.min() and xa.max() <= 1.0
    counts = np.bincount(ya, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # stratified: ~45 of each digit


def test_seeded_subset_is_reproducible():
    data = load_dataset(DataParams())
    x1, y1 = as_arrays(data.test, limit=20, seed=3)
    x2, y2 = as_arrays(data.test, limit=20, seed=3)
    x3, _ = as_arrays(data.test, limit=20, seed=4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)


@pytest.mark.parametrize("name", ["cifar10", "svhn", "imagefolder"])
def test_local_datasets_need_a_root(tmp_path, name):
    with pytest.raises(HydraPipeError, match="data.root"):
        load_dataset(DataParams(name=name))
    with pytest.raises(HydraPipeError, match="data.root"):
        load_dataset(DataParams(name=name, root=str(tmp_path / "absent")))


def test_cifar10_from_a_local_folder(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # our files have other md5s
    splits = load_dataset(DataParams(name="cifar10", root=str(tmp_path)))
    assert len(splits.train) == 20 and len(splits.test) == 4
    x, y = as_arrays(splits.test)
    assert x.shape == (4, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == np.int64
    assert splits.info.channels == 3 and splits.info.size == 32


def test_svhn_from_a_local_folder(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision import datasets

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                   "y": rng.integers(1, 11, (n, 1))})
    monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    splits = load_dataset(DataParams(name="svhn", root=str(tmp_path)))
    x, y = as_arrays(splits.test)
    assert x.shape == (3, 3, 32, 32) and set(y.tolist()) <= set(range(10))  # SVHN's label 10 means digit 0


def test_imagefolder_in_imagenet_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    splits = load_dataset(DataParams(name="imagefolder", root=str(tmp_path), image_size=16))
    x, y = as_arrays(splits.test)
    assert x.shape == (6, 3, 16, 16) and sorted(set(y.tolist())) == [0, 1, 2] and splits.info.classes == 3
    model = build_model("cnn_small", splits.info).eval()
    assert model(torch.from_numpy(x)).shape == (6, 3)


@pytest.mark.parametrize("arch", model_names())
def test_every_architecture_runs_at_cifar_size(arch):
    from pipeline.data import DatasetInfo

    info = DatasetInfo(3, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert build_model(arch, info).eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)

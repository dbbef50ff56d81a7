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


# ---------------------------------------------------------------------------------------------------------------
# MNIST-format IDX sets (fashion_mnist, mnist), on tiny files written here

import gzip  # noqa: E402
import struct  # noqa: E402
from dataclasses import replace  # noqa: E402

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx_set(folder, n_train=60, n_test=20, side=28, gz=(True, False, True, False), seed=0):
    """Four IDX files in ``folder``: images whose mean brightness encodes the label (10 classes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 20, (n, side, side)).astype(np.uint8) + (y * 20)[:, None, None].astype(np.uint8)
        arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"] = x, y
    for name, zipped in zip(IDX_NAMES, gz):
        blob = idx_bytes(arrays[name])
        (folder / (name + ".gz" if zipped else name)).write_bytes(gzip.compress(blob) if zipped else blob)
    return arrays


@pytest.mark.parametrize("name, layout, gz", [
    ("fashion_mnist", "flat", (True, True, True, True)),
    ("fashion_mnist", "flat", (False, False, False, False)),
    ("fashion_mnist", "torchvision", (True, False, True, False)),
    ("mnist", "torchvision", (False, True, False, True)),
    ("mnist", "flat", (True, True, True, True)),
])
def test_idx_sets_load_from_any_layout_gzipped_or_not(tmp_path, name, layout, gz):
    from pipeline.data import IDX_SETS

    folder = tmp_path if layout == "flat" else tmp_path / IDX_SETS[name].torchvision / "raw"
    arrays = write_idx_set(folder, gz=gz)
    splits = load_dataset(DataParams(name=name, root=str(tmp_path), validation=10))
    x, y = as_arrays(splits.test)
    assert x.shape == (20, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x[:, 0], arrays["t10k-images-idx3-ubyte"] / np.float32(255.0))  # raw uint8 / 255
    assert np.array_equal(y, arrays["t10k-labels-idx1-ubyte"])
    assert len(splits.train) == 50 and len(splits.val) == 10
    info = splits.info
    assert (info.channels, info.size, info.classes) == (1, 28, 10) and len(info.labels) == 10
    x_tr, _ = as_arrays(splits.train)
    assert info.mean[0] == pytest.approx(float(x_tr.mean()), rel=1e-5)  # statistics of the training images
    assert info.std[0] == pytest.approx(float(x_tr.std()), rel=1e-4)
    assert build_model("cnn_small", info).eval()(torch.from_numpy(x[:2])).shape == (2, 10)


def test_fashion_mnist_labels_preprocessing_and_default_root():
    from pipeline.data import FASHION_LABELS, IDX_SETS, PREPROCESSING

    assert IDX_SETS["fashion_mnist"].default_root == "/usr/share/datasets/fashion-mnist"
    assert FASHION_LABELS[0] == "T-shirt/top" and FASHION_LABELS[9] == "Ankle boot" and len(FASHION_LABELS) == 10
    assert "255" in PREPROCESSING["fashion_mnist"].text and "255" in PREPROCESSING["mnist"].code


def test_fashion_mnist_reads_its_default_folder_when_root_is_null(tmp_path, monkeypatch):
    from pipeline import data as data_module

    write_idx_set(tmp_path)
    fashion = data_module.IDX_SETS["fashion_mnist"]
    monkeypatch.setitem(data_module.IDX_SETS, "fashion_mnist", replace(fashion, default_root=str(tmp_path)))
    splits = load_dataset(DataParams(name="fashion_mnist", validation=0))
    assert len(splits.train) == 60 and splits.val is None and splits.info.labels[0] == "T-shirt/top"


def test_validation_split_is_stratified_seeded_and_disjoint(tmp_path):
    write_idx_set(tmp_path, n_train=200)
    a = load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=50, split_seed=1))
    b = load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=50, split_seed=1))
    c = load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=50, split_seed=2))
    xa, ya = as_arrays(a.val)
    assert np.array_equal(xa, as_arrays(b.val)[0]) and not np.array_equal(xa, as_arrays(c.val)[0])
    assert np.bincount(ya, minlength=10).tolist() == [5] * 10  # stratified
    xt, _ = as_arrays(a.train)
    assert len(xt) == 150
    rows = {r.tobytes() for r in xt.reshape(len(xt), -1)}
    assert not any(r.tobytes() in rows for r in xa.reshape(len(xa), -1))  # disjoint
    frac = load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=0.1))
    assert len(frac.val) == 20 and len(frac.train) == 180
    with pytest.raises(HydraPipeError, match="data.validation: 5000 images asked for"):  # mnist's default
        load_dataset(DataParams(name="mnist", root=str(tmp_path)))
    with pytest.raises(HydraPipeError, match="data.validation"):
        load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=200))


def test_digits_keep_their_training_data_unless_asked(tmp_path):
    """The default digits run trains on exactly the 1,347 images it always did (its models stay bit for bit)."""
    plain = load_dataset(DataParams())
    assert plain.val is None and len(plain.train) == 1347
    x_tr, y_tr = as_arrays(plain.train)
    from pipeline.data import digits_arrays

    ref_x, ref_y, _, _ = digits_arrays()
    assert np.array_equal(x_tr, ref_x) and np.array_equal(y_tr, ref_y)
    carved = load_dataset(DataParams(validation=100))
    assert len(carved.val) == 100 and len(carved.train) == 1247 and len(carved.test) == 450


def test_missing_idx_files_say_how_to_get_them(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(HydraPipeError) as e:
        load_dataset(DataParams(name="fashion_mnist", root=str(tmp_path)))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "FashionMNIST" in msg and "download=True" in msg
    with pytest.raises(HydraPipeError, match="data.root: dataset 'mnist' needs"):
        load_dataset(DataParams(name="mnist"))  # no default folder for MNIST


@pytest.mark.parametrize("damage, needle", [
    (lambda b: b"\x00\x00\x09\x07" + b[4:], "bad magic number"),          # 7 dimensions
    (lambda b: b"PK\x03\x04" + b[4:], "bad magic number"),                  # not IDX at all
    (lambda b: b[:-5], "need"),                                             # data cut short
    (lambda b: b + b"\x00", "need"),                                        # trailing bytes
    (lambda b: b[:6], "header cut short"),
    (lambda b: gzip.compress(b)[:30], "corrupt gzip"),                      # truncated gzip stream
])
def test_corrupt_idx_file_is_one_line_naming_it(tmp_path, damage, needle):
    write_idx_set(tmp_path, gz=(False, False, False, False))
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(HydraPipeError) as e:
        load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=10))
    msg = str(e.value)
    assert str(bad) in msg and needle in msg and "\n" not in msg


def test_mismatched_idx_files_are_one_line(tmp_path):
    from pipeline.data import read_idx

    write_idx_set(tmp_path, gz=(False, False, False, False))
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(7, np.uint8)))  # 7 labels for 60 images
    with pytest.raises(HydraPipeError, match="expected 60 labels"):
        load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=10))
    labels.write_bytes(idx_bytes(np.full(60, 12, np.uint8)))  # no class 12
    with pytest.raises(HydraPipeError, match="labels outside 0..9"):
        load_dataset(DataParams(name="mnist", root=str(tmp_path), validation=10))
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte").shape == (20, 28, 28)

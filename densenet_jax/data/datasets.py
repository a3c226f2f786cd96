"""The data sets the trainer knows by name: the bundled digits, CIFAR-10/100, image folders, CSV
lists of images, Hugging Face data sets and WebDataset shards, each with its own augmentation
(train) and preprocessing (eval)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np

from densenet_jax.data import transforms as T
from densenet_jax.data.csv_source import CsvSpec, csv_dataset
from densenet_jax.data.dataset import ArraySource, Dataset
from densenet_jax.data.folder import image_folder
from densenet_jax.data.hfds import hf_dataset
from densenet_jax.data.wds import shard_dataset
from densenet_jax.errors import DataError

FILE_SOURCES = ("folder", "csv")  # image files, read in 1 or 3 channels
DIGITS_HELD_OUT = 360  # 20% of scikit-learn's 1,797 digits, fixed by seed 0


def _digits_table() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (pixels (1797, 8, 8) float64 in 0-16, labels (1797,) int64), read from
    the file that ``sklearn.datasets.load_digits`` reads (``sklearn/datasets/data/digits.csv.gz``:
    64 pixels then the label on each line). Found, not imported: importing scikit-learn takes
    seconds, and every digits run would pay them. Raises DataError without scikit-learn, or naming
    the file if it is missing or not such a table."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):  # a finder that refuses it, or a half-imported module
        spec = None
    if spec is None or spec.origin is None:
        raise DataError("--dataset digits: scikit-learn, which ships the digits, is not installed "
                        "(the [train] extra: pip install scikit-learn)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found; the digits file is where scikit-learn's load_digits reads it")
    try:
        table = np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError, EOFError) as e:  # gzip's BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable as the digits table ({e})") from None
    if table.shape[1] != 65 or not len(table):
        raise DataError(f"{path}: {table.shape[0]} rows of {table.shape[1]} values; the digits have "
                        "64 pixels and a label a row")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digits() -> Dataset:
    """scikit-learn's handwritten digits (8x8, 10 classes), shipped inside scikit-learn."""
    pixels, labels = _digits_table()
    images = np.round(pixels * (255 / 16)).astype(np.uint8)[..., None].repeat(3, axis=-1)
    order = np.random.default_rng(0).permutation(len(images))
    held_out, train = order[:DIGITS_HELD_OUT], order[DIGITS_HELD_OUT:]
    mean, std = T.channel_stats(images[train])
    normalize = T.Normalize(mean, std)
    return Dataset("digits", ArraySource(images[train], labels[train]),
                   ArraySource(images[held_out], labels[held_out]), 10, 8,
                   augment=T.Compose([T.PadCrop(1), normalize]), preprocess=normalize,
                   class_names=[str(d) for d in range(10)])


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's python-format batches, refusing anything but numpy arrays and builtins:
    a downloaded pickle is untrusted, and a plain unpickler would run whatever it names."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: missing CIFAR batch file")
    try:
        with path.open("rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return data, np.asarray(batch[label_key.encode()], np.int32)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR python-format batch ({e})") from None


def cifar(data_dir: str | Path, num_classes: int) -> Dataset:
    """CIFAR-10/100 from the python-format folder (``cifar-10-batches-py``/``cifar-100-python``),
    with the paper's augmentation: 4-pixel zero pad, random 32x32 crop, horizontal flip."""
    root = Path(data_dir)
    if num_classes == 10:
        parts = [_read_cifar_batch(root / f"data_batch_{i}", "labels") for i in range(1, 6)]
        test = _read_cifar_batch(root / "test_batch", "labels")
        meta, names_key = root / "batches.meta", b"label_names"
    else:
        parts = [_read_cifar_batch(root / "train", "fine_labels")]
        test = _read_cifar_batch(root / "test", "fine_labels")
        meta, names_key = root / "meta", b"fine_label_names"
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    class_names = [str(i) for i in range(num_classes)]
    if meta.is_file():
        with meta.open("rb") as f:
            class_names = [n.decode() for n in _ArraysOnly(f, encoding="bytes").load()[names_key]]
    normalize = T.Normalize(*T.channel_stats(images))
    return Dataset(f"cifar{num_classes}", ArraySource(images, labels), ArraySource(*test),
                   num_classes, 32, augment=T.Compose([T.PadCrop(4), T.RandomFlip(), normalize]),
                   preprocess=normalize, class_names=class_names)


STREAMED = ("hfds/", "wds/")  # data sets named by a prefix and what follows it


def is_image_source(name: str) -> bool:
    """Whether ``name`` is read as images of any size, with a folder's transforms: a folder, a CSV
    list of image files, a Hugging Face data set (``hfds/...``) or WebDataset shards (``wds/...``)."""
    return name in FILE_SOURCES or name.startswith(STREAMED)


def check_source(name: str, data_dir: str | Path | None = None, in_chans: int = 3) -> None:
    """DataError unless :func:`load_dataset` can read ``name`` from ``data_dir`` with ``in_chans``
    channels: a known data set, its folder given and there, a channel count it has."""
    if in_chans != 3 and not is_image_source(name):
        raise DataError(f"in_chans={in_chans} needs --dataset folder, csv, hfds/... or wds/... ({name} is RGB)")
    if is_image_source(name) and in_chans not in T.IMAGE_MODES:
        raise DataError(f"{name}: images give 1 or 3 channels, not in_chans={in_chans}")
    if name == "digits" or name.startswith(STREAMED):
        if name in STREAMED:
            raise DataError(f"--dataset {name}: name the data set after the prefix ({name}NAME)")
        return
    if name not in ("cifar10", "cifar100", *FILE_SOURCES):
        raise DataError(f"unknown dataset {name!r}: digits, cifar10, cifar100, folder, csv, hfds/NAME or wds/PATTERN")
    if data_dir is None:
        raise DataError(f"--data-dir is needed for dataset {name}")
    if not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: " + ("is a file, not a folder" if Path(data_dir).exists()
                                                      else "no such folder"))


def load_dataset(name: str, data_dir: str | Path | None = None, strict: bool = False,
                 image_size: int = 224, in_chans: int = 3, *, csv: CsvSpec | None = None,
                 input_key: str | None = None, target_key: str | None = None, train_split: str | None = None,
                 val_split: str | None = None, train_num_samples: int | None = None) -> Dataset:
    """``digits`` (bundled), ``cifar10``/``cifar100``, ``folder`` or ``csv`` (these read ``data_dir``),
    ``hfds/NAME`` (``data.hfds.hf_dataset``: ``input_key``, ``target_key``, ``train_split``,
    ``val_split``) or ``wds/PATTERN`` (``data.wds.shard_dataset``: ``target_key``, ``val_split``
    a pattern, ``train_num_samples``; relative patterns under ``data_dir``).

    For images (a folder's, hfds', wds'): ``image_size`` is the training crop (eval resizes
    to 8/7 of it, then crops), images are read with ``in_chans`` channels (1: greyscale, "L"), and
    with ``strict`` an unreadable image is an error rather than skipped when it is read; the other
    data sets are RGB. A ``csv`` data set is the one ``csv`` describes
    (:func:`densenet_jax.data.csv_source.csv_dataset`), read as a folder is."""
    check_source(name, data_dir, in_chans)
    if name == "digits":
        return digits()
    mode = T.IMAGE_MODES.get(in_chans, "RGB")
    if name == "csv":
        return csv_dataset(data_dir, csv or CsvSpec(), image_size, strict, mode)
    if name == "folder":
        return image_folder(data_dir, image_size, strict, mode)
    if name.startswith("hfds/"):
        return hf_dataset(name[len("hfds/"):], image_size, strict, mode, input_key, target_key,
                          train_split, val_split)
    if name.startswith("wds/"):
        return shard_dataset(name[len("wds/"):], None if data_dir is None else str(data_dir), image_size,
                             strict, mode, target_key, val_split, train_num_samples)
    return cifar(data_dir, int(name[len("cifar"):]))

"""Small data sets in the on-disk formats users have: CIFAR's python batches, image folders."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's ``str`` opcodes, as CIFAR's python-format files were written: read
    with ``encoding="bytes"`` they are bytes, with ``encoding="latin1"`` (torchvision) str."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """``cifar-10-batches-py`` with 5 training batches and a test batch of random images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def batch(name, n):
        _dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}, root / name)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_batch)
    batch("test_batch", per_batch)
    _dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, root / "batches.meta")
    return root


def write_cifar100(root: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        _dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"fine_labels": rng.integers(0, 100, n).tolist()}, root / name)
    _dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}, root / "meta")
    return root


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4,
                       seed: int = 0) -> Path:
    """``train/<class>/*.jpg`` and ``val/<class>/*.png`` of random sizes and colours."""
    rng = np.random.default_rng(seed)
    for split, suffix in (("train", ".jpg"), ("val", ".png")):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(40, 90, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] = 255  # a class signal
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return root


def tiny_weights_file(path: Path) -> Path:
    """A densenet_jax weights file of a small DenseNet-BC (k=12, blocks of 2 layers, 10 classes)."""
    from flax import nnx

    import densenet_jax as dj
    dj.save(dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), rngs=nnx.Rngs(0)), path)
    return path


SHAPES = ("hbar", "vbar", "box")  # the labels of write_shapes_csv, each decided by one shape


def draw_shapes(present: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey ``size`` x ``size`` uint8 image of noise with the shapes of SHAPES whose entry in
    ``present`` is true: a horizontal bar, a vertical bar, a hollow box, each at a random place."""
    image = rng.integers(0, 60, (size, size), dtype=np.uint8)
    long, thick = size // 2, max(2, size // 10)
    for name, on in zip(SHAPES, present):
        if not on:
            continue
        y, x = rng.integers(1, size - long, 2)
        if name == "hbar":
            image[y:y + thick, x:x + long] = 230
        elif name == "vbar":
            image[y:y + long, x:x + thick] = 230
        else:
            side = size // 3
            image[y:y + side, x:x + side] = 230
            image[y + 2:y + side - 2, x + 2:x + side - 2] = 40
    return image


def write_shapes_csv(root: Path, rows: int = 96, size: int = 24, seed: int = 0, missing: float = 0.15,
                     name: str = "train.csv") -> tuple[Path, np.ndarray]:
    """A multi-label CSV data set under ``root``: ``images/<name stem>_<i>.png`` (grey), and
    ``name`` with columns Path, Patient, then one per SHAPES (1/0, blank for a missing ``missing``
    share). Returns the CSV's path and the true labels (rows, 3), missing ones included."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    truth = rng.random((rows, len(SHAPES))) < 0.5
    lines = ["Path,Patient," + ",".join(SHAPES)]
    for i, present in enumerate(truth):
        file = f"images/{Path(name).stem}_{i}.png"
        Image.fromarray(draw_shapes(present, size, rng)).save(root / file)
        cells = ["" if rng.random() < missing else str(int(v)) for v in present]
        lines.append(f"{file},p{i // 2},{','.join(cells)}")
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name, truth

"""Image folders (``train/<class>/...``, ``val/<class>/...``) read as torchvision's ImageFolder
reads them, with no image decoded before it is used.

Discovery follows ``torchvision.datasets.ImageFolder`` (0.29): the classes are the sorted names of
the folders in a split, an image is any file below its class folder, at any depth (links followed),
whose name ends in one of ``IMG_EXTENSIONS`` in any case, ordered class by class, then by folder
path, then by file name. On purpose, unlike torchvision: names starting with a dot are ignored,
whether folders (``.ipynb_checkpoints`` is no class; ``.git`` is not walked) or files (macOS's
``._photo.jpg``), and said so once; a link back up the tree is not followed round forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from densenet_jax.data import transforms as T
from densenet_jax.data.dataset import Dataset
from densenet_jax.data.images import (IMG_EXTENSIONS, STAND_IN, UNREADABLE_SEPARATOR,
                                      UnreadableImage, read_image, warn_skipped)
from densenet_jax.data.listing import Tree, list_tree
from densenet_jax.errors import DataError
from densenet_jax.model.pretrained_cfg import PretrainedCfg

log = logging.getLogger("densenet_jax")


@dataclasses.dataclass
class ImageList:
    """The images of one split: paths (str), labels (int32, index into ``classes``), and the
    hidden names that were ignored (relative to the split folder)."""
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    hidden: list[str]


def find_images(split_dir: str | os.PathLike, cache_dir: Path | None = None) -> ImageList:
    """The classes and images of ``split_dir`` by torchvision ImageFolder's rules (module doc),
    from the cached listing (``listing.list_tree``); no image file is opened.

    Raises DataError naming the split folder without class folders, or the class folder without
    images."""
    split_dir = Path(split_dir)
    tree = list_tree(split_dir, IMG_EXTENSIONS, cache_dir)
    classes = tree[""]["dirs"]
    if not classes:
        raise DataError(f"{split_dir}: no class folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _files_under(tree, name)
        if not found:
            raise DataError(f"{split_dir / name}: class folder holds no images (files ending in "
                            f"{' '.join(IMG_EXTENSIONS)}, in any case)")
        paths += [f"{split_dir}{os.sep}{folder}{os.sep}{file}" for folder, file in found]  # os.path.join, 5x faster
        labels += [label] * len(found)
    hidden = [f"{rel}/{name}" if rel else name for rel, entry in tree.items() for name in entry["hidden"]]
    return ImageList(classes, paths, np.asarray(labels, np.int32), sorted(hidden))


def _files_under(tree: Tree, top: str) -> list[tuple[str, str]]:
    """(folder, file name) of every listed file at or below ``top``, sorted as torchvision sorts
    ``os.walk``'s folders (by path string) and then each folder's files."""
    found, stack = [], [top]
    while stack:
        rel = stack.pop()
        entry = tree.get(rel)
        if entry is not None:  # None: a link back up the tree, not followed
            found += [(rel, name) for name in entry["files"]]
            stack += [f"{rel}/{d}" for d in entry["dirs"]]
    return sorted(found)


class StandInSource(Sequence):
    """Examples ``{"image": PIL image, "label": int32 (or float32 (L,) multi-label targets),
    "skipped": int32, "unreadable": str}`` of images decoded when read by :meth:`read` (one per
    index, raising UnreadableImage), with ``labels`` known beforehand.

    An unreadable image is skipped with a warning naming it (once per process) and the next
    readable one of the list takes its place, with ``skipped`` 1 and ``unreadable`` naming the
    images passed over and why (``UNREADABLE_SEPARATOR`` between name, reason, name, ...; empty for
    none): the data pipeline warns from it in the main process, where data workers cannot. Batches
    keep their size, and a rerun reads the same images. With ``strict``, UnreadableImage (a
    DataError) instead."""

    def __init__(self, labels: np.ndarray, strict: bool = False):
        labels = np.asarray(labels)
        # float32 (n, L): multi-label targets (data.csv_source); anything else: class indices
        self.labels = labels if labels.dtype == np.float32 else labels.astype(np.int32)
        self.strict = strict

    def read(self, index: int):
        """Image ``index`` (0 <= index < len), decoded; UnreadableImage naming it if it cannot be."""
        raise NotImplementedError

    def where(self) -> str:
        """What the whole source is, for the error when no image of it is readable."""
        raise NotImplementedError

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            # Also ends iteration: Sequence's __iter__ reads until IndexError, and the wrap-around
            # below would otherwise read forever.
            raise IndexError(f"index {index} out of range for {n} images")
        passed = []
        for offset in range(n):
            i = (index + offset) % n
            try:
                image = self.read(i)
            except UnreadableImage as e:
                if self.strict:
                    raise
                warn_skipped(e, STAND_IN)
                passed += [e.path, e.reason]
                continue
            return {"image": image, "label": self.labels[i], "skipped": np.int32(offset > 0),
                    "unreadable": UNREADABLE_SEPARATOR.join(passed)}
        raise DataError(f"{self.where()}: none of its {n} images is readable")


class FileSource(StandInSource):
    """Image files and their labels as examples (see StandInSource), decoded in ``mode`` ("RGB",
    or "L" for one channel)."""

    def __init__(self, paths: list[str], labels: np.ndarray, mode: str = "RGB", strict: bool = False):
        super().__init__(labels, strict)
        self.paths, self.mode = paths, mode

    def read(self, index: int):
        """The file at ``paths[index]``, read by ``images.read_image``."""
        return read_image(self.paths[index], self.mode)

    def where(self) -> str:
        """The folder holding every file."""
        return os.path.commonpath(self.paths)


def find_split(root: Path, split: str) -> ImageList:
    """:func:`find_images` of ``root/split``; DataError naming a missing split folder."""
    if not (root / split).is_dir():
        raise DataError(f"{root / split}: missing split folder")
    return find_images(root / split)


def say_hidden(root: Path, hidden: list[str]) -> None:
    """The one line saying which hidden names (relative to ``root``) were ignored, if any."""
    if hidden:
        log.info("%s: ignoring %d hidden file(s) and folder(s) (names starting with '.'): %s%s",
                 root, len(hidden), ", ".join(hidden[:3]), ", ..." if len(hidden) > 3 else "")


def image_folder(data_dir: str | os.PathLike, image_size: int = 224, strict: bool = False,
                 mode: str = "RGB"):
    """``train/<class>/...`` and ``val/<class>/...`` (same classes) as a Dataset, with
    torchvision's ImageNet augmentation (RandomResizedCrop ``image_size``, flip) and evaluation
    preprocessing (shorter side to 8/7 of ``image_size``, centre crop), normalised with ImageNet's
    mean and std (for ``mode`` "L", their averages, as timm's ``in_chans=1`` preprocessing and
    :meth:`densenet_jax.model.pretrained_cfg.PretrainedCfg.with_in_chans` take them).

    Raises DataError naming a missing split folder or mismatched classes."""
    root = Path(data_dir)
    train, val = find_split(root, "train"), find_split(root, "val")
    if val.classes != train.classes:
        only = {split: sorted(set(a) - set(b))[:3] for split, a, b in
                (("train/", train.classes, val.classes), ("val/", val.classes, train.classes))}
        raise DataError(f"{root / 'val'}: class folders differ from train/ ("
                        + "; ".join(f"only in {split}: {', '.join(names)}" for split, names in only.items() if names) + ")")
    if len(train.classes) == 1:
        log.warning("warning: %s: one class folder (%s): a model trained on it predicts that class for "
                    "every image", root / "train", train.classes[0])
    say_hidden(root, [f"train/{h}" for h in train.hidden] + [f"val/{h}" for h in val.hidden])
    return image_dataset("folder", FileSource(train.paths, train.labels, mode, strict),
                         FileSource(val.paths, val.labels, mode, strict), train.classes, image_size, mode)


def image_dataset(name: str, train: Sequence, val: Sequence, classes: list[str], image_size: int,
                  mode: str) -> Dataset:
    """A Dataset of decoded images (a folder's, a Hugging Face data set's, WebDataset shards'),
    with the augmentation and preprocessing that :func:`image_folder` describes."""
    cfg = PretrainedCfg().with_in_chans(1 if mode == "L" else 3)
    normalize = T.Normalize(cfg.mean, cfg.std)
    return Dataset(name, train, val, len(classes), image_size,
                   augment=T.Compose([T.RandomResizedCrop(image_size), T.RandomFlip(), normalize]),
                   preprocess=T.Compose([T.ResizeCenterCrop(image_size * 8 // 7, image_size), normalize]),
                   class_names=classes)

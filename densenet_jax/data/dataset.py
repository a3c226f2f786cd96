"""What every data source gives the trainer: a Dataset of two splits of examples.

An example is ``{"image": uint8 HWC array, "label": int32}``, or for multi-label data a float32
(L,) label, NaN where missing (an image folder's or a CSV's holds a PIL image and adds ``skipped``
and ``unreadable``, see ``data.folder.FileSource``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Example = dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
    """A data set as the trainer takes it: its two splits, indexable sequences of examples, the
    augmentation of the training split (an example and a seeded generator in, an example out) and
    the preprocessing of the held-out split, which both end in float32 normalised HWC images."""
    name: str
    train: Sequence[Example]
    eval: Sequence[Example]
    num_classes: int
    image_size: int
    augment: Callable[[Example, np.random.Generator], Example]
    preprocess: Callable[[Example], Example]
    class_names: list[str]
    # Several labels per image (targets float32 (L,), NaN where missing; class_names names them)
    # rather than one class index.
    multi_label: bool = False



class ArraySource(Sequence):
    """Images (N, H, W, C) uint8 and labels (N,), indexed as examples."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": self.labels[index]}

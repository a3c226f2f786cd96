"""What every data source gives the trainer: a Dataset of two splits of examples.

An example is ``{"image": uint8 HWC array, "label": int32}``, or for multi-label data a float32
(L,) label, NaN where missing (an image folder's or a CSV's holds a PIL image and adds ``skipped``
and ``unreadable``, see ``data.folder.FileSource``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from densenet_jax.data import transforms as T
from densenet_jax.model.pretrained_cfg import PretrainedCfg

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

    def preprocessing_cfg(self) -> PretrainedCfg:
        """The held-out preprocessing as a pretrained cfg (size, resize as crop_pct, interpolation,
        mean/std, channels), stored with the weights a run writes so that ``predict`` prepares
        images exactly as ``evaluate`` did. Read off the data set's own transforms."""
        steps = getattr(self.preprocess, "transforms", [self.preprocess])
        normalize = next(t for t in steps if isinstance(t, T.Normalize))
        crop = next((t for t in steps if isinstance(t, T.ResizeCenterCrop)), None)
        size = crop.crop if crop else self.image_size
        interpolation = {v: k for k, v in T.INTERPOLATIONS.items()}[crop.interpolation] if crop else "bilinear"
        return PretrainedCfg(input_size=(len(normalize.mean), size, size), interpolation=interpolation,
                             crop_pct=size / crop.resize if crop else 1.0, num_classes=self.num_classes,
                             mean=tuple(map(float, normalize.mean)), std=tuple(map(float, normalize.std)))


class ArraySource(Sequence):
    """Images (N, H, W, C) uint8 and labels (N,), indexed as examples."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": self.labels[index]}

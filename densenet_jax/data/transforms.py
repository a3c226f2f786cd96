"""Per-example image transforms, with torchvision's semantics where torchvision defines them.

Each transform is ``t(example, rng=None) -> example``; random ones need ``rng``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
    return x.mean(0), x.std(0)


def read_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as RGB (decoded now, the file closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def unreadable(path: Path) -> str | None:
    """Why the image at ``path`` cannot be decoded, or None if it can. JPEGs are decoded at reduced
    size (quick, yet every byte is still read, so truncation shows)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None


class Compose:
    """Transforms applied in order to an example (each takes the example and an RNG)."""
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, example, rng=None):
        for t in self.transforms:
            example = t(example, rng)
        return example


class Normalize:
    """uint8 (or PIL) -> float32 ``(x / 255 - mean) / std``, as ToTensor + Normalize compute it."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, example, rng=None):
        x = np.asarray(example["image"], np.float32) / np.float32(255)
        return {**example, "image": (x - self.mean) / self.std}


class PadCrop:
    """Zero-pad by ``pad`` pixels on each side, then crop the original size at a random place."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, example, rng):
        image = np.asarray(example["image"])
        h, w = image.shape[:2]
        padded = np.pad(image, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)))
        top, left = rng.integers(0, 2 * self.pad + 1, size=2)
        return {**example, "image": padded[top:top + h, left:left + w]}


class RandomFlip:
    """Mirror left-right with probability 1/2."""

    def __call__(self, example, rng):
        if rng.random() < 0.5:
            image = example["image"]
            image = image.transpose(Image.FLIP_LEFT_RIGHT) if isinstance(image, Image.Image) else image[:, ::-1]
            return {**example, "image": image}
        return example


class RandomResizedCrop:
    """torchvision's RandomResizedCrop: a crop of random area (8%-100%) and aspect ratio (3/4-4/3),
    resized to ``size`` x ``size`` (bilinear); after 10 failed draws, the centre crop."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.log_ratio = size, scale, (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, example, rng):
        image = example["image"]
        width, height = image.size
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                break
        else:
            w, h, top, left = self._central(width, height)
        # Crop, then resize, as torchvision does: resizing with box= would blend in pixels from
        # outside the box at its edges.
        box = (left, top, left + w, top + h)
        return {**example, "image": image.crop(box).resize((self.size, self.size), Image.BILINEAR)}

    def _central(self, width, height):
        low, high = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        if width / height < low:
            w, h = width, round(width / low)
        elif width / height > high:
            w, h = round(height * high), height
        else:
            w, h = width, height
        return w, h, (height - h) // 2, (width - w) // 2


class ResizeCenterCrop:
    """torchvision's eval preprocessing: shorter side to ``resize`` (bilinear, antialiased), then
    the central ``crop`` x ``crop``."""

    def __init__(self, resize: int, crop: int):
        self.resize, self.crop = resize, crop

    def __call__(self, example, rng=None):
        image = example["image"]
        width, height = image.size
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        image = image.resize(size, Image.BILINEAR)
        top = int(round((size[1] - self.crop) / 2.0))
        left = int(round((size[0] - self.crop) / 2.0))
        return {**example, "image": image.crop((left, top, left + self.crop, top + self.crop))}

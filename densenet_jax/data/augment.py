"""timm's training augmentation for image data, run per example in the data workers: random
resized crop (``--scale --ratio --train-interpolation``), flips (``--hflip --vflip``), ``--aa`` or
``--color-jitter``, normalisation, then random erasing (``--reprob --remode --recount``), in the
order of timm's ``transforms_imagenet_train``.

Every random choice comes from the example's numpy Generator (Grain's ``random_map``), so that an
epoch's augmentation depends only on (seed, epoch, position), as the pipeline promises.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from densenet_jax.data import augment_ops as ops
from densenet_jax.data import transforms as T
from densenet_jax.data.augment_policies import OpSettings, auto_augment

TRAIN_INTERPOLATIONS = {"bilinear": (Image.BILINEAR,), "bicubic": (Image.BICUBIC,),
                        "nearest": (Image.NEAREST,), "random": (Image.BILINEAR, Image.BICUBIC)}
ERASE_MODES = ("const", "rand", "pixel")


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """The training augmentation's settings, named and defaulting as this project's command line
    has them (see docs/training.md for timm's defaults beside them): ``aa`` an ``--aa`` policy
    or None, ``color_jitter`` the brightness, contrast and saturation range (0: none; unused with
    ``aa``, as timm), ``reprob`` random erasing's probability, ``remode`` its fill, ``recount``
    the most boxes per image, ``scale``/``ratio`` the crop's area fraction and aspect ranges,
    ``hflip``/``vflip`` flip probabilities, ``train_interpolation`` the crop's (and ``aa``'s)
    resampling."""

    aa: str | None = None
    color_jitter: float = 0.0
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    train_interpolation: str = "bilinear"


class Flip:
    """Mirror left-right (``vertical``: top-bottom) with probability ``prob``."""

    def __init__(self, prob: float, vertical: bool = False):
        self.prob, self.vertical = prob, vertical

    def __call__(self, example, rng):
        if rng.random() >= self.prob:
            return example
        image = example["image"]
        if isinstance(image, Image.Image):
            image = image.transpose(Image.FLIP_TOP_BOTTOM if self.vertical else Image.FLIP_LEFT_RIGHT)
        else:
            image = image[::-1] if self.vertical else image[:, ::-1]
        return {**example, "image": image}


class ImageOp:
    """A PIL-image policy (``policy(img, rng)``) applied to an example's image, converting an
    array image to PIL first."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, example, rng):
        image = example["image"]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image).squeeze(-1) if np.ndim(image) == 3 and
                                    np.shape(image)[-1] == 1 else np.asarray(image))
        return {**example, "image": self.policy(image, rng)}


class ColorJitter:
    """torchvision's ColorJitter(b, c, s, h): the four adjustments in a random order, each factor
    uniform in [max(0, 1 - x), 1 + x] (hue's shift in [-h, h]); a zero range is left out."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        self.ranges = [(max(0.0, 1 - v), 1 + v) if v else None for v in (brightness, contrast, saturation)]
        self.ranges.append((-hue, hue) if hue else None)

    def draw(self, rng) -> list[tuple[int, float]]:
        """[(adjustment index: 0 brightness, 1 contrast, 2 saturation, 3 hue, factor)] in order."""
        factors = [None if r is None else rng.uniform(*r) for r in self.ranges]
        return [(int(i), factors[i]) for i in rng.permutation(4) if factors[i] is not None]

    @staticmethod
    def apply(img, drawn):
        """The adjustments ``drawn`` on a PIL image."""
        for i, factor in drawn:
            img = (ops.brightness, ops.contrast, ops.color, ops.hue)[i](img, factor)
        return img

    def __call__(self, img, rng):
        return self.apply(img, self.draw(rng))


class RandomErasing:
    """timm's RandomErasing on a normalised HWC float image: with probability ``prob``, 1 to
    ``count`` boxes (drawn uniformly), each of area 2%-33% of the image divided by the number of
    boxes and aspect ratio log-uniform in 0.3-1/0.3 (10 tries, else none), filled with 0
    (``const``), one normal draw per channel (``rand``) or per pixel (``pixel``)."""

    def __init__(self, prob: float, mode: str = "const", count: int = 1,
                 area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)):
        self.prob, self.mode, self.count = prob, mode, count
        self.area, self.log_aspect = area, (math.log(aspect[0]), math.log(aspect[1]))

    def draw(self, rng, height: int, width: int, channels: int) -> list[tuple[int, int, int, int, np.ndarray]]:
        """[(top, left, h, w, fill of shape (h, w, channels) float32)], one per placed box."""
        if rng.random() > self.prob:
            return []
        count = self.count if self.count == 1 else int(rng.integers(1, self.count + 1))
        boxes = []
        for _ in range(count):
            for _ in range(10):
                target = rng.uniform(*self.area) * height * width / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if w < width and h < height:
                    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                    boxes.append((top, left, h, w, self._fill(rng, h, w, channels)))
                    break
        return boxes

    def _fill(self, rng, h, w, channels):
        if self.mode == "pixel":
            return rng.standard_normal((h, w, channels), dtype=np.float32)
        if self.mode == "rand":
            return np.broadcast_to(rng.standard_normal((1, 1, channels), dtype=np.float32), (h, w, channels))
        return np.zeros((h, w, channels), np.float32)

    @staticmethod
    def apply(image: np.ndarray, boxes) -> np.ndarray:
        """``image`` (HWC float32) with ``boxes`` filled in (a copy)."""
        image = np.array(image)
        for top, left, h, w, fill in boxes:
            image[top:top + h, left:left + w] = fill
        return image

    def __call__(self, example, rng):
        image = example["image"]
        boxes = self.draw(rng, *image.shape)
        return {**example, "image": self.apply(image, boxes)} if boxes else example


def op_settings(options: AugmentOptions, image_size: int, mean) -> OpSettings:
    """What timm's ``create_transform`` gives ``--aa``'s ops: 45% of the crop as the translation
    range, the mean (0-255) as fill, and the training interpolation (bilinear or bicubic drawn
    per op for ``random``)."""
    return OpSettings(fill=tuple(min(255, round(255 * float(m))) for m in mean),
                      translate_const=int(image_size * 0.45),
                      interpolations=TRAIN_INTERPOLATIONS[options.train_interpolation])


def colour_steps(options: AugmentOptions, image_size: int, mean) -> list:
    """``--aa``'s policy, else colour jitter (timm leaves jitter out when a policy is given), as
    example transforms; none when neither is asked for."""
    if options.aa:
        return [ImageOp(auto_augment(options.aa, op_settings(options, image_size, mean)))]
    if options.color_jitter:
        return [ImageOp(ColorJitter(*(options.color_jitter,) * 3))]
    return []


def train_transform(options: AugmentOptions, crop, image_size: int, normalize: T.Normalize,
                    flips: bool = True) -> T.Compose:
    """The training transform: ``crop`` (the data set's: a random resized or padded crop), the
    flips (when ``flips``), the colour policy, ``normalize``, random erasing."""
    steps = [crop]
    if flips and options.hflip > 0:
        steps.append(Flip(options.hflip))
    if flips and options.vflip > 0:
        steps.append(Flip(options.vflip, vertical=True))
    steps += colour_steps(options, image_size, normalize.mean)
    steps.append(normalize)
    if options.reprob > 0:
        steps.append(RandomErasing(options.reprob, options.remode, options.recount))
    return T.Compose(steps)

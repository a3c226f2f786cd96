"""Per-example image transforms, with torchvision's semantics where torchvision defines them.

Each transform is ``t(example, rng=None) -> example``; random ones need ``rng``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from densenet_jax.model.pretrained_cfg import PretrainedCfg, resize_size



def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 NHWC images, on the [0, 1] scale."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
    return x.mean(0), x.std(0)


class Compose:
    """Transforms applied in order to an example (each takes the example and an RNG)."""
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, example, rng=None):
        for t in self.transforms:
            example = t(example, rng)
        return example


class Normalize:
    """uint8 (or PIL) HWC, or HW for one channel -> float32 HWC ``(x / 255 - mean) / std``, as
    ToTensor + Normalize compute it."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, example, rng=None):
        x = np.asarray(example["image"])
        if x.ndim == 2:  # a one-channel ("L") image: keep HWC
            x = x[..., None]
        height, width, channels = x.shape
        # A row at a time, against the mean and std repeated along it: numpy's loops over a last
        # axis of 3 are many times slower. The same operations in the same order, so the same
        # numbers as torchvision's ToTensor + Normalize.
        out = x.reshape(height, width * channels).astype(np.float32)
        out /= np.float32(255)
        out -= np.tile(self.mean, width)
        out /= np.tile(self.std, width)
        return {**example, "image": out.reshape(height, width, channels)}


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
    resized to ``size`` x ``size`` (bilinear, or a PIL filter drawn from ``interpolations`` after
    the crop, as timm's RandomResizedCropAndInterpolation); after 10 failed draws, the centre crop."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolations=(Image.BILINEAR,)):
        self.size, self.scale, self.log_ratio = size, scale, (math.log(ratio[0]), math.log(ratio[1]))
        self.interpolations = interpolations

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
        # One filter draws nothing, so that the default crop's stream of draws stays as it was.
        resample = self.interpolations[rng.integers(len(self.interpolations))] if len(
            self.interpolations) > 1 else self.interpolations[0]
        return {**example, "image": image.crop(box).resize((self.size, self.size), resample)}

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
    """torchvision's eval preprocessing: shorter side to ``resize`` (bilinear, antialiased; or
    ``interpolation``, a PIL filter such as ``Image.BICUBIC``), then the central ``crop`` x ``crop``."""

    def __init__(self, resize: int, crop: int, interpolation: int = Image.BILINEAR):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation

    def __call__(self, example, rng=None):
        image = example["image"]
        width, height = image.size
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        image = image.resize(size, self.interpolation)
        top = int(round((size[1] - self.crop) / 2.0))
        left = int(round((size[0] - self.crop) / 2.0))
        return {**example, "image": image.crop((left, top, left + self.crop, top + self.crop))}


class ConvertMode:
    """A PIL image converted to ``mode`` ("L" for one channel, "RGB" for three), as the weights
    expect, whatever the file held."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, example, rng=None):
        image = example["image"]
        return {**example, "image": image if image.mode == self.mode else image.convert(self.mode)}


class XRayCenterCropResize:
    """torchxrayvision's ``XRayCenterCrop`` then ``XRayResizer(size)`` on a normalised HW1 float32
    image: the largest central square (offsets ``dim // 2 - side // 2``), resized to ``size`` x
    ``size`` by scikit-image's ``resize`` as XRayResizer calls it (bilinear, Gaussian
    anti-aliasing when shrinking, zeros beyond the edges), on the (1, H, W) layout it uses."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, example, rng=None):
        # scikit-image is torchxrayvision's resizer: the same function gives the same numbers.
        # Imported here: only weights with torchxrayvision's preprocessing need it (the [xrv] extra).
        try:
            from skimage.transform import resize
        except ImportError:
            raise ValueError("torchxrayvision's preprocessing (crop_mode 'xrv') needs scikit-image: "
                             "the [xrv] extra: pip install scikit-image") from None
        image = np.asarray(example["image"])
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = height // 2 - side // 2, width // 2 - side // 2
        square = np.moveaxis(image[top:top + side, left:left + side], -1, 0)
        out = resize(square, (square.shape[0], self.size, self.size), mode="constant", preserve_range=True)
        return {**example, "image": np.moveaxis(out.astype(np.float32), 0, -1)}


INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
IMAGE_MODES = {1: "L", 3: "RGB"}


def eval_transform_from_cfg(input_size: tuple[int, int, int], interpolation: str, crop_pct: float,
                            mean, std, crop_mode: str = "center") -> Compose:
    """timm's eval preprocessing (``create_transform(**resolve_data_config(...))``) for a pretrained
    cfg's values: the image in the mode its channel count needs, shorter side to
    floor(size / crop_pct) with ``interpolation`` (PIL, antialiased), the central size x size,
    then ``(x / 255 - mean) / std``; HWC float32 out. Square input sizes, centre crops only.
    ``crop_mode="xrv"``: torchxrayvision's order instead: the grey image normalised, then
    :class:`XRayCenterCropResize`."""

    channels, height, width = input_size
    if crop_mode == "xrv" and height == width and channels == 1:
        return Compose([ConvertMode("L"), Normalize(mean, std), XRayCenterCropResize(height)])
    if height != width or crop_mode != "center":
        raise ValueError(f"input_size {tuple(input_size)}, crop_mode {crop_mode!r}: only square "
                         "centre crops are supported")
    if channels not in IMAGE_MODES:
        raise ValueError(f"image files give 1 or 3 channels, not {channels}")
    return Compose([ConvertMode(IMAGE_MODES[channels]),
                    ResizeCenterCrop(resize_size(height, crop_pct), height, INTERPOLATIONS[interpolation]),
                    Normalize(mean, std)])


def preprocessing_cfg(data) -> PretrainedCfg:
    """A :class:`~densenet_jax.data.dataset.Dataset`'s held-out preprocessing as a pretrained cfg
    (size, resize as crop_pct, interpolation, mean/std, channels), stored with the weights a run
    writes so that ``predict`` prepares images exactly as ``evaluate`` did. Read off the data
    set's own transforms."""
    steps = getattr(data.preprocess, "transforms", [data.preprocess])
    normalize = next(t for t in steps if isinstance(t, Normalize))
    crop = next((t for t in steps if isinstance(t, ResizeCenterCrop)), None)
    size = crop.crop if crop else data.image_size
    interpolation = {v: k for k, v in INTERPOLATIONS.items()}[crop.interpolation] if crop else "bilinear"
    return PretrainedCfg(input_size=(len(normalize.mean), size, size), interpolation=interpolation,
                         crop_pct=size / crop.resize if crop else 1.0, num_classes=data.num_classes,
                         mean=tuple(map(float, normalize.mean)), std=tuple(map(float, normalize.std)))

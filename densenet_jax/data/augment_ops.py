"""The image operations that RandAugment, AutoAugment, AugMix, TrivialAugmentWide and colour jitter
draw from, on PIL images, each a deterministic function of its arguments.

The drawing (which operation, what magnitude, which sign) lives in
:mod:`densenet_jax.data.augment_policies`; here an operation is given its argument and returns the
pixels timm's ``auto_augment`` op of that name returns (or torchvision's functional op, for the
``tv_*`` ones that TrivialAugmentWide and ColorJitter use), as PIL computes them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Fill = tuple[int, ...]


def affine(img: Image.Image, coefficients, resample: int, fill: Fill | None) -> Image.Image:
    """PIL's affine transform (``coefficients`` map output to input pixels), same size."""
    return img.transform(img.size, Image.AFFINE, tuple(coefficients), resample=resample,
                         fillcolor=fill)


def shear_x(img, factor: float, resample: int, fill: Fill | None):
    """Horizontal shear: output (x, y) reads input (x + factor * y, y)."""
    return affine(img, (1, factor, 0, 0, 1, 0), resample, fill)


def shear_y(img, factor: float, resample: int, fill: Fill | None):
    """Vertical shear: output (x, y) reads input (x, y + factor * x)."""
    return affine(img, (1, 0, 0, factor, 1, 0), resample, fill)


def translate_x(img, pixels: float, resample: int, fill: Fill | None):
    """Output (x, y) reads input (x + pixels, y): the picture moves left by ``pixels``."""
    return affine(img, (1, 0, pixels, 0, 1, 0), resample, fill)


def translate_y(img, pixels: float, resample: int, fill: Fill | None):
    """Output (x, y) reads input (x, y + pixels): the picture moves up by ``pixels``."""
    return affine(img, (1, 0, 0, 0, 1, pixels), resample, fill)


def translate_x_rel(img, fraction: float, resample: int, fill: Fill | None):
    """:func:`translate_x` by ``fraction`` of the width."""
    return translate_x(img, fraction * img.size[0], resample, fill)


def translate_y_rel(img, fraction: float, resample: int, fill: Fill | None):
    """:func:`translate_y` by ``fraction`` of the height."""
    return translate_y(img, fraction * img.size[1], resample, fill)


def rotate(img, degrees: float, resample: int, fill: Fill | None):
    """Counter-clockwise about the centre, same size."""
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def auto_contrast(img, *_):
    """Each channel stretched to 0..255."""
    return ImageOps.autocontrast(img)


def equalize(img, *_):
    """Each channel's histogram equalised."""
    return ImageOps.equalize(img)


def invert(img, *_):
    """255 - x."""
    return ImageOps.invert(img)


def solarize(img, threshold: float, *_):
    """255 - x where x >= ``threshold``."""
    return ImageOps.solarize(img, threshold)


def solarize_add(img, add: int, *_, threshold: int = 128):
    """min(255, x + ``add``) where x < ``threshold``; other modes than L and RGB unchanged."""
    if img.mode not in ("L", "RGB"):
        return img
    table = [min(255, v + add) if v < threshold else v for v in range(256)]
    return img.point(table * len(img.getbands()))


def posterize(img, bits: int, *_):
    """Keep the ``bits`` most significant bits (8 or more: unchanged; 0: black, as PIL gave before
    Pillow 10 refused 0: timm's Posterize at levels below 2.5, and PosterizeIncreasing at levels
    above 7.5, ask for 0 bits and raise ValueError in timm with today's Pillow)."""
    if bits >= 8:
        return img
    return ImageOps.posterize(img, bits) if bits > 0 else img.point([0] * 256 * len(img.getbands()))


def _enhancer(kind):
    def enhance(img, factor: float, *_):
        return kind(img).enhance(factor)
    enhance.__doc__ = f"PIL's ImageEnhance.{kind.__name__} by ``factor`` (1: unchanged)."
    return enhance


color = _enhancer(ImageEnhance.Color)
contrast = _enhancer(ImageEnhance.Contrast)
brightness = _enhancer(ImageEnhance.Brightness)
sharpness = _enhancer(ImageEnhance.Sharpness)


def hue(img, shift: float, *_):
    """Hue moved by ``shift`` of a turn (-0.5..0.5) in PIL's 8-bit HSV, wrapping around, as
    torchvision's adjust_hue does on a PIL image; one-channel images unchanged."""
    if img.mode in ("L", "1", "I", "F"):
        return img
    h, s, v = img.convert("HSV").split()
    moved = (np.asarray(h, np.uint8) + np.int32(shift * 255).astype(np.uint8)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(moved, "L"), s, v)).convert(img.mode)


def _inverse_shear_translate(shear_degrees: tuple[float, float], translate, center) -> list[float]:
    """The output-to-input affine map of a shear (degrees along x, y) about ``center`` followed by
    a translation, as torchvision's F.affine builds it for PIL (angle 0, scale 1)."""
    sx, sy = math.radians(shear_degrees[0]), math.radians(shear_degrees[1])
    a = math.cos(-sy) / math.cos(sy)
    b = -math.cos(-sy) * math.tan(sx) / math.cos(sy) - math.sin(0.0)
    c = math.sin(-sy) / math.cos(sy)
    d = -math.sin(-sy) * math.tan(sx) / math.cos(sy) + math.cos(0.0)
    m = [d, -b, 0.0, -c, a, 0.0]
    (cx, cy), (tx, ty) = center, translate
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def tv_shear_x(img, magnitude: float, resample: int, fill: Fill | None):
    """torchvision's TrivialAugmentWide ShearX: shear by atan(magnitude) about the top-left."""
    m = _inverse_shear_translate((math.degrees(math.atan(magnitude)), 0.0), (0, 0), (0, 0))
    return affine(img, m, resample, fill)


def tv_shear_y(img, magnitude: float, resample: int, fill: Fill | None):
    """torchvision's TrivialAugmentWide ShearY: shear by atan(magnitude) about the top-left."""
    m = _inverse_shear_translate((0.0, math.degrees(math.atan(magnitude))), (0, 0), (0, 0))
    return affine(img, m, resample, fill)


def tv_translate_x(img, magnitude: float, resample: int, fill: Fill | None):
    """torchvision's TranslateX: the picture moves right by int(magnitude) pixels."""
    centre = (img.size[0] * 0.5, img.size[1] * 0.5)
    return affine(img, _inverse_shear_translate((0.0, 0.0), (int(magnitude), 0), centre), resample, fill)


def tv_translate_y(img, magnitude: float, resample: int, fill: Fill | None):
    """torchvision's TranslateY: the picture moves down by int(magnitude) pixels."""
    centre = (img.size[0] * 0.5, img.size[1] * 0.5)
    return affine(img, _inverse_shear_translate((0.0, 0.0), (0, int(magnitude)), centre), resample, fill)


def identity(img, *_):
    """The image unchanged."""
    return img

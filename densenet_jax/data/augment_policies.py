"""``--aa``: RandAugment, AutoAugment and AugMix in timm's grammar and with timm's draws, and
torchvision's TrivialAugmentWide (``ta_wide``), on PIL images in the data workers.

Each policy draws from a numpy Generator (the example's, from Grain's ``random_map``): which
operations, whether each applies, its magnitude and its sign, with the distributions of timm's
``auto_augment.py`` (torchvision's ``TrivialAugmentWide`` for ``ta_wide``); the operations
themselves are :mod:`densenet_jax.data.augment_ops`. Magnitudes are on timm's 0-10 scale.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image

from densenet_jax.data import augment_ops as ops

LEVEL_MAX = 10.0  # timm's magnitude scale: level / 10 is the fraction of each op's range


@dataclasses.dataclass(frozen=True)
class OpSettings:
    """What timm's ``hparams`` give every op: the fill of uncovered pixels (the data's mean as
    0-255 integers), the translation range (pixels at level 10 for TranslateX/Y; fraction of the
    side for the Rel ones), the resampling filters drawn from (one: always it), and the
    magnitude's noise (``magnitude_std``; inf draws uniformly from 0 to the magnitude) and cap."""

    fill: tuple[int, ...] = (128, 128, 128)
    translate_const: float = 250
    translate_pct: float = 0.45
    interpolations: tuple[int, ...] = (Image.BILINEAR, Image.BICUBIC)
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_MAX


def _signed(value, negate):
    return -value if negate else value


def _enhance(level, negate, s):
    return (level / LEVEL_MAX) * 1.8 + 0.1


def _enhance_increasing(level, negate, s):
    return max(0.1, 1.0 + _signed((level / LEVEL_MAX) * 0.9, negate))


def _posterize(level, negate, s):
    return int((level / LEVEL_MAX) * 4)


def _solarize(level, negate, s):
    return min(256, int((level / LEVEL_MAX) * 256))


# name: (operation, its argument from (level, negate, settings) or None, signed, geometric)
OPS = {
    "AutoContrast": (ops.auto_contrast, None, False, False),
    "Equalize": (ops.equalize, None, False, False),
    "Invert": (ops.invert, None, False, False),
    "Rotate": (ops.rotate, lambda lv, n, s: _signed((lv / LEVEL_MAX) * 30.0, n), True, True),
    "Posterize": (ops.posterize, _posterize, False, False),
    "PosterizeIncreasing": (ops.posterize, lambda lv, n, s: 4 - _posterize(lv, n, s), False, False),
    "PosterizeOriginal": (ops.posterize, lambda lv, n, s: _posterize(lv, n, s) + 4, False, False),
    "Solarize": (ops.solarize, _solarize, False, False),
    "SolarizeIncreasing": (ops.solarize, lambda lv, n, s: 256 - _solarize(lv, n, s), False, False),
    "SolarizeAdd": (ops.solarize_add, lambda lv, n, s: min(128, int((lv / LEVEL_MAX) * 110)), False, False),
    "Color": (ops.color, _enhance, False, False),
    "ColorIncreasing": (ops.color, _enhance_increasing, True, False),
    "Contrast": (ops.contrast, _enhance, False, False),
    "ContrastIncreasing": (ops.contrast, _enhance_increasing, True, False),
    "Brightness": (ops.brightness, _enhance, False, False),
    "BrightnessIncreasing": (ops.brightness, _enhance_increasing, True, False),
    "Sharpness": (ops.sharpness, _enhance, False, False),
    "SharpnessIncreasing": (ops.sharpness, _enhance_increasing, True, False),
    "ShearX": (ops.shear_x, lambda lv, n, s: _signed((lv / LEVEL_MAX) * 0.3, n), True, True),
    "ShearY": (ops.shear_y, lambda lv, n, s: _signed((lv / LEVEL_MAX) * 0.3, n), True, True),
    "TranslateX": (ops.translate_x, lambda lv, n, s: _signed((lv / LEVEL_MAX) * float(s.translate_const), n),
                   True, True),
    "TranslateY": (ops.translate_y, lambda lv, n, s: _signed((lv / LEVEL_MAX) * float(s.translate_const), n),
                   True, True),
    "TranslateXRel": (ops.translate_x_rel, lambda lv, n, s: _signed((lv / LEVEL_MAX) * s.translate_pct, n),
                      True, True),
    "TranslateYRel": (ops.translate_y_rel, lambda lv, n, s: _signed((lv / LEVEL_MAX) * s.translate_pct, n),
                      True, True),
}


class AugmentOp:
    """One named op applied with probability ``prob`` at ``magnitude`` (0-10), as timm's AugmentOp."""

    def __init__(self, name: str, prob: float, magnitude: float, settings: OpSettings):
        # Only the name is kept: the table's lambdas would not pickle into the worker processes.
        self.name, self.prob, self.magnitude, self.settings = name, prob, magnitude, settings
        self.signed, self.geometric = OPS[name][2:]

    def argument(self, level: float, negate: bool = False):
        """The op's argument at ``level`` (after noise and clipping), negated if ``negate`` and
        the op is signed; None for ops that take none."""
        level_fn = OPS[self.name][1]
        return None if level_fn is None else level_fn(level, negate, self.settings)

    def draw(self, rng: np.random.Generator):
        """(argument, resampling filter) for one application, or None when it does not apply."""
        s = self.settings
        if self.prob < 1.0 and rng.random() > self.prob:
            return None
        level = self.magnitude
        if s.magnitude_std == math.inf:
            level = rng.uniform(0, level)
        elif s.magnitude_std > 0:
            level = rng.normal(level, s.magnitude_std)
        level = max(0.0, min(level, s.magnitude_max))
        negate = bool(self.signed and rng.random() > 0.5)
        resample = s.interpolations[rng.integers(len(s.interpolations))] if self.geometric else None
        return self.argument(level, negate), resample

    def apply(self, img: Image.Image, drawn) -> Image.Image:
        """The op on ``img`` with ``drawn``'s argument and filter."""
        argument, resample = drawn
        args = () if argument is None else (argument,)
        fn = OPS[self.name][0]
        if self.geometric:
            fill = self.settings.fill if img.mode != "L" else self.settings.fill[0]
            return fn(img, *args, resample, fill)
        return fn(img, *args)

    def __call__(self, img, rng):
        drawn = self.draw(rng)
        return img if drawn is None else self.apply(img, drawn)


RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
            "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
            "TranslateYRel")
# With inc1: the ops whose strength grows with the level in place of those whose strength does not.
RAND_INCREASING = {"Posterize": "PosterizeIncreasing", "Solarize": "SolarizeIncreasing",
                   "Color": "ColorIncreasing", "Contrast": "ContrastIncreasing",
                   "Brightness": "BrightnessIncreasing", "Sharpness": "SharpnessIncreasing"}
AUGMIX_OPS = ("AutoContrast", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing", "Equalize", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


class RandAugment:
    """``n`` ops drawn uniformly with replacement, each applied with probability ``prob``."""

    def __init__(self, ops_: list[AugmentOp], n: int):
        self.ops, self.n = ops_, n

    def __call__(self, img, rng):
        for i in rng.integers(0, len(self.ops), self.n):
            img = self.ops[i](img, rng)
        return img


class AutoAugment:
    """One sub-policy (a pair of ops, each with its probability and level) drawn uniformly."""

    def __init__(self, policy: list[list[AugmentOp]]):
        self.policy = policy

    def __call__(self, img, rng):
        for op in self.policy[rng.integers(len(self.policy))]:
            img = op(img, rng)
        return img


class AugMix:
    """``width`` chains of ``depth`` ops (1-3 drawn when -1), mixed with Dirichlet(``alpha``)
    weights, then blended with the original by Beta(``alpha``, ``alpha``) (AugMix, Hendrycks et
    al. 2020, as timm's non-blended AugMixAugment)."""

    def __init__(self, ops_: list[AugmentOp], alpha: float, width: int, depth: int):
        self.ops, self.alpha, self.width, self.depth = ops_, alpha, width, depth

    def __call__(self, img, rng):
        weights = np.float32(rng.dirichlet([self.alpha] * self.width))
        blend = np.float32(rng.beta(self.alpha, self.alpha))
        chains = []
        for _ in range(self.width):
            depth = self.depth if self.depth > 0 else int(rng.integers(1, 4))
            chains.append([self.ops[i] for i in rng.integers(0, len(self.ops), depth)])
        return mix_chains(img, weights, blend, [lambda x, c=c: _chain(x, c, rng) for c in chains])


def _chain(img, chain, rng):
    for op in chain:
        img = op(img, rng)
    return img


def mix_chains(img: Image.Image, weights, blend, chains) -> Image.Image:
    """``img`` blended by ``blend`` towards the ``weights``-weighted sum of ``chains`` (functions
    of the image), summed in float32, clipped to 0-255 and truncated to uint8."""
    mixed = np.zeros_like(np.asarray(img), dtype=np.float32)
    for weight, chain in zip(weights, chains):
        mixed += weight * np.asarray(chain(img), dtype=np.float32)
    np.clip(mixed, 0, 255.0, out=mixed)
    return Image.blend(img, Image.fromarray(mixed.astype(np.uint8)), blend)


# AutoAugment's ImageNet policies, (op, probability, level) pairs: "original" is Cubuk et al. 2019's
# (Table 9 of arXiv:1805.09501), "v0" the TPU EfficientNet implementation's, as timm names them.
_POLICIES = {
    "original": """PosterizeOriginal .4 8 Rotate .6 9|Solarize .6 5 AutoContrast .6 5|Equalize .8 8 Equalize .6 3|
        PosterizeOriginal .6 7 PosterizeOriginal .6 6|Equalize .4 7 Solarize .2 4|Equalize .4 4 Rotate .8 8|
        Solarize .6 3 Equalize .6 7|PosterizeOriginal .8 5 Equalize 1 2|Rotate .2 3 Solarize .6 8|
        Equalize .6 8 PosterizeOriginal .4 6|Rotate .8 8 Color .4 0|Rotate .4 9 Equalize .6 2|
        Equalize 0 7 Equalize .8 8|Invert .6 4 Equalize 1 8|Color .6 4 Contrast 1 8|Rotate .8 8 Color 1 2|
        Color .8 8 Solarize .8 7|Sharpness .4 7 Invert .6 8|ShearX .6 5 Equalize 1 9|Color .4 0 Equalize .6 3|
        Equalize .4 7 Solarize .2 4|Solarize .6 5 AutoContrast .6 5|Invert .6 4 Equalize 1 8|
        Color .6 4 Contrast 1 8|Equalize .8 8 Equalize .6 3""",
    "v0": """Equalize .8 1 ShearY .8 4|Color .4 9 Equalize .6 3|Color .4 1 Rotate .6 8|Solarize .8 3 Equalize .4 7|
        Solarize .4 2 Solarize .6 2|Color .2 0 Equalize .8 8|Equalize .4 8 SolarizeAdd .8 3|
        ShearX .2 9 Rotate .6 8|Color .6 1 Equalize 1 2|Invert .4 9 Rotate .6 0|Equalize 1 9 ShearY .6 3|
        Color .4 7 Equalize .6 0|Posterize .4 6 AutoContrast .4 7|Solarize .6 8 Color .6 9|
        Solarize .2 4 Rotate .8 9|Rotate 1 7 TranslateYRel .8 9|ShearX 0 0 Solarize .8 4|
        ShearY .8 0 Color .6 4|Color 1 0 Rotate .6 2|Equalize .8 4 Equalize 0 8|Equalize 1 4 AutoContrast .6 2|
        ShearY .4 7 SolarizeAdd .6 7|Posterize .8 2 Solarize .6 10|Solarize .6 8 Equalize .6 1|
        Color .8 6 Rotate .4 5""",
}


def auto_augment_policy(name: str, settings: OpSettings) -> list[list[AugmentOp]]:
    """The sub-policies of AutoAugment policy ``name`` (``original`` or ``v0``)."""
    policy = []
    for entry in _POLICIES[name].split("|"):
        words = entry.split()
        policy.append([AugmentOp(words[i], float(words[i + 1]), float(words[i + 2]), settings)
                       for i in range(0, len(words), 3)])
    return policy


# torchvision's TrivialAugmentWide: op -> (function, magnitudes over 31 bins or None, signed).
_TA_BINS = 31


def _ta_linspace(start, stop):
    """torch.linspace's float32 values (read back as Python floats, as torchvision does): a
    float32 step, each value rounded once to float32, the second half counted back from ``stop``."""
    start, stop = float(np.float32(start)), float(np.float32(stop))
    step = float(np.float32((stop - start) / (_TA_BINS - 1)))
    return [float(np.float32(start + step * i if i < _TA_BINS // 2 else stop - step * (_TA_BINS - 1 - i)))
            for i in range(_TA_BINS)]


TA_WIDE_OPS = {
    "Identity": (ops.identity, None, False),
    "ShearX": (ops.tv_shear_x, _ta_linspace(0.0, 0.99), True),
    "ShearY": (ops.tv_shear_y, _ta_linspace(0.0, 0.99), True),
    "TranslateX": (ops.tv_translate_x, _ta_linspace(0.0, 32.0), True),
    "TranslateY": (ops.tv_translate_y, _ta_linspace(0.0, 32.0), True),
    "Rotate": (ops.rotate, _ta_linspace(0.0, 135.0), True),
    "Brightness": (lambda img, m, *_: ops.brightness(img, 1.0 + m), _ta_linspace(0.0, 0.99), True),
    "Color": (lambda img, m, *_: ops.color(img, 1.0 + m), _ta_linspace(0.0, 0.99), True),
    "Contrast": (lambda img, m, *_: ops.contrast(img, 1.0 + m), _ta_linspace(0.0, 0.99), True),
    "Sharpness": (lambda img, m, *_: ops.sharpness(img, 1.0 + m), _ta_linspace(0.0, 0.99), True),
    "Posterize": (lambda img, m, *_: ops.posterize(img, int(m)),
                  [float(8 - round(k / ((_TA_BINS - 1) / 6))) for k in range(_TA_BINS)], False),
    "Solarize": (ops.solarize, _ta_linspace(255.0, 0.0), False),
    "AutoContrast": (ops.auto_contrast, None, False),
    "Equalize": (ops.equalize, None, False),
}


class TrivialAugmentWide:
    """torchvision's TrivialAugmentWide (Müller and Hutter 2021): one op drawn uniformly, one of
    its 31 magnitudes drawn uniformly, negated with probability 1/2 where signed; uncovered pixels
    black, resampling with ``interpolation`` (torchvision's reference trainer passes its training
    interpolation; the class's own default is nearest)."""

    def __init__(self, interpolation: int = Image.NEAREST):
        self.interpolation = interpolation
        self.names = list(TA_WIDE_OPS)

    def draw(self, rng) -> tuple[str, float]:
        """(op name, signed magnitude)."""
        name = self.names[rng.integers(len(self.names))]
        _, magnitudes, signed = TA_WIDE_OPS[name]
        magnitude = magnitudes[rng.integers(len(magnitudes))] if magnitudes else 0.0
        return name, -magnitude if signed and rng.integers(2) else magnitude

    def apply(self, img, name: str, magnitude: float):
        """Op ``name`` at ``magnitude`` on ``img``."""
        fill = 0 if img.mode == "L" else (0,) * len(img.getbands())
        return TA_WIDE_OPS[name][0](img, magnitude, self.interpolation, fill)

    def __call__(self, img, rng):
        return self.apply(img, *self.draw(rng))


def _sections(spec: str, kind: str, keys: tuple[str, ...]) -> dict[str, str]:
    """``{key: value}`` of ``spec``'s dash-separated sections after the first, each a key of
    ``keys`` followed by its number (timm's grammar). ValueError naming the section otherwise."""
    out = {}
    for section in spec.split("-")[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if not match or match[1] not in keys:
            raise ValueError(f"--aa {spec}: unknown {kind} section {section!r} (known: "
                             f"{', '.join(k + 'N' for k in keys)})")
        out[match[1]] = match[2]
    return out


def _number(spec, key, value, kind=float):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"--aa {spec}: {key}{value} is not {'an integer' if kind is int else 'a number'}") from None


AA_FORMS = "rand-m9-mstd0.5 (RandAugment), augmix-m5-w4-d2, original, v0 (AutoAugment), ta_wide"


def auto_augment(spec: str, settings: OpSettings):
    """The policy ``spec`` names, in timm's ``--aa`` grammar: ``rand-mM-nN-pP-mstdS-mmaxX-incI``,
    ``augmix-mM-wW-dD-aA-mstdS``, ``original[-mstdS]``, ``v0[-mstdS]``, or ``ta_wide``
    (torchvision's). ``settings`` gives the fill, translation range and filters; the spec's
    noise and cap replace its own. Called with ``rng`` on a PIL image. ValueError naming the fault."""
    kind = spec.split("-")[0]
    if kind == "ta_wide" and spec == kind:
        return TrivialAugmentWide(settings.interpolations[0])
    if kind == "rand":
        p = _sections(spec, "RandAugment", ("m", "n", "p", "mstd", "mmax", "inc"))
        std = _number(spec, "mstd", p.get("mstd", "0"))
        # Magnitudes above the cap are clamped to it when drawn, as timm does (rand-m99 is rand-m10);
        # mmax0 is timm's default cap of 10, not a cap at 0.
        settings = dataclasses.replace(settings, magnitude_std=math.inf if std > 100 else std,
                                       magnitude_max=_number(spec, "mmax", p.get("mmax", "10"), int) or LEVEL_MAX)
        names = RAND_OPS
        if _number(spec, "inc", p.get("inc", "0"), int):
            names = tuple(RAND_INCREASING.get(n, n) for n in names)
        m, prob = _number(spec, "m", p.get("m", "10"), int), _number(spec, "p", p.get("p", "0.5"))
        return RandAugment([AugmentOp(n, prob, m, settings) for n in names], _number(spec, "n", p.get("n", "2"), int))
    if kind == "augmix":
        p = _sections(spec, "AugMix", ("m", "w", "d", "a", "mstd"))
        settings = dataclasses.replace(settings, translate_pct=0.3,
                                       magnitude_std=_number(spec, "mstd", p.get("mstd", "inf")))
        m = _number(spec, "m", p.get("m", "3"), int)
        return AugMix([AugmentOp(n, 1.0, m, settings) for n in AUGMIX_OPS], _number(spec, "a", p.get("a", "1")),
                      _number(spec, "w", p.get("w", "3"), int), _number(spec, "d", p.get("d", "-1"), int))
    if kind in _POLICIES:
        p = _sections(spec, "AutoAugment", ("mstd",))
        settings = dataclasses.replace(settings, magnitude_std=_number(spec, "mstd", p.get("mstd", "0")))
        return AutoAugment(auto_augment_policy(kind, settings))
    raise ValueError(f"--aa {spec}: unknown policy {kind!r}; one of {AA_FORMS}")

"""PretrainedCfg: where a set of weights lives and how its images are prepared, in timm's terms.

The preprocessing belongs to the weights, not to the architecture: timm evaluates torchvision's
densenet121 weights bicubic with crop_pct 0.875 where torchvision's own protocol resizes to 256
bilinear. The tags that carry one are in :mod:`densenet_jax.model.registry`.
"""

from __future__ import annotations

import dataclasses
import json
import math

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("center", "xrv")


@dataclasses.dataclass(frozen=True)
class Top1:
    """A published ImageNet-1k validation top-1 (percent) and the protocol that produced it."""
    value: float
    protocol: str


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """Where a set of weights lives and how its inputs are prepared; timm's field names and defaults.

    hf_hub_id: the Hub repo (its weights in ``model.safetensors``, or in ``hf_hub_filename`` when
    that is set, as timm reads it); file: a local weights file used instead (timm's
    ``pretrained_cfg_overlay=dict(file=...)``).
    input_size / test_input_size: (channels, height, width); the test size is the larger one timm
    also evaluates at. interpolation: "bicubic" or "bilinear" (PIL's, antialiased). crop_pct: the
    centre crop's share of the resized image (resize to floor(size / crop_pct), then crop size).
    mean, std: per channel, on the [0, 1] scale. top1: published results, percent.
    crop_mode: "center" (timm's: resize, then the centre crop) or "xrv" (torchxrayvision's: the
    grey image normalised by mean/std first, then its largest central square (XRayCenterCrop),
    resized to input_size by scikit-image's antialiased bilinear resize (XRayResizer); crop_pct
    and interpolation unused). op_threshs: per-output operating points (torchxrayvision's, NaN
    where an output has none); when set, predictions are sigmoid then ``op_norm`` (see
    :func:`densenet_jax.inference.op_norm`).
    """

    architecture: str | None = None
    tag: str | None = None
    hf_hub_id: str | None = None
    hf_hub_filename: str | None = None
    file: str | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    test_input_size: tuple[int, int, int] | None = None
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    test_crop_pct: float | None = None
    crop_mode: str = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    license: str | None = None
    top1: tuple[Top1, ...] = ()
    op_threshs: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.op_threshs is not None:  # JSON keeps NaN as null
            threshs = tuple(math.nan if t is None else float(t) for t in self.op_threshs)
            object.__setattr__(self, "op_threshs", threshs)
        for name in ("input_size", "test_input_size", "mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "top1", tuple(t if isinstance(t, Top1) else Top1(**t) for t in self.top1))
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r}: one of {', '.join(CROP_MODES)}")
        if self.crop_mode == "xrv" and self.input_size[0] != 1:
            raise ValueError(f"crop_mode 'xrv' takes grey images: input_size {self.input_size} has "
                             f"{self.input_size[0]} channels")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ValueError(f"mean {self.mean} and std {self.std} need {self.input_size[0]} values each")

    @property
    def in_chans(self) -> int:
        """Channels of the input images."""
        return self.input_size[0]

    def eval_config(self, use_test_size: bool = False) -> dict:
        """The eval preprocessing, as timm's ``resolve_data_config`` resolves it: input_size,
        interpolation, crop_pct, crop_mode, mean, std (the test size and crop with ``use_test_size``
        where the weights have one)."""
        test = use_test_size and self.test_input_size is not None
        return {"input_size": self.test_input_size if test else self.input_size,
                "interpolation": self.interpolation,
                "crop_pct": (self.test_crop_pct or self.crop_pct) if test else self.crop_pct,
                "crop_mode": self.crop_mode, "mean": self.mean, "std": self.std}

    def with_in_chans(self, in_chans: int) -> PretrainedCfg:
        """The same preprocessing for ``in_chans``-channel images, matching how
        :func:`adapt_input_conv` adapts the first convolution: one channel takes
        the average mean and std (its kernel is the sum over RGB); C channels repeat RGB's in turn."""
        if in_chans == self.in_chans:
            return self
        if in_chans == 1:
            mean, std = (sum(self.mean) / len(self.mean),), (sum(self.std) / len(self.std),)
        else:
            mean = tuple(self.mean[i % len(self.mean)] for i in range(in_chans))
            std = tuple(self.std[i % len(self.std)] for i in range(in_chans))
        sizes = {k: (in_chans, *getattr(self, k)[1:]) for k in ("input_size", "test_input_size")
                 if getattr(self, k) is not None}
        return dataclasses.replace(self, mean=mean, std=std, **sizes)

    def to_json(self) -> str:
        """The cfg as stored in a weights file's metadata (strict JSON: a NaN threshold as null)."""
        values = dataclasses.asdict(self)
        if self.op_threshs is not None:
            values["op_threshs"] = [None if math.isnan(t) else t for t in self.op_threshs]
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> PretrainedCfg:
        """A cfg from timm's ``pretrained_cfg`` dict (or ours); fields timm has and we do not use
        (first_conv, pool_size, ...) are ignored. ValueError for invalid values."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def resize_size(size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop: timm's floor(size / crop_pct), the quotient rounded
    to 6 decimals first so that a crop_pct stored as size / resize gives back resize exactly."""
    return math.floor(round(size / crop_pct, 6))


def torchvision_cfg(resize: int = 256, crop: int = 224, in_chans: int = 3) -> PretrainedCfg:
    """torchvision's ImageNet eval preprocessing as a cfg: shorter side to ``resize`` pixels
    (bilinear, antialiased), centre crop ``crop`` x ``crop``, ImageNet mean/std (``in_chans=1``:
    greyscale, with their averages)."""
    return PretrainedCfg(input_size=(3, crop, crop), interpolation="bilinear",
                         crop_pct=crop / resize).with_in_chans(in_chans)


# torchxrayvision's xrv.utils.normalize(img, 255): (2 * x / 255 - 1) * 1024, which is
# (x / 255 - 0.5) / (1 / 2048); both steps are exact in float32 (powers of two), so the same numbers.
XRV_MEAN, XRV_STD = (0.5,), (1 / 2048,)


def xrv_cfg(size: int = 224, num_classes: int = 18, op_threshs=None, tag: str | None = None) -> PretrainedCfg:
    """torchxrayvision's input pipeline as a cfg: an 8-bit grey image scaled to [-1024, 1024]
    (``xrv.datasets.normalize(img, 255)``), its central square (``XRayCenterCrop``) resized to
    ``size`` (``XRayResizer``); with ``op_threshs``, its operating points (NaN: none)."""
    return PretrainedCfg(tag=tag, input_size=(1, size, size), interpolation="bilinear",
                         crop_pct=1.0, crop_mode="xrv", mean=XRV_MEAN, std=XRV_STD, num_classes=num_classes,
                         op_threshs=op_threshs)

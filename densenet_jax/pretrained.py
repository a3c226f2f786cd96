"""Pretrained weights by name, as timm names them: ``densenet121.tv_in1k``, and their preprocessing.

Each tag carries a :class:`PretrainedCfg` with timm's field names: where the weights are (a Hub repo
and file), how its images must be prepared (input size, interpolation, crop_pct, mean/std), its
license, and its published ImageNet top-1 with the protocol that produced it. The preprocessing
belongs to the weights, not to the architecture: timm evaluates torchvision's densenet121 weights
bicubic with crop_pct 0.875 (74.750 top-1) where torchvision's own protocol gives 74.434.
"""

from __future__ import annotations

import dataclasses
import json
import math

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_HUB_PREFIX = "hf-hub:"


@dataclasses.dataclass(frozen=True)
class Top1:
    """A published ImageNet-1k validation top-1 (percent) and the protocol that produced it."""
    value: float
    protocol: str


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """Where a set of weights lives and how its inputs are prepared; timm's field names and defaults.

    hf_hub_id: the Hub repo (its weights in ``model.safetensors``); file: a local weights file
    used instead (timm's ``pretrained_cfg_overlay=dict(file=...)``).
    input_size / test_input_size: (channels, height, width); the test size is the larger one timm
    also evaluates at. interpolation: "bicubic" or "bilinear" (PIL's, antialiased). crop_pct: the
    centre crop's share of the resized image (resize to floor(size / crop_pct), then crop size).
    mean, std: per channel, on the [0, 1] scale. top1: published results, percent.
    """

    architecture: str | None = None
    tag: str | None = None
    hf_hub_id: str | None = None
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

    def __post_init__(self):
        for name in ("input_size", "test_input_size", "mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "top1", tuple(t if isinstance(t, Top1) else Top1(**t) for t in self.top1))
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.crop_mode != "center":
            raise ValueError(f"crop_mode {self.crop_mode!r}: only 'center' is supported")
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
        """The cfg as stored in a weights file's metadata."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

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


def _tag(architecture: str, tag: str, top1: tuple[Top1, ...], **fields) -> PretrainedCfg:
    return PretrainedCfg(architecture=architecture, tag=tag, hf_hub_id=f"timm/{architecture}.{tag}",
                         license="apache-2.0", top1=top1, **fields)


def _timm(value: float, size: int = 224, crop_pct: float = 0.875) -> Top1:
    return Top1(value, f"timm validate.py, {size}x{size}, bicubic, crop_pct {crop_pct}")


def _torchvision(value: float) -> Top1:
    return Top1(value, "torchvision, resize 256 bilinear, centre crop 224")


# timm's densenet.py default_cfgs (timm 1.0): every weight set timm publishes for DenseNet, in its
# order (the first tag of a name is its default). Top-1 from timm's results-imagenet.csv and
# torchvision's model documentation. The ra weights were trained by timm (RandAugment recipe).
_RA = dict(test_input_size=(3, 288, 288), test_crop_pct=0.95)
TAGS: dict[str, PretrainedCfg] = {cfg.architecture + "." + cfg.tag: cfg for cfg in (
    _tag("densenet121", "ra_in1k", (_timm(75.574), _timm(76.486, 288, 0.95)), **_RA),
    _tag("densenetblur121d", "ra_in1k", (_timm(76.574), _timm(77.320, 288, 0.95)), **_RA),
    _tag("densenet121", "tv_in1k", (_timm(74.750), _torchvision(74.434))),
    _tag("densenet169", "tv_in1k", (_timm(75.922), _torchvision(75.600))),
    _tag("densenet201", "tv_in1k", (_timm(77.284), _torchvision(76.896))),
    _tag("densenet161", "tv_in1k", (_timm(77.384), _torchvision(77.138))),
)}


def default_tag(architecture: str) -> str | None:
    """timm's default tag for ``architecture`` (its first), or None when none is published."""
    return next((cfg.tag for cfg in TAGS.values() if cfg.architecture == architecture), None)


def list_pretrained() -> list[str]:
    """Every pretrained tag, ``name.tag``, in timm's order."""
    return list(TAGS)


def split_name(name: str) -> tuple[str, str | None]:
    """``"densenet121.tv_in1k"`` -> ``("densenet121", "tv_in1k")``; a bare name has tag None."""
    architecture, _, tag = name.partition(".")
    return architecture, tag or None


def resolve(name: str) -> PretrainedCfg:
    """The pretrained cfg of ``name`` (``name.tag``, or a bare name for its default tag).

    Raises ValueError naming the tag, and the tags that exist, when there is none.
    """
    architecture, tag = split_name(name)
    tag = tag or default_tag(architecture)
    if f"{architecture}.{tag}" in TAGS:
        return TAGS[f"{architecture}.{tag}"]
    known = [t for t in TAGS if t.startswith(architecture + ".")]
    if known:
        raise ValueError(f"unknown tag {name!r}; {architecture} has {', '.join(known)}")
    raise ValueError(f"no pretrained weights for {name!r}; pretrained tags: {', '.join(TAGS)}")


def adapt_input_conv(in_chans: int, conv_weight):
    """A first convolution's kernel (O, 3, kH, kW) adapted to ``in_chans`` input channels, as
    timm's ``timm.models._manipulate.adapt_input_conv`` does: one channel sums the RGB kernels
    (a grey image seen as R = G = B); C channels repeat RGB's kernels in turn and scale them by 3/C
    (so that the response to a uniform image keeps its size). Computed in float32, returned in the
    kernel's dtype. ValueError for a kernel that does not take 3 channels.
    """
    import numpy as np

    weight = np.asarray(conv_weight)
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"adapt_input_conv: kernel of shape {weight.shape}, expected (O, 3, kH, kW)")
    if in_chans == 3:
        return weight
    w = weight.astype(np.float32)
    if in_chans == 1:
        w = w.sum(axis=1, keepdims=True)
    else:
        w = np.tile(w, (1, math.ceil(in_chans / 3), 1, 1))[:, :in_chans] * np.float32(3 / in_chans)
    return w.astype(weight.dtype)

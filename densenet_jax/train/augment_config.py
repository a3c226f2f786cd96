"""A run's augmentation, mixing and loss options (``--aa ... --bce-loss``): checked when the
config is made, turned into the data set's training transform, the batch mixer and the loss."""

from __future__ import annotations

import dataclasses

from densenet_jax.data import transforms as T
from densenet_jax.data.augment import (ERASE_MODES, TRAIN_INTERPOLATIONS, AugmentOptions,
                                       train_transform)
from densenet_jax.data.augment_policies import OpSettings, auto_augment
from densenet_jax.data.dataset import Dataset
from densenet_jax.data.datasets import STREAMED
from densenet_jax.data.mixup import MIX_MODES, Mixup, MixupOptions
from densenet_jax.train.losses import LossConfig, parse_pos_weight

AUGMENT_FIELDS = tuple(f.name for f in dataclasses.fields(AugmentOptions))
MIXUP_FIELDS = tuple(f.name for f in dataclasses.fields(MixupOptions))
RESIZED_CROP_OPTIONS = ("scale", "ratio", "train_interpolation")  # a random resized crop's


def augment_options(config) -> AugmentOptions:
    """The TrainConfig's augmentation fields (tuples as tuples, whatever a record held)."""
    values = {k: getattr(config, k) for k in AUGMENT_FIELDS}
    return AugmentOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def mixup_options(config) -> MixupOptions:
    """The TrainConfig's mixing fields."""
    values = {k: getattr(config, k) for k in MIXUP_FIELDS}
    return MixupOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def loss_config(config, data: Dataset) -> LossConfig:
    """The training loss the TrainConfig asks for on ``data``: multi-label when the data is, with
    ``--pos-weight`` resolved on the training split's targets; else smoothing (in the targets
    with mixup) and BCE as asked. ValueError naming the option for what the data cannot take."""
    if not data.multi_label:
        smoothing = 0.0 if mixup_options(config).active else config.smoothing
        return LossConfig(smoothing=smoothing, bce=config.bce_loss,
                          pos_weight=parse_pos_weight(config.pos_weight, None, data.class_names))
    mixing = [_flag(k) for k in ("mixup", "cutmix", "smoothing", "bce_loss") if getattr(config, k)]
    if mixing:
        raise ValueError(f"{mixing[0]} is for one-label data; {data.name} is multi-label (its loss is "
                         "a binary cross-entropy per label already)")
    return LossConfig(True, parse_pos_weight(config.pos_weight, data.train.labels, data.class_names))


def resized_crop(dataset: str) -> bool:
    """Whether ``dataset`` trains on a random resized crop: a folder's, hfds' and wds' images."""
    return dataset == "folder" or dataset.startswith(STREAMED)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_range(name, value, low, high, high_open=False):
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{_flag(name)} {value}: must be {low} to {high}{' (less than it)' if high_open else ''}")


def _check_pair(name, pair, high=None):
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (high is not None and pair[1] > high):
        raise ValueError(f"{_flag(name)} {' '.join(map(str, pair))}: two numbers, 0 < low <= high"
                         + (f" <= {high}" if high is not None else ""))


def check_augmentation(config) -> None:
    """ValueError in one line naming the flag: a value out of range, an unknown ``--aa`` policy,
    ``--remode``, ``--mixup-mode`` or ``--train-interpolation``, a crop option for a data set
    that crops its own way, flips for digits, an odd batch with mixing. Pairs given as lists (a
    command line's) become tuples."""
    for name in ("scale", "ratio", "cutmix_minmax"):
        if isinstance(getattr(config, name), list):
            setattr(config, name, tuple(getattr(config, name)))
    a, defaults = augment_options(config), AugmentOptions()
    if a.aa:
        auto_augment(a.aa, OpSettings())
    for name in ("color_jitter", "recount"):
        if getattr(a, name) < (1 if name == "recount" else 0):
            raise ValueError(f"{_flag(name)} {getattr(a, name)}: must be at least {1 if name == 'recount' else 0}")
    for name in ("reprob", "hflip", "vflip"):
        _check_range(name, getattr(a, name), 0, 1)
    T_choices = {"remode": ERASE_MODES, "train_interpolation": TRAIN_INTERPOLATIONS}
    for name, choices in T_choices.items():
        if getattr(a, name) not in choices:
            raise ValueError(f"{_flag(name)} {getattr(a, name)!r}: must be one of {', '.join(choices)}")
    _check_pair("scale", a.scale)
    _check_pair("ratio", a.ratio)
    for name in RESIZED_CROP_OPTIONS:
        if not resized_crop(config.dataset) and getattr(a, name) != getattr(defaults, name):
            raise ValueError(f"{_flag(name)} sets a folder's random resized crop; --dataset "
                             f"{config.dataset} crops its own way")
    if config.dataset == "digits" and (a.hflip, a.vflip) != (defaults.hflip, defaults.vflip):
        raise ValueError("--hflip/--vflip: --dataset digits is never flipped (a mirrored digit is "
                         "another symbol)")
    _check_mixup(mixup_options(config), config.batch_size)


def _check_mixup(m: MixupOptions, batch_size: int) -> None:
    for name in ("mixup", "cutmix"):
        if getattr(m, name) < 0:
            raise ValueError(f"{_flag(name)} {getattr(m, name)}: must be at least 0 (0: off)")
    for name in ("mixup_prob", "mixup_switch_prob"):
        _check_range(name, getattr(m, name), 0, 1)
    _check_range("smoothing", m.smoothing, 0, 1, high_open=True)
    if m.mixup_mode not in MIX_MODES:
        raise ValueError(f"--mixup-mode {m.mixup_mode!r}: must be one of {', '.join(MIX_MODES)}")
    if m.cutmix_minmax is not None:
        _check_pair("cutmix_minmax", m.cutmix_minmax, high=1)
        if m.cutmix_minmax[0] == m.cutmix_minmax[1]:
            raise ValueError(f"--cutmix-minmax {' '.join(map(str, m.cutmix_minmax))}: low must be "
                             "below high")
    if m.active and batch_size % 2:
        raise ValueError(f"--batch-size {batch_size}: mixup and CutMix pair element i with element "
                         "n-1-i, so the batch must be even")


def with_augmentation(data: Dataset, config) -> Dataset:
    """``data`` with the training transform the config's augmentation options ask for, the data
    set's own crop first (a folder's random resized crop, CIFAR's and digits' padded crops);
    ``data`` itself when every option is at its default."""
    a = augment_options(config)
    if a == AugmentOptions():
        return data
    steps = getattr(data.augment, "transforms", [])
    normalize = next(t for t in steps if isinstance(t, T.Normalize))
    if resized_crop(config.dataset):
        crop = T.RandomResizedCrop(data.image_size, a.scale, a.ratio, TRAIN_INTERPOLATIONS[a.train_interpolation])
    else:  # CIFAR's and digits' padded crops, a CSV data set's resize and centre crop
        crop = next(t for t in steps if isinstance(t, (T.PadCrop, T.ResizeCenterCrop)))
    augment = train_transform(a, crop, data.image_size, normalize, flips=config.dataset != "digits")
    return dataclasses.replace(data, augment=augment)


def batch_mixer(config, num_classes: int) -> Mixup | None:
    """The batch mixer the config asks for, or None."""
    m = mixup_options(config)
    return Mixup(m, num_classes) if m.active else None


def record(config) -> dict:
    """The augmentation, mixing and loss options that differ from their defaults (for run.json:
    a run made before they existed, or without them, records none)."""
    fields = AUGMENT_FIELDS + MIXUP_FIELDS + ("bce_loss",)
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name in fields}
    return {k: getattr(config, k) for k in fields if getattr(config, k) != defaults[k]}

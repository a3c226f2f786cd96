"""``densenet-jax train``'s augmentation, mixing and loss options, spelt as timm's ``train.py``
spells them (defaults: this project's; docs/training.md sets timm's beside them)."""

from __future__ import annotations

import argparse

from densenet_jax.data.augment import ERASE_MODES, TRAIN_INTERPOLATIONS
from densenet_jax.data.augment_policies import AA_FORMS
from densenet_jax.data.mixup import MIX_MODES


def add_augment_options(p: argparse.ArgumentParser, d) -> None:
    """The options, with ``d`` (a default TrainConfig) giving their defaults."""
    g = p.add_argument_group("augmentation (timm's names)")
    g.add_argument("--aa", default=d.aa, metavar="POLICY", help=f"automatic augmentation: {AA_FORMS}")
    g.add_argument("--color-jitter", type=float, default=d.color_jitter, metavar="X",
                   help="brightness, contrast and saturation jitter (0: none; unused with --aa, as timm)")
    g.add_argument("--reprob", type=float, default=d.reprob, help="random erasing probability")
    g.add_argument("--remode", default=d.remode, choices=ERASE_MODES,
                   help="random erasing fill: zeros, a normal colour per box, normal noise per pixel")
    g.add_argument("--recount", type=int, default=d.recount, help="random erasing: up to this many boxes")
    g.add_argument("--scale", type=float, nargs=2, default=d.scale, metavar=("LOW", "HIGH"),
                   help="folder: random resized crop's area range, fractions of the image")
    g.add_argument("--ratio", type=float, nargs=2, default=d.ratio, metavar=("LOW", "HIGH"),
                   help="folder: random resized crop's aspect ratio range")
    g.add_argument("--hflip", type=float, default=d.hflip, help="horizontal flip probability")
    g.add_argument("--vflip", type=float, default=d.vflip, help="vertical flip probability")
    g.add_argument("--train-interpolation", default=d.train_interpolation, choices=TRAIN_INTERPOLATIONS,
                   help="folder: the crop's and --aa's resampling (random: bilinear or bicubic each time)")
    g = p.add_argument_group("mixing and loss (timm's names)")
    g.add_argument("--mixup", type=float, default=d.mixup, metavar="ALPHA", help="mixup's Beta alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=d.cutmix, metavar="ALPHA", help="CutMix's Beta alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=d.cutmix_minmax, metavar=("LOW", "HIGH"),
                   help="CutMix box sides uniform in this range of the image's (turns CutMix on)")
    g.add_argument("--mixup-prob", type=float, default=d.mixup_prob, help="chance a batch (pair, element) is mixed")
    g.add_argument("--mixup-switch-prob", type=float, default=d.mixup_switch_prob,
                   help="chance of CutMix rather than mixup when both are on")
    g.add_argument("--mixup-mode", default=d.mixup_mode, choices=MIX_MODES,
                   help="one draw per batch, per pair or per element")
    g.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing")
    g.add_argument("--bce-loss", action="store_true", help="binary cross-entropy per class instead of softmax's")

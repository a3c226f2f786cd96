"""``--recipe NAME``: the published recipes behind DenseNet weights, as TrainConfig values.

Each preset fills the options it names; options given explicitly keep their value, and the run's
record (run.json) names the preset and every value it set. Sources:

- ``paper-cifar``: Huang et al., "Densely Connected Convolutional Networks", Sec. 4.2: SGD with
  Nesterov momentum 0.9 without dampening, weight decay 1e-4, batch 64, 300 epochs, lr 0.1 divided
  by 10 at 50% and 75% of training (this project's ``--schedule cifar``).
- ``paper-imagenet``: fb.resnet.torch's train.lua (LuaTorch), which trained the weights torchvision
  ported: SGD Nesterov 0.9, lr 0.1 divided by 10 every 30 epochs, 90 epochs, weight decay 1e-4 on
  every parameter, batch 256; its random-sized crop, colour jitter 0.4 and flips.
- ``timm-ra``: timm's README, EfficientNet-B2 RandAugment command (the closest published to the
  RA recipe of densenet121.ra_in1k): ``--sched step --decay-epochs 2.4 --decay-rate .97 --opt
  rmsproptf --opt-eps .001 --warmup-lr 1e-6 --weight-decay 1e-5 --model-ema --model-ema-decay
  0.9999 --aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --lr .016``, 2 GPUs x 128, 450 epochs;
  timm's train.py defaults for the rest (5 warm-up epochs, smoothing 0.1, no decay of norms and
  biases). EfficientNet's dropout and drop-path have no DenseNet counterpart here.
- ``tv-v2``: torchvision's "How to Train State-Of-The-Art Models Using TorchVision's Latest
  Primitives" (ResNet-50 command; never applied to DenseNet by torchvision): SGD momentum 0.9
  (no Nesterov), lr 0.5 for 1024 images (8 x 128), cosine over 600 epochs after 5 linear warm-up
  epochs from lr x 0.01, weight decay 2e-5 (none on norms), label smoothing 0.1, mixup 0.2, CutMix
  1.0, TrivialAugmentWide, random erasing 0.1, EMA (torchvision's 0.99998 per 32 steps, scaled by
  its batch and epochs, is about 0.99997 per step).
"""

from __future__ import annotations

import dataclasses

from densenet_jax.train.augment_config import RESIZED_CROP_OPTIONS, resized_crop

RECIPES: dict[str, dict] = {
    "paper-cifar": dict(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False,
                        schedule="cifar", epochs=300, batch_size=64),
    "paper-imagenet": dict(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False,
                           sched="step", decay_epochs=30, decay_rate=0.1, warmup_epochs=0, epochs=90,
                           batch_size=256, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), color_jitter=0.4, hflip=0.5),
    "timm-ra": dict(opt="rmsproptf", opt_eps=1e-3, lr=0.016, momentum=0.9, weight_decay=1e-5,
                    filter_bias_and_bn=True, sched="step", decay_epochs=2.4, decay_rate=0.97, warmup_lr=1e-6,
                    warmup_epochs=5, epochs=450, batch_size=256, model_ema=True, model_ema_decay=0.9999,
                    aa="rand-m9-mstd0.5", remode="pixel", reprob=0.2, recount=1, color_jitter=0.4,
                    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0, train_interpolation="random",
                    mixup=0.0, cutmix=0.0, smoothing=0.1, bce_loss=False),
    "tv-v2": dict(opt="momentum", lr=0.5, momentum=0.9, weight_decay=2e-5, filter_bias_and_bn=True,
                  sched="cosine", warmup_epochs=5, warmup_lr=0.005, min_lr=0.0, epochs=600, batch_size=1024,
                  model_ema=True, model_ema_decay=0.99997, aa="ta_wide", reprob=0.1, smoothing=0.1,
                  mixup=0.2, cutmix=1.0, hflip=0.5, train_interpolation="bilinear"),
}


def apply(config) -> None:
    """Fill ``config`` (a TrainConfig being built) from its ``recipe``: each preset value whose
    option this branch knows, for the fields left at their default (the command passes
    ``recipe_values`` itself, knowing which options were given, and those are taken as set).
    ValueError for an unknown recipe name."""
    if config.recipe is None:
        return
    if config.recipe not in RECIPES:
        raise ValueError(f"--recipe {config.recipe!r}: must be one of {', '.join(RECIPES)}")
    if config.recipe_values is not None:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    values = {k: v for k, v in fitting(config.recipe, config.dataset).items()
              if k in defaults and getattr(config, k) == defaults[k]}
    for k, v in values.items():
        setattr(config, k, v)
    config.recipe_values = values


def preset(name: str, given: set[str], fields: set[str], dataset: str = "folder") -> dict:
    """The values recipe ``name`` sets among ``fields`` for ``dataset``, less the options in
    ``given``."""
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r}: must be one of {', '.join(RECIPES)}")
    return {k: v for k, v in fitting(name, dataset).items() if k in fields and k not in given}


def fitting(name: str, dataset: str) -> dict:
    """Recipe ``name``'s values that ``dataset`` can take: data sets that crop their own way
    (CIFAR's and digits' padded crops, a CSV's centre crop) keep their crop under any recipe, and
    digits are never flipped."""
    left_out = RESIZED_CROP_OPTIONS * (not resized_crop(dataset)) + ("hflip", "vflip") * (dataset == "digits")
    return {k: v for k, v in RECIPES[name].items() if k not in left_out}

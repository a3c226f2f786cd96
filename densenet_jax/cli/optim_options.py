"""``densenet-jax train``'s options spelt as timm's train.py spells them (optimizer, clipping,
accumulation, schedules, lr by batch size, EMA), ``--recipe``, and which options a command gave."""

from __future__ import annotations

import argparse

from densenet_jax.train import recipes
from densenet_jax.train.optimizers import CLIP_MODES, OPTIMIZERS
from densenet_jax.train.schedules import LR_BASE_SCALES, TIMM_SCHEDULES


class Default:
    """An option's default, told apart from the same value given on the command line (a recipe
    fills only the options not given)."""

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return str(self.value)


def add_optim_options(p: argparse.ArgumentParser, d) -> None:
    """timm's optimizer, schedule, EMA and lr-scaling options and ``--recipe``; ``d``: the
    TrainConfig of defaults."""
    g = p.add_argument_group("timm's optimizer, schedule and EMA options (timm's train.py spelling)")
    g.add_argument("--recipe", default=None, choices=list(recipes.RECIPES),
                   help="a published recipe's options (docs/training.md); options given override it")
    g.add_argument("--opt", default=d.opt, choices=OPTIMIZERS, help="optimizer, as timm's create_optimizer_v2")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")
    g.add_argument("--opt-betas", type=float, nargs=2, default=None, help="optimizer betas (default: the optimizer's)")
    g.add_argument("--filter-bias-and-bn", action="store_true",
                   help="no weight decay on norms and biases (timm's default; the paper decays every parameter)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this (off by default)")
    g.add_argument("--clip-mode", default=d.clip_mode, choices=CLIP_MODES, help="how --clip-grad clips")
    g.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps,
                   help="batches whose gradients are averaged into each update")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (timm's)")
    g.add_argument("--sched", default=None, choices=TIMM_SCHEDULES,
                   help="a timm schedule, updated every optimizer update (instead of --schedule)")
    g.add_argument("--decay-epochs", type=float, default=d.decay_epochs, help="step: epochs between decays")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=d.decay_milestones,
                   help="multistep: epochs to decay at")
    g.add_argument("--decay-rate", type=float, default=d.decay_rate, help="step, multistep: lr factor per decay")
    g.add_argument("--warmup-lr", type=float, default=d.warmup_lr, help="--sched: lr the warm-up starts at")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="cosine: lr it decays to")
    g.add_argument("--cooldown-epochs", type=int, default=d.cooldown_epochs, help="cosine: epochs at --min-lr after")
    g.add_argument("--patience-epochs", type=int, default=d.patience_epochs,
                   help="plateau: epochs without a gain in held-out accuracy before the lr decays")
    g.add_argument("--lr-base", type=float, default=None,
                   help="without --lr: lr = this x (batch x accumulation / --lr-base-size), as timm")
    g.add_argument("--lr-base-size", type=int, default=d.lr_base_size, help="the batch --lr-base is for")
    g.add_argument("--lr-base-scale", default=None, choices=LR_BASE_SCALES,
                   help="linear, or sqrt (default: sqrt for adaptive optimizers, as timm)")
    g.add_argument("--model-ema", action="store_true", help="keep timm's ModelEmaV3 average of the weights")
    g.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay, help="its decay per update")
    g.add_argument("--model-ema-warmup", action="store_true", help="warm its decay up (timm's)")
    g.add_argument("--best-from", default=d.best_from, choices=("model", "ema"),
                   help="best.safetensors: the epoch of best held-out accuracy of the model or of its average")


def mark_defaults(p: argparse.ArgumentParser, fields) -> None:
    """Wrap the defaults of ``fields``' options in :class:`Default`, so that :func:`given` tells
    the options a command gave."""
    for action in p._actions:
        if action.dest in fields and action.default not in (None, argparse.SUPPRESS):
            action.default = Default(action.default)


def config_values(args: argparse.Namespace, fields) -> dict:
    """The TrainConfig values of parsed options: the ones given, a ``--recipe``'s for the others
    (with ``recipe_values`` naming them), then the defaults."""
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    given = {k for k, v in values.items() if not isinstance(v, Default)}
    values = {k: v.value if isinstance(v, Default) else v for k, v in values.items()}
    for k in ("opt_betas", "decay_milestones"):
        if isinstance(values.get(k), list):
            values[k] = tuple(values[k])
    if values.get("recipe"):
        preset = recipes.preset(values["recipe"], given, set(fields), values.get("dataset", "digits"))
        values.update(preset, recipe_values=preset)
    return values

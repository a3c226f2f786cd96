"""The paper's optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4), its schedules, and the
optimizer a run's options describe.

The learning rate is not compiled into the step: the loop evaluates the schedule on the host and
passes each step's rate to the compiled train step as an argument, which sets it in the optimizer's
state (:func:`densenet_jax.train.optimizers.set_learning_rate`), so that one compiled step serves
every ``--lr``, ``--epochs`` and ``--schedule``: a schedule baked into the step would cost a
recompilation for each new value.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import optax

from densenet_jax.train import schedules
from densenet_jax.train.optimizers import create_optimizer

Schedule = Literal["cifar", "imagenet", "cosine", "constant"]
# Schedules with a linear warm-up (the others would ignore --warmup-epochs).
WARMUP_SCHEDULES = ("cosine",)


def learning_rate(kind: Schedule, base_lr: float, total_steps: int, steps_per_epoch: int,
                  warmup_epochs: float = 0.0) -> Callable[[int], float]:
    """The rate for the step that follows ``step`` completed ones, as a Python float.

    ``cifar``: lr/10 at 50% and 75% of training; ``imagenet``: lr/10 at epochs 30 and 60 (of 90,
    scaled to the run's length); ``cosine``: linear warm-up from 0 then cosine decay to 0 (optax's
    ``warmup_cosine_decay_schedule``); ``constant``. Raises ValueError for another ``kind``.
    """
    if kind in ("cifar", "imagenet"):
        fractions = (0.5, 0.75) if kind == "cifar" else (30 / 90, 60 / 90)
        boundaries = [int(total_steps * f) for f in fractions]

        def piecewise(step: int) -> float:
            rate = base_lr
            for boundary in boundaries:  # one multiply per boundary passed, as optax's piecewise schedule
                rate = rate * 0.1 if step >= boundary else rate
            return rate
        return piecewise
    if kind == "cosine":
        warmup = int(warmup_epochs * steps_per_epoch)
        decay = max(total_steps, warmup + 1) - warmup

        def cosine(step: int) -> float:
            if step < warmup:
                return base_lr * step / warmup
            return base_lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
        return cosine
    if kind == "constant":
        return lambda step: base_lr
    raise ValueError(f"unknown schedule {kind!r}: cifar, imagenet, cosine or constant")


def sgd(momentum: float = 0.9, weight_decay: float = 1e-4,
        nesterov: bool = True) -> optax.GradientTransformation:
    """torch.optim.SGD: decay added to every gradient, then (Nesterov) momentum, at the rate the
    step sets (:func:`densenet_jax.train.optimizers.set_learning_rate`)."""
    return create_optimizer({}, "nesterov" if nesterov else "momentum", lr=0.0, weight_decay=weight_decay,
                            momentum=momentum, filter_bias_and_bn=False)


def from_config(config, params) -> optax.GradientTransformation:
    """The optimizer of a TrainConfig's options, for ``params`` (its rate set by each step)."""
    tx = create_optimizer(params, config.opt, lr=0.0, weight_decay=config.weight_decay, momentum=config.momentum,
                          filter_bias_and_bn=config.filter_bias_and_bn, eps=config.opt_eps,
                          betas=config.opt_betas, clip_grad=config.clip_grad, clip_mode=config.clip_mode,
                          layer_decay=config.layer_decay)
    tx = head_only(tx) if config.head_only else tx
    if config.grad_accum_steps > 1:  # outside head_only's split: one accumulation for every parameter
        dtype = jax.tree.leaves(params)[0].dtype
        tx = optax.MultiSteps(tx, config.grad_accum_steps, accumulator_dtype=dtype).gradient_transformation()
    return tx


def run_epochs(config) -> int:
    """The epochs a run trains: ``--epochs``, and timm's cosine cool-down at ``--min-lr`` after them."""
    return config.epochs + (config.cooldown_epochs if config.sched == "cosine" else 0)


def schedule_of(config, steps_per_epoch: int,
                accuracies: Callable[[], list[float]] = list) -> Callable[[int], float]:
    """The rate for each step of a run: its timm ``--sched`` or its ``--schedule``, counted in
    optimizer updates (every ``--grad-accum-steps`` steps); ``plateau`` reads the held-out
    accuracy of each epoch evaluated so far from ``accuracies()``."""
    if config.sched == "plateau":
        def plateau(step: int) -> float:
            rates = schedules.plateau_rates(
                config.lr, accuracies()[:step // steps_per_epoch], decay_rate=config.decay_rate,
                patience=config.patience_epochs, warmup_lr=config.warmup_lr,
                warmup_epochs=config.warmup_epochs, min_lr=config.min_lr)
            return rates[-1]
        return plateau
    k = config.grad_accum_steps
    updates_per_epoch = steps_per_epoch // k
    if config.sched is None:
        rate = learning_rate(config.schedule, config.lr, run_epochs(config) * updates_per_epoch,
                             updates_per_epoch, config.warmup_epochs)
    else:
        rate = schedules.timm_schedule(
            config.sched, config.lr, updates_per_epoch, epochs=config.epochs, decay_epochs=config.decay_epochs,
            decay_rate=config.decay_rate, decay_milestones=config.decay_milestones, warmup_lr=config.warmup_lr,
            warmup_epochs=config.warmup_epochs, min_lr=config.min_lr)
    return lambda step: rate(step // k)


def head_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for the classifier; every other parameter frozen (linear probing)."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if getattr(path[0], "key", None) == "classifier" else "frozen", params)
    return optax.multi_transform({"head": tx, "frozen": optax.set_to_zero()}, labels)

"""The paper's optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4) and its schedules."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

Schedule = Literal["cifar", "imagenet", "cosine", "constant"]


def learning_rate(kind: Schedule, base_lr: float, total_steps: int, steps_per_epoch: int,
                  warmup_epochs: float = 0.0) -> optax.Schedule:
    """``cifar``: lr/10 at 50% and 75% of training; ``imagenet``: lr/10 at epochs 30 and 60 (of 90,
    scaled to the run's length); ``cosine``: linear warm-up then cosine decay to 0.

    The schedule takes the step count (optax's int32) and gives the rate in JAX's default float
    dtype: float64 under ``jax_enable_x64``, so that an fp64 reference run has an fp64 rate."""
    schedule = _schedule(kind, base_lr, total_steps, steps_per_epoch, warmup_epochs)
    # optax's warm-up divides the int32 count, which gives float32 even under jax_enable_x64.
    return lambda count: schedule(jnp.asarray(count, float))


def _schedule(kind, base_lr, total_steps, steps_per_epoch, warmup_epochs) -> optax.Schedule:
    if kind == "cifar":
        return optax.piecewise_constant_schedule(
            base_lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1})
    if kind == "imagenet":
        return optax.piecewise_constant_schedule(
            base_lr, {int(total_steps * 30 / 90): 0.1, int(total_steps * 60 / 90): 0.1})
    if kind == "cosine":
        warmup = int(warmup_epochs * steps_per_epoch)
        return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup, max(total_steps, warmup + 1))
    if kind == "constant":
        return optax.constant_schedule(base_lr)
    raise ValueError(f"unknown schedule {kind!r}: cifar, imagenet, cosine or constant")


def sgd(schedule: optax.Schedule, momentum: float = 0.9, weight_decay: float = 1e-4,
        nesterov: bool = True) -> optax.GradientTransformation:
    """torch.optim.SGD's update: decay added to the gradient, then (Nesterov) momentum."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum, nesterov=nesterov))


def head_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for the classifier; every other parameter frozen (linear probing)."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if getattr(path[0], "key", None) == "classifier" else "frozen", params)
    return optax.multi_transform({"head": tx, "frozen": optax.set_to_zero()}, labels)

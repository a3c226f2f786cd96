"""The paper's optimizer (SGD, Nesterov momentum 0.9, weight decay 1e-4) and its schedules.

The learning rate is not part of the optimizer: the loop evaluates the schedule on the host and
passes each step's rate to the compiled train step as an argument (:func:`apply_learning_rate`), so
that one compiled step serves every ``--lr``, ``--epochs`` and ``--schedule``: a schedule baked
into the step would cost a recompilation for each new value.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import optax

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
    """torch.optim.SGD's update direction: decay added to the gradient, then (Nesterov) momentum;
    :func:`apply_learning_rate` scales it (optax.sgd is this chain followed by that scaling)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.trace(decay=momentum, nesterov=nesterov))


def apply_learning_rate(params, updates, lr: jax.Array):
    """``params - lr * updates``, the rate cast to each update's dtype as optax.sgd casts it."""
    return optax.apply_updates(params, jax.tree.map(lambda u: (-lr).astype(u.dtype) * u, updates))


def head_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for the classifier; every other parameter frozen (linear probing)."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if getattr(path[0], "key", None) == "classifier" else "frozen", params)
    return optax.multi_transform({"head": tx, "frozen": optax.set_to_zero()}, labels)

"""timm's learning-rate schedules, updated per optimizer update, and timm's rate for a batch size.

``--sched step|multistep|cosine`` gives, for every update, the rate that timm's
``create_scheduler_v2(..., step_on_epochs=False, updates_per_epoch=N)`` sets when driven as timm's
train.py drives it (``step_update`` after each update): epochs count as ``N`` updates each, the
warm-up goes linearly from ``--warmup-lr`` over ``--warmup-epochs`` without shifting the schedule
after it (timm's ``warmup_prefix=False``), and cosine's ``--cooldown-epochs`` at ``--min-lr`` are
added to the run. ``plateau`` is timm's per-epoch PlateauLRScheduler on the held-out accuracy,
replayed from the epochs' metrics (so that it resumes, which timm's does not). Like the project's
own schedules (:mod:`densenet_jax.train.optim`), a schedule
is a function of the update on the host; the step receives its value.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

TIMM_SCHEDULES = ("step", "multistep", "cosine", "plateau")
LR_BASE_SCALES = ("linear", "sqrt")
# A rate this many times above or below the batch-scaled one draws a warning.
FAR = 10.0


def timm_schedule(sched: str, lr: float, updates_per_epoch: int, *, epochs: int, decay_epochs: float = 90,
                  decay_rate: float = 0.1, decay_milestones=(90, 180, 270), warmup_lr: float = 1e-5,
                  warmup_epochs: float = 0, min_lr: float = 0.0) -> Callable[[int], float]:
    """The rate for update ``u`` (0: before any update) of timm's ``sched`` at peak ``lr``.

    ``step``: ``lr * decay_rate ** (t // decay_epochs)``; ``multistep``: one ``decay_rate`` factor
    per milestone passed; ``cosine``: from ``lr`` to ``min_lr`` over ``epochs``, ``min_lr`` after
    (timm's StepLRScheduler, MultiStepLRScheduler, CosineLRScheduler, with t counted in updates).
    ValueError for another ``sched``.
    """
    n = updates_per_epoch
    warmup_t = warmup_epochs * n
    slope = (lr - warmup_lr) / warmup_t if warmup_t else 0.0
    if sched == "step":
        decay_t = decay_epochs * n
        after = lambda t: lr * decay_rate ** (t // decay_t)  # noqa: E731
    elif sched == "multistep":
        milestones = [m * n for m in decay_milestones]
        # timm counts a milestone as passed one update early (bisect_right at t + 1).
        after = lambda t: lr * decay_rate ** bisect.bisect_right(milestones, t + 1)  # noqa: E731
    elif sched == "cosine":
        total = epochs * n
        after = lambda t: (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))  # noqa: E731
                           if t < total else min_lr)
    else:
        raise ValueError(f"--sched {sched!r}: must be one of {', '.join(TIMM_SCHEDULES)}")

    def rate(u: int) -> float:
        if u < warmup_t:
            return warmup_lr + u * slope
        return after(u) if u else lr  # before the first update: the optimizer's own rate
    return rate


def plateau_rates(lr: float, accuracies: list[float], *, decay_rate: float = 0.1, patience: int = 10,
                  warmup_lr: float = 1e-5, warmup_epochs: float = 0, min_lr: float = 0.0,
                  threshold: float = 1e-4) -> list[float]:
    """The rate of each epoch after ``accuracies`` (the held-out accuracy of each epoch so far):
    timm's PlateauLRScheduler in ``max`` mode, stepped after each epoch as timm's train.py steps it
    (linear warm-up over ``warmup_epochs``, then torch's ReduceLROnPlateau: ``decay_rate`` times,
    not below ``min_lr``, after more than ``patience`` epochs without a relative gain of
    ``threshold``). One rate more than ``accuracies``: the first is the rate before any epoch."""
    current = warmup_lr if warmup_epochs else lr
    rates, best, bad = [current], -math.inf, 0
    for epoch, accuracy in enumerate(accuracies, start=1):
        if epoch <= warmup_epochs:
            current = warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
        else:
            best, bad = (accuracy, 0) if accuracy > best * (1 + threshold) else (best, bad + 1)
            if bad > patience:
                lower = max(current * decay_rate, min_lr)
                current, bad = (lower if current - lower > 1e-8 else current), 0  # torch's eps
        rates.append(current)
    return rates


def scaled_lr(lr_base: float, lr_base_size: int, global_batch: int, scale: str | None, opt: str) -> float:
    """timm's rate for ``global_batch`` (the batch times accumulation steps): ``lr_base`` times
    ``global_batch / lr_base_size``, or its square root (``scale`` sqrt; None: sqrt for adaptive
    optimizers, as timm picks for names with 'ada' or 'lamb', else linear)."""
    if scale is None:
        scale = "sqrt" if any(o in opt.lower() for o in ("ada", "lamb")) else "linear"
    ratio = global_batch / lr_base_size
    return lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


def far_from_scaled(lr: float, lr_base: float, lr_base_size: int, global_batch: int, scale: str | None,
                    opt: str) -> str | None:
    """A warning when ``lr`` is more than ``FAR`` times above or below timm's scaled rate for the
    batch (a batch of 1 at lr 0.1 trains at chance), else None."""
    expected = scaled_lr(lr_base, lr_base_size, global_batch, scale, opt)
    if expected / FAR <= lr <= expected * FAR:
        return None
    return (f"warning: --lr {lr:g} is {max(lr / expected, expected / lr):.0f}x "
            f"{'above' if lr > expected else 'below'} {expected:.3g}, timm's rate for a batch of {global_batch} "
            f"(--lr-base {lr_base:g} per {lr_base_size} images); give --lr, or --lr-base without --lr, to set it")

"""The training loss: one function from (logits, targets, config) to the batch's mean loss.

Targets are integer labels (n,) or soft targets (n, classes) (mixup's, already smoothed); the
config says whether to smooth integer labels and whether to use binary cross-entropy. The rules
are timm's ``train.py``: soft targets take SoftTargetCrossEntropy (or BinaryCrossEntropy with
``--bce-loss``); integer labels LabelSmoothingCrossEntropy when ``--smoothing`` is given (or
BinaryCrossEntropy with smoothed one-hot targets), else plain cross-entropy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``smoothing``: label smoothing of integer labels (0-1); ``bce``: binary cross-entropy per
    class (mean over batch and classes) instead of softmax cross-entropy."""

    smoothing: float = 0.0
    bce: bool = False


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float, dtype) -> jax.Array:
    """(n, num_classes): 1 - smoothing + smoothing / num_classes on the label, smoothing /
    num_classes elsewhere."""
    off = smoothing / num_classes
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), 1.0 - smoothing + off, off).astype(dtype)


def loss(logits: jax.Array, targets: jax.Array, config: LossConfig = LossConfig()) -> jax.Array:
    """The mean loss of ``logits`` (n, classes) against ``targets``: int (n,) labels or float
    (n, classes) soft targets. A scalar of the logits' dtype."""
    soft = jnp.issubdtype(targets.dtype, jnp.floating)
    if config.bce:
        if not soft:
            targets = smoothed_one_hot(targets, logits.shape[-1], config.smoothing, logits.dtype)
        return optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype)).mean()
    if soft:
        return optax.softmax_cross_entropy(logits, targets.astype(logits.dtype)).mean()
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if not config.smoothing:
        return nll.mean()
    # timm's LabelSmoothingCrossEntropy: the true class's loss and the mean over all classes.
    uniform = -jax.nn.log_softmax(logits).mean(-1)
    return ((1.0 - config.smoothing) * nll + config.smoothing * uniform).mean()


def hard_labels(targets: jax.Array) -> jax.Array:
    """Integer labels for accuracy: ``targets`` itself, or a soft target's largest class."""
    return jnp.argmax(targets, -1) if jnp.issubdtype(targets.dtype, jnp.floating) else targets

"""The training loss and what counts as a correct prediction, for one-label and multi-label data.

One-label targets are class indices (int32, shape (N,)) or soft targets (float32 (N, C): mixup's
and CutMix's, already smoothed). The rules are timm's ``train.py``: soft targets take
SoftTargetCrossEntropy (or BinaryCrossEntropy with ``--bce-loss``); class indices take
LabelSmoothingCrossEntropy when ``--smoothing`` is given (or BinaryCrossEntropy with smoothed
one-hot targets), else plain cross-entropy. Held-out data is scored with plain cross-entropy, as
timm's validation is (:meth:`LossConfig.for_eval`).

Multi-label targets are float32 (N, L), 1 or 0 per label and NaN where the label is missing
(unknown, or an uncertain one ignored): a sigmoid per label and binary cross-entropy over the known
labels only, optionally weighting positives (CheXNet, Rajpurkar et al. 2017, arXiv 1711.05225).

The steps call :func:`per_example_loss` and :func:`per_example_correct` alone.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger("densenet_jax")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the loss of a run is: ``multi_label`` (sigmoid/BCE rather than softmax/cross-entropy)
    and, for multi-label, ``pos_weight``: one factor per label on the positives' term (None: 1),
    as ``torch.nn.BCEWithLogitsLoss(pos_weight=...)`` applies it. For one-label data,
    ``smoothing``: label smoothing of class indices (0-1); ``bce``: binary cross-entropy per class
    (mean over the classes) instead of softmax cross-entropy."""

    multi_label: bool = False
    pos_weight: tuple[float, ...] | None = None
    smoothing: float = 0.0
    bce: bool = False

    def for_eval(self) -> LossConfig:
        """The held-out loss: the same labels, without smoothing or BCE on one-label data."""
        return dataclasses.replace(self, smoothing=0.0, bce=False)


def known(targets: jax.Array) -> jax.Array:
    """1.0 where a multi-label target is known, 0.0 where it is NaN (missing or ignored)."""
    return jnp.logical_not(jnp.isnan(targets)).astype(jnp.float32)


def per_example_loss(logits: jax.Array, targets: jax.Array, config: LossConfig) -> jax.Array:
    """The loss of each example, shape (N,), in ``logits``' dtype.

    One-label: cross-entropy of ``logits`` (N, C) against class indices ``targets`` (N,) or soft
    targets (N, C), by timm's rules (module docstring). Multi-label: the binary cross-entropy of each known label (sigmoid of ``logits`` (N, L)
    against ``targets`` (N, L), NaN = missing, counting 0), positives weighted by
    ``config.pos_weight``, summed and divided by L; so the batch mean is torch's
    ``BCEWithLogitsLoss(pos_weight=...)`` (mean over N x L) when no label is missing."""
    if not config.multi_label:
        return _one_label_loss(logits, targets, config)
    mask = known(targets).astype(logits.dtype)
    t = jnp.where(mask > 0, targets, 0).astype(logits.dtype)
    # -[w t log s(x) + (1 - t) log(1 - s(x))], with log s(x) = -softplus(-x), log(1 - s(x)) = -softplus(x)
    weight = 1.0 if config.pos_weight is None else jnp.asarray(config.pos_weight, logits.dtype)
    losses = weight * t * jax.nn.softplus(-logits) + (1 - t) * jax.nn.softplus(logits)
    return jnp.sum(losses * mask, axis=-1) / logits.shape[-1]


def _one_label_loss(logits: jax.Array, targets: jax.Array, config: LossConfig) -> jax.Array:
    soft = jnp.issubdtype(targets.dtype, jnp.floating)
    if config.bce:
        if not soft:
            targets = smoothed_one_hot(targets, logits.shape[-1], config.smoothing, logits.dtype)
        return optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype)).mean(-1)
    if soft:
        return optax.softmax_cross_entropy(logits, targets.astype(logits.dtype))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if not config.smoothing:
        return nll
    # timm's LabelSmoothingCrossEntropy: the true class's loss and the mean over all classes.
    uniform = -jax.nn.log_softmax(logits).mean(-1)
    return (1.0 - config.smoothing) * nll + config.smoothing * uniform


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float, dtype) -> jax.Array:
    """(N, num_classes): 1 - smoothing + smoothing / num_classes on the label, smoothing /
    num_classes elsewhere."""
    off = smoothing / num_classes
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), 1.0 - smoothing + off, off).astype(dtype)


def hard_labels(targets: jax.Array) -> jax.Array:
    """Class indices for accuracy: one-label ``targets`` itself, or a soft target's largest class."""
    return jnp.argmax(targets, -1) if jnp.issubdtype(targets.dtype, jnp.floating) else targets


def per_example_correct(logits: jax.Array, targets: jax.Array, config: LossConfig) -> jax.Array:
    """1.0 per example predicted right, shape (N,): the top class is the target's (one-label;
    a soft target's largest class), or every known label is on the right side of probability 0.5
    (multi-label: exact match, as ``sklearn.metrics.accuracy_score`` counts multi-label samples,
    missing labels left out)."""
    if not config.multi_label:
        return (jnp.argmax(logits, -1) == hard_labels(targets)).astype(jnp.float32)
    agree = (logits > 0) == (targets > 0.5)
    return jnp.all(agree | jnp.isnan(targets), axis=-1).astype(jnp.float32)


def auto_pos_weight(targets: np.ndarray, names: list[str]) -> tuple[float, ...]:
    """CheXNet's weighting per label from training ``targets`` (N, L; NaN = missing): |N| / |P|,
    negatives over positives among the known values (CheXNet writes w+ = |N| / (|P| + |N|) and
    w- = |P| / (|P| + |N|); their ratio, the only thing that changes the gradient's direction, is
    this). A label without positives or negatives gets 1, with a warning naming it (``names``)."""
    positives = np.sum(targets == 1, axis=0)
    negatives = np.sum(targets == 0, axis=0)
    weights = []
    for name, p, n in zip(names, positives, negatives):
        if p == 0 or n == 0:
            log.warning("warning: --pos-weight auto: label %s has %d positive and %d negative training "
                        "examples; its weight is 1", name, p, n)
            weights.append(1.0)
        else:
            weights.append(float(n / p))
    return tuple(weights)


def parse_pos_weight(value: str | None, targets: np.ndarray | None, names: list[str]) -> tuple[float, ...] | None:
    """``--pos-weight``: None, ``auto`` (:func:`auto_pos_weight` of ``targets``), or one positive
    number per label, comma-separated (one number: every label). ValueError naming the option for
    another count of numbers, or weights on one-label data (``targets`` None)."""
    if value is None:
        return None
    if targets is None:
        raise ValueError(f"--pos-weight {value}: weights the positives of multi-label data; this data "
                         "set has one label per image")
    if value == "auto":
        return auto_pos_weight(targets, names)
    weights = tuple(float(v) for v in value.split(","))
    if len(weights) == 1:
        weights *= len(names)
    if len(weights) != len(names):
        raise ValueError(f"--pos-weight {value}: {len(weights)} values for {len(names)} labels "
                         f"({', '.join(names)})")
    return weights


def check_pos_weight(value: str | None) -> None:
    """ValueError unless ``--pos-weight`` is None, ``auto`` or positive numbers separated by commas."""
    if value is None or value == "auto":
        return
    try:
        weights = [float(v) for v in value.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(np.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"--pos-weight {value!r}: 'auto' or positive numbers separated by commas")

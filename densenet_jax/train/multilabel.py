"""Held-out figures of a multi-label model: per-label AUROC and AUPRC and their means (the figures
chest X-ray models are chosen and compared on), the masked loss, and the exact-match accuracy.

Unlike loss and accuracy, a ranking metric is no sum over batches: every held-out example's
logits are gathered first (every process gets all of them), then scored on the host.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from densenet_jax.data import eval_batches
from densenet_jax.train.losses import LossConfig, per_example_correct, per_example_loss
from densenet_jax.train.ranking import auroc, average_precision, mean_defined, per_label

# A host batch (image, label, weight) -> the global batch's {"logits", "label", "weight"}.
BatchOutputs = Callable[[dict], dict]


def gather_outputs(batch_outputs: BatchOutputs, examples: Sequence, preprocess, batch_size: int,
                   workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (n, L), targets (n, L))`` of the ``examples`` that count (weight > 0: not
    padding, not an unreadable image's stand-in), over every process's share, in order."""
    logits, targets = [], []
    for batch in eval_batches(examples, preprocess, global_batch=batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              workers=workers):
        out = batch_outputs(batch)
        counts = np.asarray(out["weight"]) > 0
        logits.append(np.asarray(out["logits"], np.float32)[counts])
        targets.append(np.asarray(out["label"], np.float32)[counts])
    return np.concatenate(logits), np.concatenate(targets)


def multilabel_figures(logits: np.ndarray, targets: np.ndarray, names: list[str],
                       loss: LossConfig) -> dict:
    """The held-out figures of ``logits`` against ``targets`` (n, L; NaN = missing), as
    metrics.jsonl records them: ``eval_loss`` (:func:`per_example_loss`'s mean), ``eval_acc``
    (exact match), ``eval_auroc`` / ``eval_auprc`` (means over the labels where they are
    defined; None where none is) and ``eval_auroc_labels`` / ``eval_auprc_labels`` ({name: value
    or None}; None: one class only among that label's known held-out values)."""
    scores = 1 / (1 + np.exp(-logits))
    rocs = per_label(auroc, scores, targets, names)
    prcs = per_label(average_precision, scores, targets, names)
    return {"eval_loss": float(np.mean(per_example_loss(logits, targets, loss))),
            "eval_acc": float(np.mean(per_example_correct(logits, targets, loss))),
            "eval_auroc": mean_defined(rocs), "eval_auprc": mean_defined(prcs),
            "eval_auroc_labels": rocs, "eval_auprc_labels": prcs}


def outputs_of(logits, labels, weights) -> dict:
    """What a compiled evaluation returns for :func:`gather_outputs`: its arguments, by name."""
    return {"logits": logits, "label": labels, "weight": weights}

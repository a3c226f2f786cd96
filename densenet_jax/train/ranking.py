"""Ranking metrics of multi-label scores, per label and their mean: the area under the ROC curve and
average precision (the area under the precision-recall curve), in numpy.

Both are defined as scikit-learn defines them (``roc_auc_score``, ``average_precision_score``; the
tests compare on the same scores, ties included). Unlike scikit-learn, which raises, a label with
one class among the known values is reported as undefined (None): its AUROC is no number, and
0.5 would read as a model that ranks at chance.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """The area under the ROC curve of ``scores`` (n,) for binary ``targets`` (n,), 1 positive,
    0 negative: the probability that a random positive scores above a random negative, ties
    counting one half (Mann-Whitney U over P x N, with tied scores given their average rank, which
    is the trapezoidal area scikit-learn computes). None when either class is absent."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(targets) == 1
    p, n = int(positive.sum()), int((~positive).sum())
    if p == 0 or n == 0:
        return None
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # rank (from 0) of each distinct score's first holder
    average_rank = starts + (counts + 1) / 2  # ranks from 1, ties averaged
    rank_sum = average_rank[group.ravel()][positive].sum()
    return float((rank_sum - p * (p + 1) / 2) / (p * n))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Average precision of ``scores`` (n,) for binary ``targets`` (n,): the sum over decreasing
    distinct score thresholds of (recall gained) x (precision at that threshold), as scikit-learn's
    ``average_precision_score`` (no interpolation). None when either class is absent, as for
    :func:`auroc`."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(targets) == 1
    p = int(positive.sum())
    if p == 0 or p == len(positive):
        return None
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold ends where the score changes
    true_positives = np.cumsum(positive)[last_of_tie]
    predicted = (np.arange(len(scores)) + 1)[last_of_tie]
    recall_gain = np.diff(np.r_[0, true_positives]) / p
    return float(np.sum(recall_gain * true_positives / predicted))


def per_label(metric, scores: np.ndarray, targets: np.ndarray, names: list[str]) -> dict[str, float | None]:
    """``metric`` (:func:`auroc` or :func:`average_precision`) of each label: ``scores`` and
    ``targets`` (n, L), a target NaN where that label is unknown (left out of that label's figure)."""
    result = {}
    for j, name in enumerate(names):
        seen = ~np.isnan(targets[:, j])
        result[name] = metric(scores[seen, j], targets[seen, j])
    return result


def mean_defined(values: dict[str, float | None]) -> float | None:
    """The mean of the defined values; None when none is."""
    defined = [v for v in values.values() if v is not None]
    return float(np.mean(defined)) if defined else None

"""Mixup/CutMix against timm's Mixup (the same mixed images and targets for the same lambdas and
boxes, the same distribution of draws) and the training losses against timm's loss modules."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.data import mixup as timm_mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from densenet_jax.data.dataset import ArraySource
from densenet_jax.data.mixup import Mixup, MixupOptions
from densenet_jax.data.pipeline import train_batches
from densenet_jax.train.losses import LossConfig, per_example_loss

N, H, W, C, CLASSES = 8, 10, 12, 3, 5


def _timm_mixer(mode, **kw):
    return timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1,
                            num_classes=CLASSES, **kw)


def _draws(mode):
    """Hand-picked raw lambdas, CutMix flags and boxes (top, bottom, left, right) per draw."""
    if mode == "batch":
        return [(np.array([0.3]), np.array([False]), None), (np.array([0.6]), np.array([True]), [(2, 7, 3, 9)])]
    k = N // 2 if mode == "pair" else N
    lam = np.array([0.3, 1.0, 0.7, 0.55, 0.2, 0.9, 0.45, 0.6][:k], np.float32)
    cut = np.array([False, True, True, False, True, False, True, True][:k])
    boxes = [(2, 7, 3, 9), (0, 10, 0, 4), (5, 6, 0, 12), (1, 3, 11, 12)]
    return [(lam, cut, boxes[:int((cut & (lam != 1)).sum())])]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixed_images_and_targets_are_timms(mode):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((N, H, W, C)).astype(np.float32)
    labels = rng.integers(0, CLASSES, N)
    ours = Mixup(MixupOptions(mixup=0.8, cutmix=1.0, mixup_mode=mode, smoothing=0.1), CLASSES)
    for lam, cut, boxes in _draws(mode):
        mixer = _timm_mixer(mode)
        mixer._params_per_batch = lambda: (float(lam[0]), bool(cut[0]))
        mixer._params_per_elem = lambda k: (lam.copy(), cut.copy())
        with mock.patch.object(timm_mixup, "rand_bbox", side_effect=list(boxes or [])):
            x, target = mixer(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
        # Our draw's form: per element, lambda corrected to the box's area where CutMix pasted one.
        table = np.zeros((len(lam), 4), np.int64)
        corrected = lam.copy() if mode != "batch" else lam.astype(np.float64)
        for i, box in zip(np.flatnonzero(cut & (lam != 1)), boxes or []):
            table[i] = box
            corrected[i] = 1 - (box[1] - box[0]) * (box[3] - box[2]) / (H * W)
        if mode == "batch":
            corrected, cut, table = [np.repeat(a, N, 0) for a in (corrected, cut, table)]
        elif mode == "pair":
            corrected, cut, table = [np.concatenate([a, a[::-1]]) for a in (corrected, cut, table)]
        mixed, targets = ours.apply(images, labels, corrected, cut, table)
        np.testing.assert_array_equal(mixed, x.numpy().transpose(0, 2, 3, 1))
        np.testing.assert_allclose(targets, target.numpy(), rtol=0, atol=1e-7)


def _timm_batch_draws(n, **kw):
    np.random.seed(0)
    mixer, out = _timm_mixer("batch", **kw), []
    for _ in range(n):
        lam, cut = mixer._params_per_batch()
        if cut:
            _, lam = timm_mixup.cutmix_bbox_and_lam((H, W), lam, ratio_minmax=mixer.cutmix_minmax)
        out.append((lam, cut))
    return np.array(out)


@pytest.mark.parametrize("minmax", [None, (0.2, 0.8)])
def test_batch_draws_match_timms(minmax):
    n, kw = 3000, dict(prob=0.7, switch_prob=0.4, cutmix_minmax=minmax)
    theirs = _timm_batch_draws(n, **kw)
    ours_mixer = Mixup(MixupOptions(mixup=0.8, cutmix=1.0, cutmix_minmax=minmax, mixup_prob=0.7,
                                    mixup_switch_prob=0.4), CLASSES)
    rng = np.random.default_rng(0)
    ours = np.array([[d[0][0], d[1][0]] for d in (ours_mixer.draw(rng, 2, H, W) for _ in range(n))])
    for what, pick in [("unmixed", lambda d: d[:, 0] == 1), ("cutmix", lambda d: d[:, 1] == 1)]:
        a, b = pick(ours).mean(), pick(theirs).mean()
        assert abs(a - b) < 4 * np.sqrt(b * (1 - b) / n) * 1.5, (what, a, b)
    for kind in (0, 1):
        a = ours[(ours[:, 1] == kind) & (ours[:, 0] != 1), 0]
        b = theirs[(theirs[:, 1] == kind) & (theirs[:, 0] != 1), 0]
        assert abs(a.mean() - b.mean()) < 5 * b.std() / np.sqrt(len(b)), (kind, a.mean(), b.mean())


def test_elem_draws_match_timms():
    n = 400
    np.random.seed(0)
    mixer = _timm_mixer("elem", prob=0.6)
    theirs = np.concatenate([np.stack(mixer._params_per_elem(N), 1) for _ in range(n)])
    for row in theirs:  # timm corrects a CutMix lambda when it draws the box
        if row[1] and row[0] != 1:
            row[0] = timm_mixup.cutmix_bbox_and_lam((H, W), row[0])[1]
    ours_mixer = Mixup(MixupOptions(mixup=0.8, cutmix=1.0, mixup_prob=0.6, mixup_mode="elem"), CLASSES)
    rng = np.random.default_rng(0)
    ours = np.concatenate([np.stack(ours_mixer.draw(rng, N, H, W)[:2], 1) for _ in range(n)])
    for what, pick in [("unmixed", lambda d: d[:, 0] == 1), ("cutmix", lambda d: d[:, 1] == 1)]:
        a, b = pick(ours).mean(), pick(theirs).mean()
        assert abs(a - b) < 6 * np.sqrt(b * (1 - b) / len(theirs)), (what, a, b)
    for kind in (0, 1):
        a = ours[(ours[:, 0] != 1) & (ours[:, 1] == kind), 0]
        b = theirs[(theirs[:, 0] != 1) & (theirs[:, 1] == kind), 0]
        assert abs(a.mean() - b.mean()) < 5 * b.std() / np.sqrt(len(b)), (kind, a.mean(), b.mean())


def test_mixed_batches_resume_and_differ_by_step():
    rng = np.random.default_rng(0)
    source = ArraySource(rng.integers(0, 255, (24, 4, 4, 3), np.uint8), rng.integers(0, 3, 24).astype(np.int32))
    augment = lambda ex, r: {**ex, "image": ex["image"].astype(np.float32)}
    mix = Mixup(MixupOptions(mixup=1.0, cutmix=1.0), 3)
    whole = list(train_batches(source, augment, seed=1, epoch=0, global_batch=6, mix=mix))
    resumed = list(train_batches(source, augment, seed=1, epoch=0, global_batch=6, start_step=2, mix=mix))
    assert all(b["target"].shape == (6, 3) for b in whole)
    for a, b in zip(whole[2:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["target"], b["target"])
    assert len({float(b["target"].max()) for b in whole}) > 1  # not one draw for every step


def _timm_loss(module, logits, targets):
    return float(module(torch.from_numpy(logits), torch.from_numpy(targets)))


def test_losses_are_timms():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, CLASSES)) * 3
    labels = rng.integers(0, CLASSES, 6)
    soft = rng.dirichlet(np.ones(CLASSES), 6)
    ours = lambda targets, **kw: float(jax.jit(lambda *a: per_example_loss(*a).mean(), static_argnums=2)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(targets), LossConfig(**kw)))
    logits32 = logits.astype(np.float32)
    cases = [(ours(labels), torch.nn.CrossEntropyLoss(), labels),
             (ours(labels, smoothing=0.1), LabelSmoothingCrossEntropy(0.1), labels),
             (ours(soft.astype(np.float32)), SoftTargetCrossEntropy(), soft.astype(np.float32)),
             (ours(labels, bce=True, smoothing=0.1), BinaryCrossEntropy(smoothing=0.1), labels),
             (ours(labels, bce=True), BinaryCrossEntropy(smoothing=0.0), labels),
             (ours(soft.astype(np.float32), bce=True), BinaryCrossEntropy(smoothing=0.0), soft.astype(np.float32))]
    for i, (got, module, targets) in enumerate(cases):
        assert got == pytest.approx(_timm_loss(module, logits32, targets), rel=2e-6), i

"""Mixup and CutMix on a host's batch, in the data workers, with soft (optionally smoothed)
targets: timm's ``Mixup`` (``--mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob
--mixup-mode --smoothing``).

Why in the workers rather than in the jitted step: the batch is mixed where it is made, so the
step's cost does not grow (the mixing overlaps training, as decoding does), the draws come from
the pipeline's per-batch seed (a resumed run draws the same), and every device count sees the same
mixed batch. As in timm's distributed training, each host mixes its own share of the global batch
(element i with element n-1-i of that share).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIX_MODES = ("batch", "pair", "elem")


@dataclasses.dataclass(frozen=True)
class MixupOptions:
    """``mixup``/``cutmix``: the Beta(alpha, alpha) of each (0: off); ``cutmix_minmax``: CutMix's
    box sides as fractions of the image's, drawn uniformly (replaces ``cutmix``'s Beta, as timm);
    ``mixup_prob``: the chance a batch (element, pair) is mixed; ``mixup_switch_prob``: the chance
    of CutMix rather than Mixup when both are on; ``mixup_mode``: one draw per batch, per pair
    (i, n-1-i) or per element; ``smoothing``: label smoothing of the targets."""

    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0

    @property
    def active(self) -> bool:
        """Whether batches are mixed at all."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    @property
    def cutmix_alpha(self) -> float:
        """CutMix's alpha: 1 when ``cutmix_minmax`` is given (timm's rule), else ``cutmix``."""
        return 1.0 if self.cutmix_minmax is not None else self.cutmix


def soft_targets(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """One-hot float32 (n, num_classes) rows: 1 - smoothing + smoothing / num_classes on the label,
    smoothing / num_classes elsewhere (timm's ``one_hot`` with on/off values)."""
    off = smoothing / num_classes
    out = np.full((len(labels), num_classes), off, np.float32)
    out[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return out


class Mixup:
    """timm's Mixup for a data set of ``num_classes``: :meth:`draw` the parameters,
    :meth:`apply` them; called on a batch dict with an rng, adds ``target`` and mixes ``image``."""

    def __init__(self, options: MixupOptions, num_classes: int):
        self.o, self.num_classes = options, num_classes

    def _lam_and_kind(self, rng, n: int | None):
        """Beta draws of lambda and whether each is CutMix's (``n`` None: one scalar draw)."""
        o, size = self.o, n
        if o.mixup > 0 and o.cutmix_alpha > 0:
            cut = rng.random(size) < o.mixup_switch_prob
            lam = np.where(cut, rng.beta(o.cutmix_alpha, o.cutmix_alpha, size), rng.beta(o.mixup, o.mixup, size))
        elif o.mixup > 0:
            cut, lam = np.zeros(size, bool) if n else False, rng.beta(o.mixup, o.mixup, size)
        else:
            cut, lam = np.ones(size, bool) if n else True, rng.beta(o.cutmix_alpha, o.cutmix_alpha, size)
        return lam, cut

    def box(self, rng, lam: float, height: int, width: int) -> tuple[tuple[int, int, int, int], float]:
        """CutMix's box (top, bottom, left, right; half-open) for ``lam``, and lambda corrected to
        the share of the image outside it: sides sqrt(1 - lam) of the image's about a uniform
        centre, clipped to the image; with ``cutmix_minmax``, sides uniform in that range and the
        box uniform inside the image (timm's ``rand_bbox`` and ``rand_bbox_minmax``)."""
        if self.o.cutmix_minmax is not None:
            low, high = self.o.cutmix_minmax
            cut_h = int(rng.integers(int(height * low), int(height * high)))
            cut_w = int(rng.integers(int(width * low), int(width * high)))
            top, left = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
            box = (top, top + cut_h, left, left + cut_w)
        else:
            ratio = np.sqrt(1 - lam)
            cut_h, cut_w = int(height * ratio), int(width * ratio)
            cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
            # An odd side's extra pixel goes below and right of the centre.
            box = (int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + (cut_h + 1) // 2, 0, height)),
                   int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + (cut_w + 1) // 2, 0, width)))
        return box, 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)

    def draw(self, rng, n: int, height: int, width: int):
        """(lam (n,), cutmix (n,) bool, boxes (n, 4) int) for a batch of ``n``: element i is mixed
        with element n-1-i by ``lam[i]`` (1: not mixed), by pasting that element's ``boxes[i]``
        where ``cutmix[i]``. float64 lambdas for ``batch`` mode, float32 for the others, as timm."""
        o = self.o
        boxes = np.zeros((n, 4), np.int64)
        if o.mixup_mode == "batch":
            lam, cut = 1.0, False
            if rng.random() < o.mixup_prob:
                lam, cut = self._lam_and_kind(rng, None)
                lam, cut = float(lam), bool(cut)
            if cut and lam != 1.0:
                box, lam = self.box(rng, lam, height, width)
                boxes[:] = box
            return np.full(n, lam), np.full(n, cut), boxes
        k = n // 2 if o.mixup_mode == "pair" else n
        lam, cut = self._lam_and_kind(rng, k)
        lam = np.where(rng.random(k) < o.mixup_prob, lam.astype(np.float32), np.float32(1.0))
        for i in np.flatnonzero(cut & (lam != 1.0)):
            boxes[i], lam[i] = self.box(rng, float(lam[i]), height, width)
        if o.mixup_mode == "pair":  # element n-1-i takes pair i's draw
            lam, cut = np.concatenate([lam, lam[::-1]]), np.concatenate([cut, cut[::-1]])
            boxes = np.concatenate([boxes[:k], boxes[:k][::-1]])
        return lam, cut, boxes

    def apply(self, images: np.ndarray, labels: np.ndarray, lam, cut, boxes):
        """(mixed images, soft targets) for float32 NHWC ``images`` and int ``labels``: element i
        blended with element n-1-i as ``x * lam + partner * (1 - lam)`` in float32, or the
        partner's box pasted in; targets ``lam * y_i + (1 - lam) * y_(n-1-i)``, smoothed."""
        # Only the elements that mix are touched, each box by slicing: masks and selects over the
        # whole batch cost several passes over it, in a worker that also decodes.
        partner = images[::-1]
        blended = np.flatnonzero(~cut & (lam != 1.0))
        lam32 = lam.astype(np.float32)[:, None, None, None]
        rest32 = (1.0 - lam).astype(np.float32)[:, None, None, None]
        if len(blended) == len(images):  # batch mode's mixup: no selection needed
            out = images * lam32
            out += partner * rest32
        else:
            out = images.copy()
            if len(blended):
                out[blended] = images[blended] * lam32[blended] + partner[blended] * rest32[blended]
        for i in np.flatnonzero(cut & (lam != 1.0)):
            top, bottom, left, right = boxes[i]
            out[i, top:bottom, left:right] = partner[i, top:bottom, left:right]
        y = soft_targets(labels, self.num_classes, self.o.smoothing)
        targets = y * lam.astype(np.float32)[:, None] + y[::-1] * (1.0 - lam).astype(np.float32)[:, None]
        return out, targets

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
        images = batch["image"]
        drawn = self.draw(rng, *images.shape[:3])
        mixed, targets = self.apply(images, batch["label"], *drawn)
        return {**batch, "image": mixed, "target": targets}

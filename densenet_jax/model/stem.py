"""The stem variants and where anti-aliasing goes: torchvision's 7x7 stem, the paper's 3x3 CIFAR
stem and timm's deep stems, with timm's BlurPool in the stem's pooling or the transitions.

The stem's layers sit directly in ``features`` (``features.conv0``, ``features.norm0``, and for
deep stems ``conv1``/``norm1``/``conv2``/``norm2``), where torchvision and timm keep them, so that
weights keep their names; this module says which layers and which pooling a config implies.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.model.layers import (BatchNorm, Conv2d, avg_pool_2x2, blur_pool_3x3_s2, max_pool_3x3_s1,
                                 max_pool_3x3_s2)

Pool = Callable[[jax.Array], jax.Array]


def stem_layers(config: DenseNetConfig, *, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """``conv{i}`` (and, except for the CIFAR stem, ``norm{i}``) by name, in order.

    imagenet: 7x7/2, padding 3; cifar: 3x3/1, padding 1; deep stems (timm): 3x3, padding 1, the
    first with stride 2. Channels as :meth:`DenseNetConfig.stem_channels`.
    """
    kernel = 7 if config.stem == "imagenet" else 3
    first_stride = 1 if config.stem == "cifar" else 2
    layers, c_in = {}, config.in_chans
    for i, c in enumerate(config.stem_channels()):
        layers[f"conv{i}"] = Conv2d(c_in, c, kernel, stride=first_stride if i == 0 else 1,
                                    padding=kernel // 2, rngs=rngs)
        if config.stem != "cifar":
            layers[f"norm{i}"] = BatchNorm(c)
        c_in = c
    return layers


def stem_pool(config: DenseNetConfig) -> Pool | None:
    """The pooling after the stem's last BN-ReLU: none for the CIFAR stem, torchvision's 3x3/2
    max-pool, or with ``aa_layer="blur"`` timm's anti-aliased one (3x3/1 max-pool, then the blur
    at stride 2)."""
    if config.stem == "cifar":
        return None
    if config.aa_layer == "blur":
        return blurred_max_pool
    return max_pool_3x3_s2


def blurred_max_pool(x: jax.Array) -> jax.Array:
    """timm's anti-aliased stem pooling: MaxPool2d(3, stride=1, padding=1) then BlurPool2d(stride=2)."""
    return blur_pool_3x3_s2(max_pool_3x3_s1(x))


def transition_pool(config: DenseNetConfig) -> Pool:
    """A transition's downsampling: 2x2 average pooling, or timm's blur when ``aa_layer`` is set
    and ``aa_stem_only`` is False."""
    if config.aa_layer == "blur" and not config.aa_stem_only:
        return blur_pool_3x3_s2
    return avg_pool_2x2


def pooled_size(pool: Pool | None, size: int) -> int | None:
    """The height (or width) ``pool`` leaves of ``size``, or None when it cannot take ``size``
    (the blur's reflect padding needs 2 pixels; average pooling leaves none of 1)."""
    if pool is None:
        return size
    if pool is avg_pool_2x2:
        return size // 2 or None
    if pool in (blurred_max_pool, blur_pool_3x3_s2) and size < 2:
        return None
    return (size - 1) // 2 + 1

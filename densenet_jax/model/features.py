"""DenseNet as a backbone, as timm's ``features_only``: the same stages, values and feature_info.

    backbone = dj.create_model("densenet121", features_only=True, out_indices=(2, 3, 4), rngs=...)
    backbone = dj.load("densenet121.safetensors", features_only=True)     # converted weights
    maps = backbone(images)                      # a list of NHWC arrays, one per chosen stage
    backbone.feature_info.channels(), backbone.feature_info.reduction()   # [512, 1024, 1024], [8, 16, 32]

Stage 0 is the stem before its pooling (after norm0 and ReLU; norm2 for timm's deep stems; conv0
for the CIFAR stem, which has no norm), stage i the output of dense block i, the last one after
norm5 and ReLU (timm's norm layers include the activation), never negative. torchvision's norm5
map before the ReLU is ``model.features(x)``.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.model.densenet import DenseNet, check_input, check_out_indices


@dataclasses.dataclass(frozen=True)
class Stage:
    """One feature map: its stage number, channels, stride against the input, and the timm module
    whose output it is."""
    index: int
    num_chs: int
    reduction: int
    module: str


class FeatureInfo(list):
    """The chosen stages, in order, with timm's accessors."""

    def channels(self) -> list[int]:
        """Channels of each chosen feature map."""
        return [s.num_chs for s in self]

    def reduction(self) -> list[int]:
        """Stride of each chosen feature map against the input."""
        return [s.reduction for s in self]

    def module_name(self) -> list[str]:
        """The timm module whose output each chosen feature map is (``features.norm0`` ...)."""
        return [s.module for s in self]


def feature_info(config: DenseNetConfig, out_indices=None) -> FeatureInfo:
    """The stages ``out_indices`` (as timm reads them; default: all) of the DenseNet ``config``
    describes, with timm's channels, reductions and module names (timm/models/densenet.py).

    Stage 0: the stem before pooling, reduction 2 (``features.norm0``, or ``features.norm2`` for
    deep stems); stage i: dense block i (``features.denseblock{i}``), reduction 4 * 2**(i-1); the
    last: ``features.norm5``. The CIFAR stem (not in timm) neither strides nor pools: its stage 0 is
    ``features.conv0`` at reduction 1, and block i is at 2**(i-1).
    """
    chosen = check_out_indices(out_indices, config)
    last = len(config.block_config)
    stem_reduction = 1 if config.stem == "cifar" else 2
    stem_module = f"features.{'conv' if config.stem == 'cifar' else 'norm'}{len(config.stem_channels()) - 1}"
    stages = [Stage(0, config.num_init_features, stem_reduction, stem_module)]
    for i, (_, out) in enumerate(config.block_channels(), start=1):
        module = "features.norm5" if i == last else f"features.denseblock{i}"
        stages.append(Stage(i, out, config.stem_stride * 2 ** (i - 1), module))
    return FeatureInfo(stages[i] for i in chosen)


class DenseNetFeatures(nnx.Module):
    """The backbone of ``model``: no classifier, returning the feature maps ``out_indices``.

    It shares ``model``'s modules, so its weights sit where DenseNet's do (``features.*``) and the
    same files load into it; build one with ``create_model(..., features_only=True)`` or
    ``load(..., features_only=True)``. ``pretrained_cfg``: as the DenseNet's (None when unknown).
    """

    pretrained_cfg = None

    def __init__(self, model: DenseNet, out_indices=None):
        self.config = model.config
        self.features = model.features
        self.out_indices = check_out_indices(out_indices, model.config)
        self.feature_info = feature_info(model.config, self.out_indices)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        check_input(x, self.config)
        return self.features.feature_maps(x, self.out_indices)

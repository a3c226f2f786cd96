"""DenseNet as a backbone: the feature maps after its dense blocks, described as timm describes them.

    backbone = dj.create_model("densenet121", features_only=True, out_indices=(1, 2, 3), rngs=...)
    backbone = dj.load("densenet121.safetensors", features_only=True)     # converted weights
    maps = backbone(images)                      # a list of NHWC arrays, one per chosen block
    backbone.feature_info.channels(), backbone.feature_info.reduction()   # [512, 1024, 1024], [8, 16, 32]
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from densenet_jax.configs import DenseNetConfig
from densenet_jax.models import DenseNet, check_input, check_out_indices


@dataclasses.dataclass(frozen=True)
class Stage:
    """One feature map: its channels, its stride against the input, and the torchvision module
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
        """The torchvision module whose output each chosen feature map is."""
        return [s.module for s in self]


def feature_info(config: DenseNetConfig, out_indices: tuple[int, ...] | None = None) -> FeatureInfo:
    """The stages ``out_indices`` (default: every dense block) of the DenseNet ``config`` describes.

    Stage i is dense block i's output (``features.denseblock{i+1}``), the last one after
    ``features.norm5`` as in timm. The ImageNet stem divides the size by 4, each transition by 2.
    """
    chosen = check_out_indices(out_indices, config)
    stem_stride = 4 if config.stem == "imagenet" else 1
    last = len(config.block_config) - 1
    return FeatureInfo(
        Stage(i, out, stem_stride * 2 ** i, "features.norm5" if i == last else f"features.denseblock{i + 1}")
        for i, (_, out) in enumerate(config.block_channels()) if i in chosen)


class DenseNetFeatures(nnx.Module):
    """The backbone of ``model``: no classifier, returning the feature maps ``out_indices``.

    It shares ``model``'s modules, so its weights sit where DenseNet's do (``features.*``) and the
    same files load into it; build one with ``create_model(..., features_only=True)`` or
    ``load(..., features_only=True)``. ``pretrained_cfg``: as the DenseNet's (None when unknown).
    """

    pretrained_cfg = None

    def __init__(self, model: DenseNet, out_indices: tuple[int, ...] | None = None):
        self.config = model.config
        self.features = model.features
        self.out_indices = check_out_indices(out_indices, model.config)
        self.feature_info = feature_info(model.config, self.out_indices)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        check_input(x, self.config)
        return self.features.feature_maps(x, self.out_indices)

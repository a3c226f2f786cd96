"""The named architectures: torchvision's and timm's ImageNet DenseNets and the paper's CIFAR/SVHN
models, each a DenseNetConfig. Pretrained weights (tags such as ``densenet121.tv_in1k``) are kept
apart from the architectures they fit."""

from __future__ import annotations

from typing import Callable

from densenet_jax.configs import DenseNetConfig

_REGISTRY: dict[str, Callable[[], DenseNetConfig]] = {
    "densenet121": lambda: DenseNetConfig.imagenet(32, (6, 12, 24, 16), 64),
    "densenet169": lambda: DenseNetConfig.imagenet(32, (6, 12, 32, 32), 64),
    "densenet201": lambda: DenseNetConfig.imagenet(32, (6, 12, 48, 32), 64),
    "densenet161": lambda: DenseNetConfig.imagenet(48, (6, 12, 36, 24), 96),
    # timm's: a deep stem, and for densenetblur121d blur pooling in the stem (timm/models/densenet.py).
    "densenetblur121d": lambda: DenseNetConfig.imagenet(32, (6, 12, 24, 16), 64, stem="deep",
                                                        aa_layer="blur"),
    "densenet264d": lambda: DenseNetConfig.imagenet(48, (6, 12, 64, 48), 96, stem="deep"),
    "densenet_40_k12": lambda: DenseNetConfig.cifar(40, 12, bottleneck=False, compression=1.0),
    "densenet_100_k12": lambda: DenseNetConfig.cifar(100, 12, bottleneck=False, compression=1.0),
    "densenet_100_k24": lambda: DenseNetConfig.cifar(100, 24, bottleneck=False, compression=1.0),
    "densenet_bc_100_k12": lambda: DenseNetConfig.cifar(100, 12, bottleneck=True, compression=0.5),
    "densenet_bc_250_k24": lambda: DenseNetConfig.cifar(250, 24, bottleneck=True, compression=0.5),
    "densenet_bc_190_k40": lambda: DenseNetConfig.cifar(190, 40, bottleneck=True, compression=0.5),
}

# The names timm registers (timm 1.0.31, timm/models/densenet.py): create_model reads their dropout
# keywords with timm's meaning.
TIMM_NAMES = frozenset({"densenet121", "densenet169", "densenet201", "densenet161",
                        "densenetblur121d", "densenet264d"})


def list_models() -> list[str]:
    """Every registered architecture name, in registration order."""
    return list(_REGISTRY)


def get_config(name: str, **overrides) -> DenseNetConfig:
    """The named configuration with fields replaced by ``overrides`` (e.g. num_classes=10).

    Raises ValueError for an unknown name or field.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}") from None
    return factory().replace(**overrides)

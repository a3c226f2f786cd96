"""Named DenseNet configurations: torchvision's ImageNet models and the paper's CIFAR/SVHN models."""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

Stem = Literal["imagenet", "cifar"]


def kept_channels(in_channels: int, compression: float) -> int:
    """A transition's output channels: floor(in_channels * compression), rounded first so that
    80 * (29 / 80) gives 29."""
    return int(round(in_channels * compression, 6))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class DenseNetConfig:
    """Everything that fixes a DenseNet's architecture and training-time behaviour.

    growth_rate: k, the channels each dense layer adds.
    block_config: the number of dense layers in each dense block.
    num_init_features: the stem's output channels.
    bn_size: the bottleneck's width as a multiple of k (the "B" of DenseNet-BC); None: no bottleneck,
        each layer is BN-ReLU-Conv3x3.
    compression: theta, the fraction of channels a transition keeps (the "C"; 1.0 keeps all).
    stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or "cifar" (one 3x3 conv).
    drop_rate: dropout after each dense layer's last convolution, in training only.
    num_classes: the classifier's outputs; 0 for no classifier (timm's convention: the model returns
        the pooled features, as a checkpoint saved without its head holds).
    memory_efficient: recompute each layer's concat-BN-ReLU-conv1 in the backward pass.
    """

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int | None = 4
    compression: float = 0.5
    stem: Stem = "imagenet"
    drop_rate: float = 0.0
    num_classes: int = 1000
    memory_efficient: bool = False

    def __post_init__(self):
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))
        for name in ("growth_rate", "num_init_features", "bn_size"):
            value = getattr(self, name)
            if not (value is None and name == "bn_size") and not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (_positive_int(self.num_classes) or type(self.num_classes) is int and self.num_classes == 0):
            raise ValueError(f"num_classes must be a positive integer, or 0 for no classifier, "
                             f"got {self.num_classes!r}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        if not self.block_config or min(self.block_config) < 1:
            raise ValueError(f"every block needs at least one layer, got {self.block_config}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if any(self.transition_channels(out) < 1 for _, out in self.block_channels()[:-1]):
            raise ValueError(f"compression {self.compression} leaves a transition with no channels")

    @classmethod
    def imagenet(cls, growth_rate: int, block_config: tuple[int, ...], num_init_features: int,
                 **overrides) -> DenseNetConfig:
        """A torchvision-style ImageNet DenseNet-BC (bottleneck 4k, compression 0.5)."""
        return cls(growth_rate, block_config, num_init_features, **overrides)

    @classmethod
    def cifar(cls, depth: int, growth_rate: int, *, bottleneck: bool, compression: float,
              num_classes: int = 10, **overrides) -> DenseNetConfig:
        """The paper's CIFAR/SVHN DenseNet of depth L: three equal dense blocks, a 3x3 stem.

        The stem has 16 channels, or 2k for DenseNet-BC, as in the paper's Section 4. Depth counts
        the convolutions and the classifier: L = 3 * layers * (2 if bottleneck else 1) + 4.
        """
        convs_per_layer = 2 if bottleneck else 1
        layers, rest = divmod(depth - 4, 3 * convs_per_layer)
        if rest or layers < 1:
            raise ValueError(f"depth {depth} does not give three equal dense blocks "
                             f"(need depth - 4 divisible by {3 * convs_per_layer})")
        return cls(growth_rate, (layers,) * 3,
                   num_init_features=2 * growth_rate if bottleneck and compression < 1 else 16,
                   bn_size=4 if bottleneck else None, compression=compression, stem="cifar",
                   num_classes=num_classes, **overrides)

    def block_channels(self) -> list[tuple[int, int]]:
        """(input channels, output channels) of every dense block, in order."""
        channels, plan = self.num_init_features, []
        for i, num_layers in enumerate(self.block_config):
            out = channels + num_layers * self.growth_rate
            plan.append((channels, out))
            channels = self.transition_channels(out) if i < len(self.block_config) - 1 else out
        return plan

    def transition_channels(self, in_channels: int) -> int:
        """The channels a transition after a block of ``in_channels`` keeps."""
        return kept_channels(in_channels, self.compression)

    @property
    def num_features(self) -> int:
        """Channels of the final feature map, the classifier's input."""
        return self.block_channels()[-1][1]

    def replace(self, **changes) -> DenseNetConfig:
        """A copy with ``changes``; an unknown field name is an error, not ignored."""
        unknown = changes.keys() - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"DenseNetConfig has no field {sorted(unknown)[0]!r}")
        return dataclasses.replace(self, **changes)


def count_params(config: DenseNetConfig) -> int:
    """Trainable parameters by the layer formula (BN running statistics not counted).

    Written from the architecture's definition rather than from the model, so that a test can hold
    the two against each other.
    """
    k, bn = config.growth_rate, config.bn_size

    def bn_params(c):
        return 2 * c

    stem_kernel = 7 if config.stem == "imagenet" else 3
    total = 3 * config.num_init_features * stem_kernel ** 2
    if config.stem == "imagenet":
        total += bn_params(config.num_init_features)
    plan = config.block_channels()
    for i, (block_in, block_out) in enumerate(plan):
        for c in range(block_in, block_out, k):
            if bn:
                total += bn_params(c) + c * bn * k + bn_params(bn * k) + bn * k * k * 9
            else:
                total += bn_params(c) + c * k * 9
        if i < len(plan) - 1:
            total += bn_params(block_out) + block_out * config.transition_channels(block_out)
    c = config.num_features
    return total + bn_params(c) + c * config.num_classes + config.num_classes


_REGISTRY: dict[str, Callable[[], DenseNetConfig]] = {
    "densenet121": lambda: DenseNetConfig.imagenet(32, (6, 12, 24, 16), 64),
    "densenet169": lambda: DenseNetConfig.imagenet(32, (6, 12, 32, 32), 64),
    "densenet201": lambda: DenseNetConfig.imagenet(32, (6, 12, 48, 32), 64),
    "densenet161": lambda: DenseNetConfig.imagenet(48, (6, 12, 36, 24), 96),
    "densenet_40_k12": lambda: DenseNetConfig.cifar(40, 12, bottleneck=False, compression=1.0),
    "densenet_100_k12": lambda: DenseNetConfig.cifar(100, 12, bottleneck=False, compression=1.0),
    "densenet_100_k24": lambda: DenseNetConfig.cifar(100, 24, bottleneck=False, compression=1.0),
    "densenet_bc_100_k12": lambda: DenseNetConfig.cifar(100, 12, bottleneck=True, compression=0.5),
    "densenet_bc_250_k24": lambda: DenseNetConfig.cifar(250, 24, bottleneck=True, compression=0.5),
    "densenet_bc_190_k40": lambda: DenseNetConfig.cifar(190, 40, bottleneck=True, compression=0.5),
}


def list_models() -> list[str]:
    """Every registered model name, in registration order."""
    return list(_REGISTRY)


def get_config(name: str, **overrides) -> DenseNetConfig:
    """The named configuration with fields replaced by ``overrides`` (e.g. num_classes=10)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}") from None
    return factory().replace(**overrides)

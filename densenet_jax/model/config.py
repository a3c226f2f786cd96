"""DenseNetConfig: every field that fixes a DenseNet (torchvision's, timm's or the paper's CIFAR
models), the channel plan it implies and its parameter count. The named models are in registry.py."""

from __future__ import annotations

import dataclasses
from typing import Literal

# "imagenet": torchvision's 7x7/2 conv; "cifar": the paper's 3x3 conv; "deep*": timm's three 3x3
# convolutions (``stem_type`` 'deep', 'deep_tiered', 'deep_tiered_narrow' in timm's densenet.py).
Stem = Literal["imagenet", "cifar", "deep", "deep_tiered", "deep_tiered_narrow"]
STEMS = ("imagenet", "cifar", "deep", "deep_tiered", "deep_tiered_narrow")
AA_LAYERS = (None, "blur")


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
    stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), "cifar" (one 3x3 conv), or timm's
        deep stems (three 3x3 convs, the first with stride 2, each followed by BN-ReLU, then the
        3x3/2 max-pool): "deep" (k, k, then num_init_features channels), "deep_tiered"
        (3*(k//4), 6*(k//4), num_init_features) and "deep_tiered_narrow" (3*(k//4),
        num_init_features, num_init_features), as timm's ``stem_type``.
    drop_rate: dropout after each dense layer's last convolution, in training only: torchvision's
        ``drop_rate``, timm's ``proj_drop_rate``.
    num_classes: the classifier's outputs; 0 for no classifier (timm's convention: the model returns
        the pooled features, as a checkpoint saved without its head holds).
    memory_efficient: keep only each dense block's output for the backward pass, which recomputes
        the block's layers one at a time (model/remat.py): memory linear in depth.
    in_chans: the input images' channels (timm's name): conv0 takes this many.
    aa_layer: None, or "blur": timm's anti-aliasing (``aa_layer=BlurPool2d``): the stem's 3x3/2
        max-pool becomes a 3x3/1 max-pool then a 3x3 binomial blur with stride 2 (reflect padding).
    aa_stem_only: with aa_layer, blur only in the stem (timm's default); False also replaces each
        transition's 2x2 average pool with the blur.
    head_drop_rate: dropout on the pooled features before the classifier, in training only: timm's
        ``drop_rate``.
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
    in_chans: int = 3
    aa_layer: str | None = None
    aa_stem_only: bool = True
    head_drop_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))
        for name in ("growth_rate", "num_init_features", "bn_size", "in_chans"):
            value = getattr(self, name)
            if not (value is None and name == "bn_size") and not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (_positive_int(self.num_classes) or type(self.num_classes) is int and self.num_classes == 0):
            raise ValueError(f"num_classes must be a positive integer, or 0 for no classifier, "
                             f"got {self.num_classes!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}; got {self.stem!r}")
        if self.stem.startswith("deep_tiered") and self.growth_rate < 4:
            raise ValueError(f"stem {self.stem!r} needs growth_rate >= 4 (3 * (k // 4) channels)")
        if self.aa_layer not in AA_LAYERS:
            raise ValueError(f"aa_layer must be None or 'blur', got {self.aa_layer!r}")
        if self.aa_layer is not None and self.stem == "cifar" and self.aa_stem_only:
            raise ValueError("aa_layer blurs the stem's pooling, and the cifar stem has none "
                             "(set aa_stem_only=False to blur the transitions)")
        for name in ("drop_rate", "head_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        if not self.block_config or min(self.block_config) < 1:
            raise ValueError(f"every block needs at least one layer, got {self.block_config}")
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
        if layers < 1:
            raise ValueError(f"depth {depth} leaves the dense blocks empty (at least {4 + 3 * convs_per_layer})")
        if rest:
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

    def stem_channels(self) -> list[int]:
        """The output channels of the stem's convolutions, conv0 first (timm's rule for deep stems,
        with num_init_features where timm has 2k)."""
        k, c0 = self.growth_rate, self.num_init_features
        return {"imagenet": [c0], "cifar": [c0], "deep": [k, k, c0],
                "deep_tiered": [3 * (k // 4), 6 * (k // 4), c0],
                "deep_tiered_narrow": [3 * (k // 4), c0, c0]}[self.stem]

    @property
    def stem_stride(self) -> int:
        """How much the stem (conv and pooling) divides the input's height and width."""
        return 1 if self.stem == "cifar" else 4

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
    total, c_in = 0, config.in_chans
    for c in config.stem_channels():
        total += c_in * c * stem_kernel ** 2 + (bn_params(c) if config.stem != "cifar" else 0)
        c_in = c
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

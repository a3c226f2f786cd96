"""DenseNet (Huang et al., CVPR 2017) in Flax NNX, laid out like torchvision's ``densenet.py``.

Module names follow torchvision's state-dict paths (``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``classifier``), so every torchvision weight has an obvious twin.
Inputs are NHWC; each layer computes in the dtype of its input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from densenet_jax.configs import DenseNetConfig, get_config
from densenet_jax.layers import (BatchNorm, Conv2d, Linear, avg_pool_2x2, max_pool_3x3_s2, named_layer_errors,
                                 sample_count)


class DenseLayer(nnx.Module):
    """BN-ReLU-Conv1x1 (the bottleneck, to bn_size*k channels) then BN-ReLU-Conv3x3 to k channels.

    Without a bottleneck (bn_size None) the layer is BN-ReLU-Conv3x3, held as norm1/conv1.
    The layer reads the concatenation of all earlier feature maps in its block. With
    ``memory_efficient`` it keeps only the bottleneck's output for the backward pass (see below).
    """

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int | None, drop_rate: float,
                 memory_efficient: bool, *, rngs: nnx.Rngs):
        self.norm1 = BatchNorm(in_channels)
        if bn_size:
            self.conv1 = Conv2d(in_channels, bn_size * growth_rate, 1, rngs=rngs)
            self.norm2 = BatchNorm(bn_size * growth_rate)
            self.conv2 = Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, rngs=rngs)
        else:
            self.conv1 = Conv2d(in_channels, growth_rate, 3, padding=1, rngs=rngs)
            self.norm2 = self.conv2 = None
        self.dropout = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None
        self.memory_efficient = memory_efficient

    def __call__(self, features: list[jax.Array]) -> jax.Array:
        new_features = self._new_features
        if self.memory_efficient:
            new_features = jax.checkpoint(new_features, policy=_KEEP_BOTTLENECK)
        out, stats = new_features(features)
        # Updated here, once, outside the checkpoint: recomputation in the backward pass must not
        # move the running statistics a second time.
        for norm, batch_stats in zip((self.norm1, self.norm2), stats):
            if batch_stats is not None:
                norm.update_running(*batch_stats, sample_count(features[0].shape, norm.axis_name))
        if self.dropout is not None:
            out = self.dropout(out)
        return out

    def _new_features(self, features: list[jax.Array]):
        """The layer's k new channels and its batch statistics; pure, so it can be recomputed."""
        y, stats1 = self.norm1.apply(jnp.concatenate(features, axis=-1))
        out = self.conv1(jax.nn.relu(y))
        if self.conv2 is None:
            return out, (stats1,)
        y, stats2 = self.norm2.apply(checkpoint_name(out, _BOTTLENECK))
        return self.conv2(jax.nn.relu(y)), (stats1, stats2)


# memory_efficient keeps, of each dense layer's work, only the bottleneck convolution's output: the
# concatenation, both BN-ReLUs and the 1x1 convolution are recomputed in the backward pass. The
# concatenation is what grows with depth; the BN-ReLUs are cheap elementwise work.
_BOTTLENECK = "densenet_bottleneck"
_KEEP_BOTTLENECK = jax.checkpoint_policies.save_only_these_names(_BOTTLENECK)


class DenseBlock(nnx.Module):
    """``num_layers`` dense layers, each fed every feature map before it; returns their concatenation."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int | None,
                 drop_rate: float, memory_efficient: bool, *, rngs: nnx.Rngs):
        self.num_layers = num_layers
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate,
                               memory_efficient, rngs=rngs)
            setattr(self, f"denselayer{i + 1}", layer)

    def layers(self) -> list[DenseLayer]:
        """The dense layers, in order."""
        return [getattr(self, f"denselayer{i + 1}") for i in range(self.num_layers)]

    def __call__(self, x: jax.Array) -> jax.Array:
        features = [x]
        for layer in self.layers():
            features.append(layer(features))
        return jnp.concatenate(features, axis=-1)


class Transition(nnx.Module):
    """BN-ReLU-Conv1x1 (compressing the channels) then 2x2 average pooling, between dense blocks.

    The pooling runs before the 1x1 convolution: both are linear, so the result is the same (torch's
    floor-mode pooling included), and the convolution does a quarter of the work.
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.norm = BatchNorm(in_channels)
        self.conv = Conv2d(in_channels, out_channels, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(avg_pool_2x2(jax.nn.relu(self.norm(x))))


class Features(nnx.Module):
    """torchvision's ``features``: the stem, dense blocks with transitions between, and norm5."""

    def __init__(self, config: DenseNetConfig, *, rngs: nnx.Rngs):
        c0 = config.num_init_features
        if config.stem == "imagenet":
            self.conv0 = Conv2d(3, c0, 7, stride=2, padding=3, rngs=rngs)
            self.norm0 = BatchNorm(c0)
        else:
            self.conv0 = Conv2d(3, c0, 3, padding=1, rngs=rngs)
            self.norm0 = None
        plan = config.block_channels()
        for i, ((block_in, block_out), num_layers) in enumerate(zip(plan, config.block_config)):
            setattr(self, f"denseblock{i + 1}", DenseBlock(
                num_layers, block_in, config.growth_rate, config.bn_size, config.drop_rate,
                config.memory_efficient, rngs=rngs))
            if i < len(plan) - 1:
                setattr(self, f"transition{i + 1}", Transition(
                    block_out, config.transition_channels(block_out), rngs=rngs))
        self.norm5 = BatchNorm(config.num_features)
        self.num_blocks = len(plan)

    def stem(self, x: jax.Array) -> jax.Array:
        """conv0 (and for the ImageNet stem norm0, ReLU and the 3x3/2 max-pool)."""
        x = self.conv0(x)
        if self.norm0 is not None:
            x = max_pool_3x3_s2(jax.nn.relu(self.norm0(x)))
        return x

    def stages(self) -> list[tuple[DenseBlock, Transition | None]]:
        """Each dense block with the transition after it (None after the last)."""
        return [(getattr(self, f"denseblock{i}"), getattr(self, f"transition{i}", None))
                for i in range(1, self.num_blocks + 1)]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.feature_maps(x, (self.num_blocks - 1,))[0]

    def feature_maps(self, x: jax.Array, out_indices: tuple[int, ...]) -> list[jax.Array]:
        """The outputs of the dense blocks numbered ``out_indices`` (from 0); the last block's
        after norm5, as torchvision's ``features`` ends. Stops after the last one asked for."""
        x, maps = self.stem(x), []
        for i, (block, transition) in enumerate(self.stages()[:max(out_indices) + 1]):
            x = block(x)
            if transition is None:
                x = self.norm5(x)
            if i in out_indices:
                maps.append(x)
            if transition is not None and i < max(out_indices):
                x = transition(x)
        return maps


class DenseNet(nnx.Module):
    """A DenseNet classifier. ``model(x)`` maps NHWC images to logits; ``model.eval()`` for inference.

    Built from a :class:`DenseNetConfig`; see :func:`densenet_jax.create_model` for named ones.
    """

    def __init__(self, config: DenseNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.features = Features(config, rngs=rngs)
        self.classifier = Linear(config.num_features, config.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input(x, self.config)
        with named_layer_errors(self):
            x = jax.nn.relu(self.features(x))
        return self.classifier(jnp.mean(x, axis=(1, 2)))

    def feature_maps(self, x: jax.Array, out_indices: tuple[int, ...] | None = None) -> list[jax.Array]:
        """Backbone features: the output of each dense block in ``out_indices`` (default: all),
        NHWC; see :func:`densenet_jax.feature_info` for their channels and strides."""
        check_input(x, self.config)
        with named_layer_errors(self):
            return self.features.feature_maps(x, check_out_indices(out_indices, self.config))


def check_out_indices(out_indices, config: DenseNetConfig) -> tuple[int, ...]:
    """``out_indices`` as a sorted tuple of valid dense-block numbers (default: every block)."""
    blocks = len(config.block_config)
    if out_indices is None:
        return tuple(range(blocks))
    chosen = tuple(sorted(set(int(i) % blocks if -blocks <= int(i) < 0 else int(i) for i in out_indices)))
    if not chosen or chosen[0] < 0 or chosen[-1] >= blocks:
        raise ValueError(f"out_indices {tuple(out_indices)}: this DenseNet has dense blocks 0..{blocks - 1}")
    return chosen


def smallest_input(config: DenseNetConfig) -> int:
    """The smallest height/width that leaves every transition's pooling at least one pixel."""
    def final_size(size):
        if config.stem == "imagenet":
            size = (size - 1) // 2 + 1  # 7x7/2 conv, pad 3
            size = (size - 1) // 2 + 1  # 3x3/2 max-pool, pad 1
        for _ in range(len(config.block_config) - 1):
            size //= 2
        return size

    size = 1
    while final_size(size) < 1:
        size += 1
    return size


def check_input(x: jax.Array, config: DenseNetConfig) -> None:
    """Refuse, while tracing, what the model cannot take: wrong rank, channels, dtype or size."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"DenseNet takes NHWC images with 3 channels, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"DenseNet takes floating-point images, got {x.dtype} "
                        "(scale and normalise uint8 images first)")
    minimum = smallest_input(config)
    if min(x.shape[1:3]) < minimum:
        raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} are too small for this DenseNet: "
                         f"at least {minimum}x{minimum}")


def _named(name: str, doc: str) -> type[DenseNet]:
    def __init__(self, *, num_classes: int = 1000, memory_efficient: bool = False,
                 drop_rate: float = 0.0, rngs: nnx.Rngs):
        config = get_config(name, num_classes=num_classes, memory_efficient=memory_efficient,
                            drop_rate=drop_rate)
        DenseNet.__init__(self, config, rngs=rngs)

    cls_name = name.replace("densenet", "DenseNet")
    return type(cls_name, (DenseNet,), {"__init__": __init__, "__doc__": doc,
                                        "__module__": __name__, "__qualname__": cls_name})


DenseNet121 = _named("densenet121", "torchvision's densenet121: k=32, blocks (6, 12, 24, 16), 8.0M params.")
DenseNet169 = _named("densenet169", "torchvision's densenet169: k=32, blocks (6, 12, 32, 32), 14.1M params.")
DenseNet201 = _named("densenet201", "torchvision's densenet201: k=32, blocks (6, 12, 48, 32), 20.0M params.")
DenseNet161 = _named("densenet161", "torchvision's densenet161: k=48, blocks (6, 12, 36, 24), 28.7M params.")


def create_model(name: str, *, rngs: nnx.Rngs | None = None, features_only: bool = False,
                 out_indices: tuple[int, ...] | None = None, **overrides):
    """Build a registered model (see :func:`list_models`), e.g. ``create_model("densenet_bc_100_k12",
    num_classes=100, rngs=nnx.Rngs(0))``. ``overrides`` replace fields of its DenseNetConfig.

    ``features_only=True`` gives the backbone instead (:class:`densenet_jax.DenseNetFeatures`),
    returning the dense blocks' feature maps ``out_indices`` (default: all).
    """
    model = DenseNet(get_config(name, **overrides), rngs=rngs if rngs is not None else nnx.Rngs(0))
    if features_only:
        from densenet_jax.backbone import DenseNetFeatures
        return DenseNetFeatures(model, out_indices)
    return model

"""DenseNet (Huang et al., CVPR 2017) in Flax NNX, laid out like torchvision's and timm's ``densenet.py``.

Module names follow their state-dict paths (``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``classifier``), so every torchvision or timm weight has an obvious
twin. The stem variants and anti-aliasing are in stem.py.
Inputs are NHWC; each layer computes in the dtype of its input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.model.layers import (BatchNorm, Conv2d, Linear, SingleValueStatistics, avg_pool_2x2,
                                       named_layer_errors, sample_count)
from densenet_jax.model.registry import get_config
from densenet_jax.model.remat import BOTTLENECK, efficient_block, layer_features
from densenet_jax.model.stem import Pool, pooled_size, stem_layers, stem_pool, transition_pool


class DenseLayer(nnx.Module):
    """BN-ReLU-Conv1x1 (the bottleneck, to bn_size*k channels) then BN-ReLU-Conv3x3 to k channels.

    Without a bottleneck (bn_size None) the layer is BN-ReLU-Conv3x3, held as norm1/conv1.
    The layer reads the concatenation of all earlier feature maps in its block. Inside a
    memory-efficient :class:`DenseBlock` the block differentiates its layers itself (remat.py); a
    layer called on its own with ``memory_efficient`` keeps only the bottleneck's output for the
    backward pass (a ``jax.checkpoint`` policy).
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
        def new_features(features):
            return layer_features(self.parts(), jnp.concatenate(features, axis=-1))

        if self.memory_efficient:
            new_features = jax.checkpoint(new_features, policy=_KEEP_BOTTLENECK)
        out, stats = new_features(features)
        # Updated here, once, outside the checkpoint: recomputation in the backward pass must not
        # move the running statistics a second time.
        self.update_running(stats, features[0].shape)
        if self.dropout is not None:
            out = self.dropout(out)
        return out

    def parts(self):
        """The layer's modules that hold weights: norm1, conv1, norm2, conv2 (the last two None
        without a bottleneck)."""
        return self.norm1, self.conv1, self.norm2, self.conv2

    def update_running(self, stats, input_shape: tuple[int, ...]) -> None:
        """Move the norms' running statistics with the batch statistics ``stats`` of an input of
        ``input_shape`` (None entries: a norm in eval mode)."""
        for norm, batch_stats in zip((self.norm1, self.norm2), stats):
            if batch_stats is not None:
                norm.update_running(*batch_stats, sample_count(input_shape, norm.axis_name))


# A layer on its own with memory_efficient keeps only the bottleneck convolution's output: the
# concatenation, both BN-ReLUs and the 1x1 convolution are recomputed in the backward pass.
_KEEP_BOTTLENECK = jax.checkpoint_policies.save_only_these_names(BOTTLENECK)


class DenseBlock(nnx.Module):
    """``num_layers`` dense layers, each fed every feature map before it; returns their concatenation.

    With ``memory_efficient`` the block's backward pass recomputes one layer at a time from the
    block's output (remat.py): what it keeps grows linearly with depth, not quadratically.
    """

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int | None,
                 drop_rate: float, memory_efficient: bool, *, rngs: nnx.Rngs):
        self.num_layers = num_layers
        self.memory_efficient = memory_efficient
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate,
                               memory_efficient, rngs=rngs)
            setattr(self, f"denselayer{i + 1}", layer)

    def layers(self) -> list[DenseLayer]:
        """The dense layers, in order."""
        return [getattr(self, f"denselayer{i + 1}") for i in range(self.num_layers)]

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.memory_efficient:
            return self._efficient(x)
        features = [x]
        for layer in self.layers():
            features.append(layer(features))
        return jnp.concatenate(features, axis=-1)

    def _efficient(self, x: jax.Array) -> jax.Array:
        layers = self.layers()
        # Refused here, where the layer is known by its path; each layer sees x's batch and size.
        for layer in layers:
            for norm in layer.parts()[::2]:
                if norm is not None and not norm.use_running_average and sample_count(x.shape, norm.axis_name) == 1:
                    raise SingleValueStatistics(norm, tuple(x.shape[:-1]) + (norm.scale.shape[0],))
        out, stats = efficient_block([layer.parts() for layer in layers], [layer.dropout for layer in layers], x)
        for layer, layer_stats in zip(layers, stats):
            layer.update_running(layer_stats, x.shape)
        return out


class Transition(nnx.Module):
    """BN-ReLU-Conv1x1 (compressing the channels) then downsampling (``pool``: torchvision's 2x2
    average pooling, or timm's blur pool), between dense blocks.

    The pooling runs before the 1x1 convolution: both pools are linear and act on each channel
    alone, the convolution mixes channels pixel by pixel, so the result is the same (torch's
    floor-mode average pooling and the blur's reflect padding included), and the convolution does a
    quarter of the work.
    """

    def __init__(self, in_channels: int, out_channels: int, *, pool: Pool = avg_pool_2x2,
                 rngs: nnx.Rngs):
        self.norm = BatchNorm(in_channels)
        self.conv = Conv2d(in_channels, out_channels, 1, rngs=rngs)
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.pool(jax.nn.relu(self.norm(x))))


class Trunk(nnx.Module):
    """Everything before the classifier, held as ``model.features`` where torchvision and timm
    hold their ``features`` Sequential: the stem, dense blocks with transitions between, and norm5.
    Calling it gives torchvision's ``features`` output: norm5, before its ReLU."""

    def __init__(self, config: DenseNetConfig, *, rngs: nnx.Rngs):
        layers = stem_layers(config, rngs=rngs)
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.num_stem_convs = len(config.stem_channels())
        self.stem_pool = stem_pool(config)
        plan = config.block_channels()
        for i, ((block_in, block_out), num_layers) in enumerate(zip(plan, config.block_config)):
            setattr(self, f"denseblock{i + 1}", DenseBlock(
                num_layers, block_in, config.growth_rate, config.bn_size, config.drop_rate,
                config.memory_efficient, rngs=rngs))
            if i < len(plan) - 1:
                setattr(self, f"transition{i + 1}", Transition(
                    block_out, config.transition_channels(block_out), pool=transition_pool(config),
                    rngs=rngs))
        self.norm5 = BatchNorm(config.num_features)
        self.num_blocks = len(plan)

    def stem_output(self, x: jax.Array) -> jax.Array:
        """The stem before its pooling: each conv{i} with its BN-ReLU (the CIFAR stem: conv0 alone).
        This is timm's first feature map."""
        for i in range(self.num_stem_convs):
            x = getattr(self, f"conv{i}")(x)
            norm = getattr(self, f"norm{i}", None)
            if norm is not None:
                x = jax.nn.relu(norm(x))
        return x

    def stages(self) -> list[tuple[DenseBlock, Transition | None]]:
        """Each dense block with the transition after it (None after the last)."""
        return [(getattr(self, f"denseblock{i}"), getattr(self, f"transition{i}", None))
                for i in range(1, self.num_blocks + 1)]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._stage_outputs(x, self.num_blocks)[-1]

    def feature_maps(self, x: jax.Array, out_indices: tuple[int, ...]) -> list[jax.Array]:
        """timm's ``features_only`` maps ``out_indices`` (sorted, valid): stage 0 is the stem's
        output before pooling, stage i the output of dense block i, the last after norm5 and
        ReLU. Stops after the last one asked for."""
        outputs = self._stage_outputs(x, max(out_indices))
        if self.num_blocks in out_indices:
            outputs[self.num_blocks] = jax.nn.relu(outputs[self.num_blocks])
        return [outputs[i] for i in out_indices]

    def _stage_outputs(self, x: jax.Array, last: int) -> list[jax.Array]:
        """The outputs of stages 0..last, the final one after norm5 (before its ReLU)."""
        x = self.stem_output(x)
        outputs = [x]
        if last > 0 and self.stem_pool is not None:
            x = self.stem_pool(x)
        for i, (block, transition) in enumerate(self.stages()[:last], start=1):
            x = block(x)
            if transition is None:
                x = self.norm5(x)
            outputs.append(x)
            if i < last:
                x = transition(x)
        return outputs


class DenseNet(nnx.Module):
    """A DenseNet classifier. ``model(x)`` maps NHWC images to logits, (N, num_classes), or to the
    pooled features, (N, num_features), when ``num_classes`` is 0; ``model.eval()`` for inference.

    Built from a :class:`DenseNetConfig`; see :func:`densenet_jax.create_model` for named ones.
    timm's habits: ``model(x) == model.forward_head(model.forward_features(x))``;
    ``forward_features`` ends after norm5 and its ReLU (timm's ``features``), while
    ``model.features(x)`` is torchvision's ``features`` (norm5 before the ReLU).
    ``pretrained_cfg``: the preprocessing its weights expect (a
    :class:`densenet_jax.model.pretrained_cfg.PretrainedCfg`), None when unknown (random init);
    ``class_names``: its classes' names, when its weights record them (a training run's do);
    ``multi_label``: its outputs are independent labels, each read through a sigmoid, not the
    classes of one softmax (weights trained on multi-label data record it).
    """

    pretrained_cfg = None
    class_names = None
    multi_label = False

    def __init__(self, config: DenseNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.features = Trunk(config, rngs=rngs)
        self.head_drop = nnx.Dropout(config.head_drop_rate, rngs=rngs) if config.head_drop_rate > 0 else None
        # num_classes=0: no classifier (timm's convention); the model returns the pooled features.
        self.classifier = (Linear(config.num_features, config.num_classes, rngs=rngs)
                           if config.num_classes else None)

    @property
    def num_features(self) -> int:
        """Channels of the final feature map and of the pooled features the classifier reads."""
        return self.config.num_features

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The final feature map, NHWC (N, H/32, W/32, num_features) for the ImageNet stems, after
        norm5 and ReLU, as timm's ``forward_features``."""
        check_input(x, self.config)
        with named_layer_errors(self):
            return jax.nn.relu(self.features(x))

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Global average pooling, head dropout (``head_drop_rate``, in training) and the
        classifier: (N, H, W, num_features) -> logits (N, num_classes), or with ``pre_logits``
        the pooled features (N, num_features), which is also what a model without a classifier
        (``num_classes=0``) returns."""
        x = jnp.mean(x, axis=(1, 2))
        if self.head_drop is not None:
            x = self.head_drop(x)
        return x if pre_logits or self.classifier is None else self.classifier(x)

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        """A fresh ``num_classes``-way classifier (torch's default init, from ``rngs``), as timm's
        ``reset_classifier``; ``config.num_classes`` follows; 0 removes the classifier (the model
        then returns the pooled features). Raises ValueError for a negative or non-integer count."""
        config = self.config.replace(num_classes=num_classes)
        self.classifier = (Linear(self.num_features, num_classes, rngs=rngs if rngs is not None else nnx.Rngs(0))
                           if num_classes else None)
        self.config = config

    def feature_maps(self, x: jax.Array, out_indices=None) -> list[jax.Array]:
        """Backbone features as timm's ``features_only`` gives them (see
        :func:`densenet_jax.feature_info` for the stages, their channels and strides), NHWC."""
        check_input(x, self.config)
        with named_layer_errors(self):
            return self.features.feature_maps(x, check_out_indices(out_indices, self.config))


def check_out_indices(out_indices, config: DenseNetConfig) -> tuple[int, ...]:
    """``out_indices`` as timm reads them, as a sorted tuple of stage numbers: None for every stage,
    an int n for the last n, or stage numbers (negative ones count from the end). Stage 0 is the
    stem, stage i dense block i. Raises ValueError for numbers out of range."""
    stages = len(config.block_config) + 1
    if out_indices is None:
        return tuple(range(stages))
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= stages:
            raise ValueError(f"out_indices {out_indices}: this DenseNet has {stages} stages to take "
                             "the last of")
        out_indices = tuple(range(-out_indices, 0))
    chosen = tuple(sorted({int(i) % stages if -stages <= int(i) < 0 else int(i) for i in out_indices}))
    if not chosen or chosen[0] < 0 or chosen[-1] >= stages:
        raise ValueError(f"out_indices {out_indices}: this DenseNet has stages 0..{stages - 1} "
                         "(0: the stem, i: dense block i)")
    return chosen


def smallest_input(config: DenseNetConfig) -> int:
    """The smallest height/width that leaves every stage at least one pixel (and two wherever a
    blur pool's reflect padding needs them)."""
    def final_size(size):
        if config.stem != "cifar":
            size = (size - 1) // 2 + 1  # the stem's stride-2 conv (7x7 pad 3, or 3x3 pad 1)
        size = pooled_size(stem_pool(config), size)
        for _ in range(len(config.block_config) - 1):
            size = size and pooled_size(transition_pool(config), size)
        return size

    size = 1
    while not final_size(size):
        size += 1
    return size


def check_input(x: jax.Array, config: DenseNetConfig) -> None:
    """Refuse, while tracing, what the model cannot take: wrong rank, channels, dtype or size."""
    if x.ndim != 4 or x.shape[-1] != config.in_chans:
        raise ValueError(f"DenseNet takes NHWC images with {config.in_chans} channels, got shape "
                         f"{tuple(x.shape)}")
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


_DROP = " drop_rate: dropout after each dense layer (torchvision's)."
DenseNet121 = _named("densenet121", "torchvision's densenet121: k=32, blocks (6, 12, 24, 16), 8.0M params." + _DROP)
DenseNet169 = _named("densenet169", "torchvision's densenet169: k=32, blocks (6, 12, 32, 32), 14.1M params." + _DROP)
DenseNet201 = _named("densenet201", "torchvision's densenet201: k=32, blocks (6, 12, 48, 32), 20.0M params." + _DROP)
DenseNet161 = _named("densenet161", "torchvision's densenet161: k=48, blocks (6, 12, 36, 24), 28.7M params." + _DROP)

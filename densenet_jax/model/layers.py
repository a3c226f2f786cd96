"""The primitives DenseNet is built from, with torch's (and timm's) semantics.

Flax's own Conv/BatchNorm/Linear differ from torch where parity needs them not to: BatchNorm keeps a
biased running variance, and dtype promotion would compute bf16 inputs in fp32. Here every layer
computes in the dtype of its input (parameters are cast to it), and BatchNorm follows torch exactly:
momentum 0.1 on the torch convention, epsilon 1e-5, unbiased running variance, two-pass statistics.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _random(key: jax.Array, shape: tuple[int, ...], kind: str, scale: float) -> jax.Array:
    """``scale`` * standard normal, or uniform on [-scale, scale], as float32 of ``shape``.

    Drawn on the host from a generator seeded by the JAX key, because XLA would compile one
    sampling program per kernel shape, and a DenseNet has dozens of shapes (docs/performance.md).
    Under a trace (e.g. ``nnx.eval_shape``) the key has no value, and JAX's own sampler is used.
    """
    if isinstance(key, jax.core.Tracer):
        if kind == "normal":
            return scale * jax.random.normal(key, shape, jnp.float32)
        return jax.random.uniform(key, shape, jnp.float32, -scale, scale)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    if kind == "normal":
        values = scale * rng.standard_normal(shape, np.float32)
    else:
        values = rng.uniform(-scale, scale, shape).astype(np.float32)
    return jnp.asarray(values)


class Conv2d(nnx.Module):
    """A bias-free 2-D convolution, NHWC input, HWIO kernel, explicit symmetric padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: int = 0, rngs: nnx.Rngs):
        fan_in = in_channels * kernel_size * kernel_size
        # torchvision's DenseNet: kaiming_normal_ with its defaults, std = sqrt(2 / fan_in).
        std = math.sqrt(2.0 / fan_in)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(_random(rngs.params(), shape, "normal", std))
        self.stride = stride
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(x, self.kernel[...], self.stride, self.padding)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """NHWC x HWIO convolution with torch's symmetric zero padding."""
    kernel = kernel.astype(x.dtype)
    if kernel.shape[:2] == (1, 1) and stride == 1 and padding == 0:
        # A 1x1 convolution is a matrix product over channels, and XLA's CPU backend runs a dot
        # faster than the same convolution (docs/performance.md).
        return pointwise_conv(x, kernel[0, 0])
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def pointwise_conv(x: jax.Array, weight: jax.Array) -> jax.Array:
    """A 1x1 convolution as a product over channels: NHWC x (C, D) -> NHWD."""
    return jnp.einsum("nhwc,cd->nhwd", x, weight)


def _pointwise_forward(x, weight):
    return pointwise_conv(x, weight), (x, weight)


def _pointwise_backward(residuals, grad):
    # Both gradients from one transposed copy of the output gradient, (D, N*H*W): XLA's CPU dot
    # wants its right operand contracted on the minor axis, and left to itself transposes the
    # output gradient for the weight gradient anyway, so one copy serves both.
    x, weight = residuals
    grad_t = grad.reshape(-1, grad.shape[-1]).T
    d_weight = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), grad_t, (((0,), (1,)), ((), ())))
    d_x = jax.lax.dot_general(grad_t, weight, (((0,), (1,)), ((), ())))
    return d_x.reshape(x.shape), d_weight


pointwise_conv.defvjp(_pointwise_forward, _pointwise_backward)


class BatchNorm(nnx.Module):
    """BatchNorm2d over the channel (last) axis, as torch computes and updates it.

    ``axis_name`` makes the batch statistics global across a ``pmap``/``shard_map`` axis.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 axis_name: str | None = None):
        # From numpy, for the reason given in _random: jnp.ones compiles once per shape.
        ones, zeros = np.ones(num_features, np.float32), np.zeros(num_features, np.float32)
        self.scale = nnx.Param(jnp.asarray(ones))
        self.bias = nnx.Param(jnp.asarray(zeros))
        self.mean = nnx.BatchStat(jnp.asarray(zeros))
        self.var = nnx.BatchStat(jnp.asarray(ones))
        self.momentum = momentum
        self.epsilon = epsilon
        self.axis_name = axis_name
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        y, stats = self.apply(x)
        if stats is not None:
            self.update_running(*stats, sample_count(x.shape, self.axis_name))
        return y

    def apply(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Normalise ``x`` without touching the running statistics; in training, also return the
        batch statistics used, for :meth:`update_running`. Pure, so it can be recomputed."""
        if self.use_running_average:
            stats, returned = (self.mean[...], self.var[...]), None
        else:
            if sample_count(x.shape, self.axis_name) == 1:
                raise SingleValueStatistics(self, tuple(x.shape))
            stats = returned = batch_statistics(x, self.axis_name)
        return normalize(x, *stats, self.scale[...], self.bias[...], self.epsilon), returned

    def update_running(self, mean: jax.Array, var: jax.Array, count: int) -> None:
        """torch's update: the running variance takes the unbiased batch variance."""
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        # set_value, not [...] =: the latter compares shardings, and asking a tracer for its sharding
        # builds an error message by walking the whole trace, most of a train step's tracing time.
        self.mean.set_value(((1 - m) * self.mean[...] + m * mean).astype(self.mean.dtype))
        self.var.set_value(((1 - m) * self.var[...] + m * unbiased).astype(self.var.dtype))


class SingleValueStatistics(ValueError):
    """A train-mode BatchNorm got one value per channel (batch 1 reaching a 1x1 map): its batch
    statistics would normalise every value to exactly 0, silently. torch refuses the same input
    ("Expected more than 1 value per channel when training"). ``module`` is the BatchNorm at fault;
    :func:`named_layer_errors` puts its path into the message."""

    def __init__(self, module: BatchNorm, shape: tuple[int, ...], name: str = "a BatchNorm"):
        self.module, self.shape = module, shape
        super().__init__(f"{name} in train mode gets input of shape {shape}: one value per channel, "
                         "which its batch statistics would normalise to 0; train with a larger batch "
                         "or larger images (or in eval mode)")


@contextlib.contextmanager
def named_layer_errors(root: nnx.Module):
    """Re-raise a :class:`SingleValueStatistics` from inside ``root`` with the layer's path in
    ``root`` (e.g. ``features.denseblock4.denselayer1.norm1``), which the layer cannot know."""
    try:
        yield
    except SingleValueStatistics as e:
        name = next((".".join(map(str, path)) for path, node in nnx.iter_graph(root) if node is e.module),
                    "a BatchNorm")
        raise SingleValueStatistics(e.module, e.shape, name) from None


def sample_count(shape: tuple[int, ...], axis_name: str | None = None) -> int:
    """How many values each channel's batch statistics average over."""
    count = math.prod(shape[:-1])
    return count * jax.lax.axis_size(axis_name) if axis_name is not None else count


def batch_statistics(x: jax.Array, axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over N, H, W (and the devices along ``axis_name``).

    Two passes (mean, then mean of squared deviations) rather than E[x^2] - E[x]^2, which loses
    precision when a channel's mean is large against its spread. Statistics are at least fp32.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(x - mean), axes)
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return mean, var


def normalize(x, mean, var, scale, bias, epsilon):
    """(x - mean) / sqrt(var + eps) * scale + bias, folded to one multiply-add in x's dtype."""
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    mul = scale.astype(stats_dtype) * jax.lax.rsqrt(var.astype(stats_dtype) + epsilon)
    add = bias.astype(stats_dtype) - mean.astype(stats_dtype) * mul
    return x * mul.astype(x.dtype) + add.astype(x.dtype)


class Linear(nnx.Module):
    """A dense layer, (in, out) kernel; torch's default uniform init, zero bias as torchvision sets."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        self.kernel = nnx.Param(_random(rngs.params(), (in_features, out_features), "uniform", bound))
        self.bias = nnx.Param(jnp.asarray(np.zeros(out_features, np.float32)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch's MaxPool2d(3, stride=2, padding=1): the padding is -inf, never zero.

    Written as an explicit -inf pad then Flax's unpadded max-pool, not one padded
    ``lax.reduce_window``: XLA folds the pad back into the window (the compiled forward and backward
    programs are the same), and jax2onnx exports ``nnx.max_pool`` as ONNX's 2-D MaxPool, where it
    turns a bare NHWC ``reduce_window`` into a 4-D MaxPool over (N, H, W, C) that onnxruntime
    refuses ("Unsupported pooling size": it pools over 1 to 3 dimensions).
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


def max_pool_3x3_s1(x: jax.Array) -> jax.Array:
    """torch's MaxPool2d(3, stride=1, padding=1) (timm's anti-aliased stem): -inf padding."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


def blur_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """timm's BlurPool2d with its defaults (filt_size 3, stride 2, pad_mode 'reflect'), NHWC.

    Each channel is padded by one pixel on every side by reflection (the edge pixel not repeated,
    as torch's ``F.pad(mode='reflect')``), blurred with the binomial filter [1, 2, 1] / 4 along
    height and width, and sampled at stride 2: (H, W) -> ((H - 1) // 2 + 1, (W - 1) // 2 + 1).
    Needs H, W >= 2. Written as two separable strided sums, not a grouped convolution: the same
    weights, and no per-channel kernel to hold.
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return _binomial_s2(_binomial_s2(x, 1), 2)


def _binomial_s2(x: jax.Array, axis: int) -> jax.Array:
    """(a + 2b + c) / 4 over each window of 3 along ``axis``, windows at stride 2 (no padding)."""
    out = (x.shape[axis] - 3) // 2 + 1

    def taps(start):
        return jax.lax.slice_in_dim(x, start, start + 2 * out - 1, stride=2, axis=axis)

    return (taps(0) + 2 * taps(1) + taps(2)) * jnp.asarray(0.25, x.dtype)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """torch's AvgPool2d(2, stride=2): an odd trailing row or column is dropped."""
    n, h, w, c = x.shape
    x = x[:, :h - h % 2, :w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

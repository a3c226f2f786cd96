"""The memory-efficient dense block: a backward pass that holds one layer's work at a time.

A dense block's layer i reads the concatenation of the block input and the i outputs before it, so
plain autodiff keeps, for every layer, its own normalised copy of that concatenation (and what the
BN-ReLU-conv1 made of it): memory quadratic in the depth. Per-layer ``jax.checkpoint`` only
changes what JAX lists as saved: XLA merges the recomputation back into the forward pass (see
"order" below), and the compiled program is no smaller.

Here the whole block is one ``jax.custom_vjp`` (Pleiss et al., "Memory-Efficient Implementation
of DenseNets", 2017, whose shared storage this is in JAX's terms):

* forward: the plain forward; the residuals are the block's output (the input and every layer's
  output, side by side in channels), each layer's bottleneck (its 1x1 convolution's 4k channels),
  the parameters and the dropout keys: all linear in depth. The BatchNorm batch statistics are
  returned to the caller, which updates the running statistics once, here and never in the
  backward pass.
* backward: one gradient buffer shaped like the block's output. Walking the layers from the last
  to the first, layer i's input is a channel prefix of the saved output; from it and the saved
  bottleneck only the norms and ReLUs are recomputed (batch statistics included, so that their
  gradient is there; dropout draws the same mask from the same key): differentiating a
  convolution needs its input, not its output, so neither convolution runs again, which keeps
  the extra time to elementwise work, as in Pleiss et al. The cotangent of the layer's own
  channels is read from the buffer and the gradient of its input added into the buffer's prefix.
  What lives at once is the output, the bottlenecks, the buffer and one layer's recomputation.
* order and live ranges: XLA merges identical computations (CSE), and a recomputation is one, so
  left to itself it drops the recomputation and keeps the forward's values alive until the
  backward pass, which is plain autodiff's memory again. ``lax.optimization_barrier`` (what
  ``jax.checkpoint`` relies on) does not prevent it on the CPU: its compiler removes the barriers
  before its last CSE. So each layer reads its input (and its bottleneck) through
  :func:`_tied`, an exact identity that depends on the gradient the later layers left: the recomputation cannot be merged into the forward pass, nor start
  before the later layers' gradients are done, and what lives at once stays bounded by
  construction, not by the scheduler's choice.

Collectives need nothing special: BatchNorm's ``axis_name`` mean under pmap/shard_map is recomputed
and differentiated inside the backward pass like any other operation.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from densenet_jax.model.layers import BatchNorm, Conv2d

# A dense layer's parts that carry weights: norm1, conv1, and norm2, conv2 (None without bottleneck).
LayerParts = tuple[BatchNorm, Conv2d, BatchNorm | None, Conv2d | None]

# The bottleneck's output: what a dense layer called on its own with memory_efficient keeps.
BOTTLENECK = "densenet_bottleneck"


def bottleneck(parts: LayerParts, x: jax.Array):
    """norm1-ReLU-conv1 of a dense layer's input ``x``, and norm1's batch statistics (None in eval
    mode): the bottleneck's 4k channels, or the new channels of a layer without bottleneck."""
    norm1, conv1, _, _ = parts
    y, stats = norm1.apply(x)
    return conv1(jax.nn.relu(y)), stats


def after_bottleneck(parts: LayerParts, b: jax.Array):
    """norm2-ReLU-conv2 of the bottleneck ``b``: the layer's new channels, and norm2's statistics."""
    _, _, norm2, conv2 = parts
    y, stats = norm2.apply(checkpoint_name(b, BOTTLENECK))
    return conv2(jax.nn.relu(y)), stats


def layer_features(parts: LayerParts, x: jax.Array):
    """A dense layer's new channels from its input ``x`` (the concatenation of earlier features),
    and the batch statistics of its norms (None in eval mode). Pure: nothing is updated."""
    out, stats1 = bottleneck(parts, x)
    if parts[3] is None:
        return out, (stats1,)
    out, stats2 = after_bottleneck(parts, out)
    return out, (stats1, stats2)


def efficient_block(parts: Sequence[LayerParts], dropouts: Sequence[nnx.Dropout | None], x: jax.Array):
    """A dense block's output (``x`` and each layer's new channels, concatenated) and each layer's
    batch statistics, differentiated as the module docstring says. ``dropouts``: each layer's
    dropout after its last convolution, or None; an active one draws its key here, once, as a plain
    call would."""
    keys = [d.rngs() if _active(d) else None for d in dropouts]
    graphdefs, weights = zip(*(nnx.split(p) for p in parts))
    weights = [nnx.as_pure(w) for w in weights]
    in_channels = [p[0].scale.shape[0] for p in parts]
    has_bottleneck = [p[3] is not None for p in parts]

    def first(i, w, inputs):
        return bottleneck(nnx.merge(graphdefs[i], w), inputs)[0]

    def rest(i, w, key, b):
        # What follows the first convolution: the bottleneck's second half, then dropout.
        out = after_bottleneck(nnx.merge(graphdefs[i], w), b)[0] if has_bottleneck[i] else b
        return dropouts[i](out, rngs=key) if key is not None else out

    def forward(weights, keys, x):
        features, all_stats, bottlenecks = [x], [], []
        for i, (w, key) in enumerate(zip(weights, keys)):
            layer = nnx.merge(graphdefs[i], w)
            b, stats1 = bottleneck(layer, jnp.concatenate(features, axis=-1))
            stats = (stats1,)
            if has_bottleneck[i]:
                bottlenecks.append(b)
                b, stats2 = after_bottleneck(layer, b)
                stats = (stats1, stats2)
            features.append(dropouts[i](b, rngs=key) if key is not None else b)
            all_stats.append(stats)
        return jnp.concatenate(features, axis=-1), all_stats, bottlenecks

    def forward_plain(weights, keys, x):
        out, stats, _ = forward(weights, keys, x)
        return out, stats

    def forward_saving(weights, keys, x):
        out, stats, bottlenecks = forward(weights, keys, x)
        return (out, stats), (weights, keys, out, bottlenecks)

    def backward(residuals, cotangents):
        weights, keys, out, bottlenecks = residuals
        # The statistics' cotangent is ignored: they reach the loss only through the running
        # statistics, which take them under stop_gradient.
        grad, _ = cotangents
        grads = [None] * len(weights)
        saved = iter(reversed(bottlenecks))
        for i in reversed(range(len(weights))):
            c = in_channels[i]
            end = out.shape[-1] if i + 1 == len(weights) else in_channels[i + 1]
            own = grad[..., c:end]
            # The layer's input read from the saved output, tied to the gradient the later layers
            # left (see _tied): recomputed here, after them, and never merged into the forward.
            inputs = _tied(out, own)[..., :c]
            if has_bottleneck[i]:
                # From the saved bottleneck only the norms and ReLUs are recomputed: neither
                # convolution's output is needed to differentiate it, so XLA drops both.
                b = _tied(next(saved), own)
                _, vjp_rest = jax.vjp(lambda w, b: rest(i, w, keys[i], b), weights[i], b)
                grad_rest, d_b = vjp_rest(own)
                _, vjp_first = jax.vjp(lambda w, inputs: first(i, w, inputs), weights[i], inputs)
                grad_first, d_inputs = vjp_first(d_b)
                grads[i] = jax.tree.map(jnp.add, grad_first, grad_rest)
            else:
                _, vjp = jax.vjp(lambda w, inputs: rest(i, w, keys[i], first(i, w, inputs)),
                                 weights[i], inputs)
                grads[i], d_inputs = vjp(own)
            grad = grad.at[..., :c].add(d_inputs)
        return grads, None, grad[..., :in_channels[0]]

    block = jax.custom_vjp(forward_plain)
    block.defvjp(forward_saving, backward)
    return block(weights, keys, x)


def _tied(x: jax.Array, other: jax.Array) -> jax.Array:
    """``x``, exactly, as a value that XLA sees depend on ``other`` (both NHWC, same batch).

    XLA merges identical computations (CSE), and a recomputation of the forward pass is one: left
    to itself it would drop the recomputation and keep the forward's values alive instead, which is
    what plain autodiff keeps. ``lax.optimization_barrier`` does not stop it on the CPU, whose
    compiler removes the barriers before its last CSE; a data dependence does. -0.0, built from
    one value of ``other`` per image, is added: x + (-0.0) is x for every x (zeros keep their sign,
    NaN stays NaN), so nothing changes but the program's graph, and XLA cannot fold it away
    (y * 0 is not 0 for every float y). Per image, so that a batch sharded across devices needs
    no communication for it.
    """
    s = other[:, 0, 0, 0]
    zero = -(jnp.abs(jnp.where(jnp.isfinite(s), s, 0)) * 0)
    return x + zero.astype(x.dtype)[:, None, None, None]


def _active(dropout: nnx.Dropout | None) -> bool:
    return dropout is not None and dropout.rate > 0 and not dropout.deterministic

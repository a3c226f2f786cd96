"""timm's optimizers, by ``create_optimizer_v2``'s names and with its semantics, as optax transformations.

Each is written from what timm's own optimizer computes (timm/optim), so that two steps give
torch's parameters: weight decay coupled to the gradient for SGD, RMSpropTF, LAMB and LARS,
decoupled for AdamW and Lion; RMSpropTF with its square average starting at one, epsilon inside
the square root and the learning rate inside the momentum buffer; LAMB dividing the gradients by
their global norm over 1.0 and adapting only the parameters it decays; LARS likewise.

The learning rate is a hyperparameter of the returned transformation (``optax.inject_hyperparams``),
so that the trainer sets it in the optimizer state at every step (:func:`set_learning_rate`) and
one compiled step serves every schedule.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

OPTIMIZERS = ("sgd", "nesterov", "momentum", "adamw", "rmsproptf", "lamb", "lars", "lion")
CLIP_MODES = ("norm", "value", "agc")
# timm's optimizer classes' own default rates, used when ``lr`` is None as timm does.
DEFAULT_LR = {"sgd": 1e-3, "nesterov": 1e-3, "momentum": 1e-3, "adamw": 1e-3, "rmsproptf": 1e-2,
              "lamb": 1e-3, "lars": 1.0, "lion": 1e-4}
_EPS = {"adamw": 1e-8, "rmsproptf": 1e-10, "lamb": 1e-6, "lars": 1e-8}
_EXTRA = {"rmsproptf": {"alpha"}, "lamb": {"max_grad_norm"}, "lars": {"trust_coeff", "nesterov"}}
_BETAS = {"adamw": (0.9, 0.999), "lamb": (0.9, 0.999), "lion": (0.9, 0.99)}


def _names(path) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def decay_mask(params, filter_bias_and_bn: bool = True):
    """True for each parameter that weight decay applies to: all of them, or with
    ``filter_bias_and_bn`` (timm's default) none of 1 dimension or named ``bias``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: not filter_bias_and_bn or (p.ndim > 1 and _names(path)[-1:] != ["bias"]), params)


def layer_ids(params) -> tuple[dict[str, int], int]:
    """timm's layer of each parameter for layer-wise decay (DenseNet's ``group_matcher``): the stem
    0, the n-th dense layer of the network n, a transition its block's last layer, and the final
    norm and classifier one beyond; with the number of the last layer."""
    names = [".".join(_names(path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    layers = sorted({(int(m[1]), int(m[2])) for n in names
                     if (m := re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", n))})
    index = {layer: i + 1 for i, layer in enumerate(layers)}
    last_of_block = {b: index[(b, l)] for b, l in layers}
    top = len(layers) + 1
    ids = {}
    for n in names:
        if re.match(r"features\.(conv|norm|pool)[012]\.", n):
            ids[n] = 0
        elif m := re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", n):
            ids[n] = index[(int(m[1]), int(m[2]))]
        elif m := re.match(r"features\.transition(\d+)\.", n):
            ids[n] = last_of_block[int(m[1])]
        else:
            ids[n] = top
    return ids, top


def scale_by_layer(params, layer_decay: float) -> optax.GradientTransformation:
    """Each update times ``layer_decay ** (top - layer)`` (timm's ``param_groups_layer_decay``)."""
    ids, top = layer_ids(params)

    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * jnp.asarray(layer_decay ** (top - ids[".".join(_names(path))]), u.dtype),
            updates), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


class RmsPropTFState(NamedTuple):
    """RMSpropTF's state per parameter: the average of squared gradients, and the momentum buffer
    (which holds the learning rate's scaling)."""

    square_avg: optax.Updates
    momentum: optax.Updates


def rmsprop_tf(learning_rate, alpha: float = 0.9, eps: float = 1e-10,
               momentum: float = 0.9) -> optax.GradientTransformation:
    """timm's RMSpropTF: square average from ones, ``g / sqrt(avg + eps)``, and the learning rate
    accumulated in the momentum buffer (TensorFlow's order), whose negation is the update."""
    def init(params):
        return RmsPropTFState(jax.tree.map(jnp.ones_like, params), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        square = jax.tree.map(lambda s, g: s + (1 - alpha) * (g * g - s), state.square_avg, grads)
        step = jax.tree.map(lambda g, s: g / jnp.sqrt(s + eps), grads, square)
        if momentum <= 0:
            return jax.tree.map(lambda u: -learning_rate * u, step), RmsPropTFState(square, state.momentum)
        buffer = jax.tree.map(lambda b, u: momentum * b + learning_rate * u, state.momentum, step)
        return jax.tree.map(jnp.negative, buffer), RmsPropTFState(square, buffer)
    return optax.GradientTransformation(init, update)


def divide_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """LAMB's own clipping: every gradient divided by ``max(global norm / max_norm, 1)``."""
    def update(grads, state, params=None):
        divisor = jnp.maximum(optax.tree.norm(grads) / max_norm, 1.0)
        return jax.tree.map(lambda g: g / divisor.astype(g.dtype), grads), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def lars_adapt(weight_decay: float, mask, trust_coeff: float = 1e-3,
               eps: float = 1e-8) -> optax.GradientTransformation:
    """LARS' scaling of each decayed parameter's gradient: ``(g + wd p) * trust_coeff |p| /
    (|g| + wd |p| + eps)`` (1 where either norm is 0); the others untouched."""
    def adapt(g, p, decayed):
        if not decayed:
            return g
        w, n = jnp.linalg.norm(p), jnp.linalg.norm(g)
        ratio = jnp.where((w > 0) & (n > 0), trust_coeff * w / (n + w * weight_decay + eps), 1.0)
        return (g + weight_decay * p) * ratio

    def update(grads, state, params):
        return jax.tree.map(adapt, grads, params, mask(params)), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: gradients times ``min(max_norm / (norm + 1e-6), 1)``."""
    def update(grads, state, params=None):
        factor = jnp.minimum(max_norm / (optax.tree.norm(grads) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def gradient_clipping(mode: str, value: float) -> optax.GradientTransformation:
    """timm's ``--clip-mode``: ``norm`` (global L2, torch's), ``value`` (each element to
    [-value, value]) or ``agc`` (adaptive, unit-wise, eps 1e-3: optax's equals timm's)."""
    if mode == "norm":
        return clip_by_global_norm(value)
    if mode == "value":
        return optax.clip(value)
    if mode == "agc":
        return optax.adaptive_grad_clip(value)
    raise ValueError(f"--clip-mode {mode!r}: must be one of {', '.join(CLIP_MODES)}")


def _direction(opt: str, learning_rate, weight_decay: float, momentum: float, mask: Callable,
               eps: float | None, betas, **kwargs) -> optax.GradientTransformation:
    """``opt``'s update, learning rate included."""
    eps = _EPS.get(opt) if eps is None else eps
    b1, b2 = betas or _BETAS.get(opt, (None, None))
    decay = optax.add_decayed_weights(weight_decay, mask)
    lr = optax.scale_by_learning_rate(learning_rate)
    if opt in ("sgd", "nesterov", "momentum"):
        return optax.chain(decay, optax.trace(momentum, nesterov=opt != "momentum"), lr)
    if opt == "adamw":
        return optax.chain(optax.scale_by_adam(b1, b2, eps), decay, lr)
    if opt == "rmsproptf":
        return optax.chain(decay, rmsprop_tf(learning_rate, kwargs.get("alpha", 0.9), eps, momentum))
    if opt == "lamb":
        max_norm = kwargs.get("max_grad_norm", 1.0)
        adapt = (lambda p: jax.tree.map(lambda _: False, p)) if weight_decay == 0 else mask
        return optax.chain(divide_by_global_norm(max_norm) if max_norm else optax.identity(),
                           optax.scale_by_adam(b1, b2, eps), decay,
                           optax.masked(optax.scale_by_trust_ratio(), adapt), lr)
    if opt == "lars":
        decayed = (lambda p: jax.tree.map(lambda _: False, p)) if weight_decay == 0 else mask
        return optax.chain(lars_adapt(weight_decay, decayed, kwargs.get("trust_coeff", 1e-3), eps),
                           optax.trace(momentum, nesterov=kwargs.get("nesterov", False)), lr)
    if opt == "lion":
        return optax.chain(optax.scale_by_lion(b1, b2), decay, lr)
    raise ValueError(f"--opt {opt!r}: must be one of {', '.join(OPTIMIZERS)}")


def create_optimizer(model, opt: str = "sgd", lr: float | optax.Schedule | None = None,
                     weight_decay: float = 0.0, momentum: float = 0.9, *, filter_bias_and_bn: bool = True,
                     eps: float | None = None, betas: tuple[float, float] | None = None,
                     clip_grad: float | None = None, clip_mode: str = "norm", grad_accum_steps: int = 1,
                     layer_decay: float | None = None, **kwargs) -> optax.GradientTransformation:
    """timm's ``create_optimizer_v2`` for a DenseNet (an ``nnx.Module`` or its ``nnx.Param`` state),
    as an optax transformation for ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

    ``opt``: sgd and nesterov (SGD, Nesterov), momentum (SGD), adamw, rmsproptf, lamb, lars, lion.
    ``lr``: a rate or an optax schedule (None: the optimizer's own default, as timm's classes);
    ``weight_decay``: coupled or decoupled as timm's class for ``opt`` has it, not applied to
    1-dimensional parameters and biases while ``filter_bias_and_bn``; ``momentum`` for sgd,
    nesterov, momentum, rmsproptf and lars; ``eps`` and ``betas`` (timm's ``--opt-eps``,
    ``--opt-betas``) where the optimizer has them, else its default. ``clip_grad`` with
    ``clip_mode`` norm, value or agc clips the gradients first (timm's train.py);
    ``grad_accum_steps`` averages that many gradients before each update (optax.MultiSteps);
    ``layer_decay`` scales each layer's rate by timm's layer-wise decay. ``kwargs``: timm's
    optimizer-specific ones: ``alpha`` (rmsproptf), ``max_grad_norm`` (lamb), ``trust_coeff`` and
    ``nesterov`` (lars).

    ValueError naming the option for an unknown ``opt`` or ``clip_mode``; TypeError for a keyword
    ``opt`` does not take.
    """
    if opt not in OPTIMIZERS:
        raise ValueError(f"--opt {opt!r}: must be one of {', '.join(OPTIMIZERS)}")
    if unknown := set(kwargs) - _EXTRA.get(opt, set()):
        raise TypeError(f"create_optimizer: {opt} takes no {', '.join(sorted(unknown))}")
    params = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
    mask = lambda p: decay_mask(p, filter_bias_and_bn)  # noqa: E731 (a mask is a function of the tree)

    def build(learning_rate):
        parts = [gradient_clipping(clip_mode, clip_grad)] if clip_grad else []
        parts.append(_direction(opt, learning_rate, weight_decay, momentum, mask, eps, betas, **kwargs))
        if layer_decay is not None:
            parts.append(scale_by_layer(params, layer_decay))
        return optax.chain(*parts)

    tx = optax.inject_hyperparams(build)(learning_rate=DEFAULT_LR[opt] if lr is None else lr)
    if grad_accum_steps > 1:
        dtype = jax.tree.leaves(params)[0].dtype
        tx = optax.MultiSteps(tx, grad_accum_steps, accumulator_dtype=dtype).gradient_transformation()
    return tx


def set_learning_rate(opt_state, lr: jax.Array):
    """``opt_state`` with its learning rate, wherever :func:`create_optimizer` keeps it, set to
    ``lr`` (cast to the stored rate's dtype)."""
    def put(node):
        if isinstance(node, optax.InjectStatefulHyperparamsState):
            old = node.hyperparams["learning_rate"]
            return node._replace(hyperparams={**node.hyperparams, "learning_rate": jnp.asarray(lr, old.dtype)})
        return node
    return jax.tree.map(put, opt_state, is_leaf=lambda n: isinstance(n, optax.InjectStatefulHyperparamsState))

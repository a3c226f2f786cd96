"""An exponential moving average of the weights and BatchNorm statistics, as timm's ModelEmaV3.

timm's train.py calls ``ModelEmaV3.update(model, step=num_updates)`` after each optimizer update
(``num_updates`` counting that update), with the defaults ``update_after_step=0``,
``min_decay=0``, ``warmup_gamma=1``, ``warmup_power=2/3``: the first update copies the model, the
later ones move every floating-point tensor of the state dict (parameters and running statistics)
by ``1 - decay`` towards the model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WARMUP_POWER = 2 / 3  # timm's ModelEmaV3 default


def ema_decay(update: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The decay after update ``update`` (1 for the first): 0 at the first, then ``decay``, or
    with ``warmup`` ``1 - (1 + s) ** -2/3`` for ``s = update - 1``, at most ``decay``."""
    s = jnp.maximum(update - 1, 0).astype(jnp.float32 if not jax.config.jax_enable_x64 else jnp.float64)
    value = jnp.minimum(1 - (1 + s) ** -WARMUP_POWER, decay) if warmup else jnp.asarray(decay, s.dtype)
    return jnp.where(s <= 0, 0.0, jnp.maximum(value, 0.0))


def ema_update(average, current, decay: jax.Array):
    """``average`` moved by ``1 - decay`` towards ``current`` (same trees), in each leaf's dtype."""
    return jax.tree.map(lambda a, c: a + (1 - decay).astype(a.dtype) * (c - a), average, current)

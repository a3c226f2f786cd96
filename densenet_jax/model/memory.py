"""What a training step keeps for its backward pass: the measure that ``memory_efficient`` shrinks."""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i32": 4, "u32": 4, "i64": 8, "bool": 1}
_RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")


def saved_residuals(model: nnx.Module, x: jax.Array) -> list[tuple[int, str]]:
    """(bytes, description) of every array the gradient of ``model``'s train-mode loss keeps,
    leaving out the inputs and parameters themselves (they are held anyway).

    Found by tracing only (``jax.ad_checkpoint.print_saved_residuals``): nothing is computed, so it
    works for full-size models and batches on any machine.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        m.train()
        return jnp.sum(m(x).astype(jnp.float32))

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, params, rest, x)
    residuals = []
    for line in out.getvalue().splitlines():
        match = _RESIDUAL.match(line.strip())
        if not match or "from the argument" in match.group(3):
            continue
        dtype, dims, source = match.groups()
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        residuals.append((size * _DTYPE_BYTES[dtype], source))
    return residuals


def saved_residual_bytes(model: nnx.Module, x: jax.Array) -> int:
    """Total bytes of :func:`saved_residuals`."""
    return sum(nbytes for nbytes, _ in saved_residuals(model, x))

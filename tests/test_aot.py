"""Stored traces: a rerun loads the traced step instead of tracing it, and computes the same bits."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.train.trace_cache import StoredJit


def make_step(calls):
    def step(state, x):
        calls.append(1)  # runs only while tracing
        new = {"w": state["w"] - 0.1 * jnp.tanh(x @ state["w"]).sum(0), "n": state["n"] + 1}
        return new, {"loss": jnp.sum(new["w"] ** 2)}
    return step


def structure(state, x):
    return jax.tree.structure((state, {"loss": 0}))


def state():
    return {"w": jnp.arange(12.0).reshape(4, 3) / 10, "n": jnp.zeros((), jnp.int32)}


def test_a_rerun_loads_the_trace_and_computes_the_same(tmp_path, caplog):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
    reference = jax.jit(make_step([]))(state(), x)

    calls = []
    first = StoredJit(make_step(calls), tmp_path, "config A", structure)(state(), x)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.jaxexport"))) == 1
    calls.clear()
    again = StoredJit(make_step(calls), tmp_path, "config A", structure)(state(), x)
    assert calls == []  # loaded, not traced
    for a, b, c in zip(jax.tree.leaves(reference), jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(c, a)

    StoredJit(make_step(calls), tmp_path, "config B", structure)(state(), x)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.jaxexport"))) == 2  # another key
    StoredJit(make_step(calls), tmp_path, "config A", structure)(state(), x[:2])
    assert len(calls) == 2 and len(list(tmp_path.glob("*.jaxexport"))) == 3  # another shape

    for path in tmp_path.glob("*.jaxexport"):
        path.write_bytes(b"damaged")
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        out = StoredJit(make_step(calls), tmp_path, "config A", structure)(state(), x)
    assert len(calls) == 1 and "unreadable stored step" in caplog.text
    np.testing.assert_array_equal(out[1]["loss"], reference[1]["loss"])

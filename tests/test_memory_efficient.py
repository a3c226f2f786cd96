"""memory_efficient=True must change what is kept for the backward pass, and nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import densenet_jax as dj
from densenet_jax.model.memory import saved_residual_bytes
from densenet_jax.weights.format import assign, state_arrays

SMALL = dict(block_config=(3, 3, 3), growth_rate=8)


def twin_models(name="densenet_bc_100_k12", **overrides):
    plain = dj.create_model(name, memory_efficient=False, **SMALL, **overrides)
    efficient = dj.create_model(name, memory_efficient=True, **SMALL, **overrides)
    assign(efficient, {k: np.asarray(v) for k, v in state_arrays(plain).items()})
    return plain, efficient


def train_step(model, x, y):
    """Loss, gradients and the new state after one train-mode forward/backward."""
    model.train()

    @nnx.jit
    def step(model, x, y):
        def loss_fn(model):
            logits = model(x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = step(model, x, y)
    grads = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    return float(loss), grads, {k: np.asarray(v) for k, v in state_arrays(model).items()}


def test_same_loss_gradients_and_running_statistics(rng):
    """README, Memory-efficient mode: gradients to 1e-4 relative, BN running statistics to 1e-6, the
    statistics moved once."""
    x = rng.standard_normal((4, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 4)
    for name in ("densenet_bc_100_k12", "densenet_40_k12"):  # with and without the bottleneck
        plain, efficient = twin_models(name)
        loss_a, grads_a, state_a = train_step(plain, x, y)
        loss_b, grads_b, state_b = train_step(efficient, x, y)
        assert loss_a == loss_b or abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
        assert grads_a.keys() == grads_b.keys()
        for k in grads_a:
            np.testing.assert_allclose(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, err_msg=k)
        # The running statistics move exactly once per step, recomputation or not.
        for k in state_a:
            np.testing.assert_allclose(state_b[k], state_a[k], rtol=1e-6, atol=1e-7, err_msg=k)
        moved = state_a["features.denseblock1.denselayer1.norm1.mean"]
        assert np.abs(moved).max() > 0  # the step did update them


def test_same_outputs_in_eval(rng):
    plain, efficient = twin_models()
    plain.eval(), efficient.eval()
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(efficient(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-6)


def residual_bytes(memory_efficient, layers_per_block, **overrides):
    model = dj.create_model("densenet_bc_100_k12", growth_rate=8, memory_efficient=memory_efficient,
                            block_config=(layers_per_block,) * 3, **overrides)
    return saved_residual_bytes(model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))


def test_saved_residuals_shrink():
    ratio = residual_bytes(True, 8) / residual_bytes(False, 8)
    assert ratio < 0.3, ratio


def test_saved_residuals_grow_linearly_with_depth():
    """Plain: the saved concatenations make the bytes quadratic in depth; memory-efficient: linear."""
    def curvature(memory_efficient):
        b4, b8, b12 = (residual_bytes(memory_efficient, n) for n in (4, 8, 12))
        return (b12 - 2 * b8 + b4) / (b8 - b4)

    assert curvature(False) > 0.2
    assert abs(curvature(True)) < 0.02

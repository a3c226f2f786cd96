"""memory_efficient=True must change what is kept for the backward pass, and nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax.model.memory import saved_residual_bytes
from densenet_jax.train import optim, parallel
from densenet_jax.weights.format import assign, cast, state_arrays

SMALL = dict(block_config=(3, 3, 3), growth_rate=8)


def twin_models(name="densenet_bc_100_k12", **overrides):
    overrides = {**SMALL, **overrides}
    plain = dj.create_model(name, memory_efficient=False, **overrides)
    efficient = dj.create_model(name, memory_efficient=True, **overrides)
    assign(efficient, {k: np.asarray(v) for k, v in state_arrays(plain).items()})
    return plain, efficient


def train_step(model, x, y, dtype=None):
    """Loss, gradients and the new state after one train-mode forward/backward (computed in
    ``dtype``, by default the input's)."""
    model.train()

    @nnx.jit
    def step(model, x, y):
        def loss_fn(model):
            logits = model(x if dtype is None else x.astype(dtype)).astype(jnp.float32)
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


def test_dropout_draws_the_same_masks_in_the_recomputation(rng):
    """With dropout after each dense layer, the backward pass recomputes each layer with the mask
    its forward pass drew: the same loss, gradients and statistics as the plain model."""
    x = rng.standard_normal((4, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 4)
    plain, efficient = twin_models(block_config=(2, 2), drop_rate=0.5)
    loss_a, grads_a, state_a = train_step(plain, x, y)
    loss_b, grads_b, state_b = train_step(efficient, x, y)
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
    for k in grads_a:
        np.testing.assert_allclose(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for k in state_a:
        np.testing.assert_allclose(state_b[k], state_a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Each layer's dropout drew exactly one key, in both models: the masks were there.
    for model in (plain, efficient):
        assert int(model.features.denseblock2.denselayer2.dropout.rngs.count[...]) == 1


def test_float64_gradients_equal_the_plain_models(rng):
    """In float64 (where parity with torch is proven, porting-notes 9b) the recomputed backward
    pass gives the plain model's gradients and statistics to 1e-12."""
    x = rng.standard_normal((4, 32, 32, 3))
    y = rng.integers(0, 10, 4)
    with jax.enable_x64(True):
        plain, efficient = twin_models(block_config=(2, 2))
        cast(plain, jnp.float64), cast(efficient, jnp.float64)
        loss_a, grads_a, state_a = train_step(plain, x, y)
        loss_b, grads_b, state_b = train_step(efficient, x, y)
    assert abs(loss_a - loss_b) <= 1e-14 * abs(loss_a)
    for k in grads_a:
        assert grads_b[k].dtype == np.float64
        np.testing.assert_allclose(grads_b[k], grads_a[k], rtol=1e-12, atol=1e-15, err_msg=k)
    for k in state_a:
        np.testing.assert_allclose(state_b[k], state_a[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_bfloat16_gradients_near_the_plain_models(rng):
    """Computing in bfloat16, the recomputation changes the gradients far less than bfloat16 itself
    does (per leaf, BN's gradients are ill-conditioned at this size: porting-notes 9b, so the whole
    gradient is compared); the parameters' gradients stay float32."""
    x = rng.standard_normal((4, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 4)
    plain, efficient = twin_models(block_config=(2, 2))
    _, reference, _ = train_step(plain, x, y)
    _, grads_a, _ = train_step(plain, x, y, jnp.bfloat16)
    _, grads_b, _ = train_step(efficient, x, y, jnp.bfloat16)
    assert all(grads_b[k].dtype == np.float32 for k in grads_b)

    def flat(grads):
        return np.concatenate([grads[k].ravel() for k in sorted(grads)])

    def error(ours, theirs):
        return np.linalg.norm(flat(ours) - flat(theirs)) / np.linalg.norm(flat(theirs))

    assert np.isfinite(flat(grads_b)).all()
    assert error(grads_b, grads_a) < 0.1 * error(grads_a, reference)


def test_same_outputs_in_eval(rng):
    plain, efficient = twin_models()
    plain.eval(), efficient.eval()
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    # The same operations on the same values: not close, equal.
    np.testing.assert_array_equal(np.asarray(efficient(x)), np.asarray(plain(x)))


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


# Small enough to compile in a few seconds, deep enough that what plain autodiff keeps (each layer's
# own normalised concatenation) outweighs the block's output and gradient buffer.
ONE_BLOCK = dict(block_config=(6,), growth_rate=12, num_classes=10)


def user_step_temp_bytes(memory_efficient):
    """A user's train step: split the model, jax.jit a pure function of its state."""
    model = dj.create_model("densenet_bc_100_k12", memory_efficient=memory_efficient, **ONE_BLOCK)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, rest, x, y):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        grads = jax.grad(loss_fn)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    x, y = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32)
    return jax.jit(step).lower(params, rest, x, y).compile().memory_analysis().temp_size_in_bytes


def trainer_step_temp_bytes(memory_efficient):
    """The trainer's own step (train/step.py under train/parallel.py's mesh jit)."""
    model = dj.create_model("densenet_bc_100_k12", memory_efficient=memory_efficient, **ONE_BLOCK)
    runner = parallel.make("mesh", model, optim.sgd())
    state = runner.place_state(runner.steps.initial)
    images, labels = runner.place_batch(np.zeros((8, 16, 16, 3), np.float32), np.zeros(8, np.int32))
    compiled = runner._train.lower(state, runner.rest, images, labels, np.float32(0.1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("temp_bytes", [user_step_temp_bytes, trainer_step_temp_bytes],
                         ids=["user_jit_step", "trainer_step"])
def test_compiled_step_needs_less_temporary_memory(temp_bytes):
    """What the compiled program allocates, not only what JAX lists as saved: XLA would merge a
    recomputation back into the forward pass and keep its values alive (model/remat.py)."""
    ratio = temp_bytes(True) / temp_bytes(False)
    assert ratio < 0.6, ratio

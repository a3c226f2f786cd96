"""Architecture, parameter counts, initialisation and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax.weights import assign, state_arrays
from torch_twins import TORCHVISION_MODELS, torchvision_model

# The paper's Table 2 (CIFAR, 10 classes), in millions.
PAPER_PARAMS = {"densenet_40_k12": 1.0, "densenet_100_k12": 7.0, "densenet_100_k24": 27.2,
                "densenet_bc_100_k12": 0.8, "densenet_bc_250_k24": 15.3, "densenet_bc_190_k40": 25.6}


def num_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_param_count_equals_torchvision(name):
    reference = sum(p.numel() for p in torchvision_model(name).parameters())
    model = dj.create_model(name)
    assert num_params(model) == reference == dj.count_params(model.config)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_models_follow_the_layer_formula(name):
    model = dj.create_model(name)
    assert num_params(model) == dj.count_params(model.config)
    assert round(num_params(model) / 1e6, 1) == PAPER_PARAMS[name]


def test_bc_100_k12_has_769162_params():
    assert dj.count_params(dj.get_config("densenet_bc_100_k12")) == 769_162


def test_registry_and_named_classes():
    assert set(dj.list_models()) == {
        "densenet121", "densenet169", "densenet201", "densenet161", "densenet_40_k12",
        "densenet_100_k12", "densenet_100_k24", "densenet_bc_100_k12", "densenet_bc_250_k24",
        "densenet_bc_190_k40"}
    model = dj.DenseNet161(num_classes=7, rngs=nnx.Rngs(0))
    assert isinstance(model, dj.DenseNet) and model.config == dj.get_config("densenet161", num_classes=7)
    with pytest.raises(ValueError, match="unknown model"):
        dj.create_model("densenet122")
    with pytest.raises(ValueError, match="no field"):
        dj.create_model("densenet121", growth=12)


def test_general_form():
    config = dj.DenseNetConfig.cifar(52, 10, bottleneck=True, compression=0.6, num_classes=3)
    assert config.block_config == (8, 8, 8) and config.num_init_features == 20
    model = dj.DenseNet(config, rngs=nnx.Rngs(0))
    assert num_params(model) == dj.count_params(config)
    model.eval()
    assert nnx.eval_shape(lambda m, x: m(x), model, jnp.ones((1, 24, 24, 3))).shape == (1, 3)
    with pytest.raises(ValueError, match="depth 41"):
        dj.DenseNetConfig.cifar(41, 12, bottleneck=False, compression=1.0)


def test_initialisation_follows_torchvision():
    model = dj.DenseNet121(rngs=nnx.Rngs(0))
    kernel = np.asarray(model.features.denseblock3.denselayer5.conv1.kernel[...])
    fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    assert abs(kernel.std() / np.sqrt(2 / fan_in) - 1) < 0.02  # kaiming normal, fan-in
    norm = model.features.transition2.norm
    assert (np.asarray(norm.scale[...]) == 1).all() and (np.asarray(norm.bias[...]) == 0).all()
    assert (np.asarray(model.classifier.bias[...]) == 0).all()
    bound = 1 / np.sqrt(model.config.num_features)
    classifier = np.asarray(model.classifier.kernel[...])
    assert np.abs(classifier).max() <= bound and np.abs(classifier).max() > 0.9 * bound
    same = dj.DenseNet121(rngs=nnx.Rngs(0)).features.conv0.kernel[...]
    other = dj.DenseNet121(rngs=nnx.Rngs(1)).features.conv0.kernel[...]
    assert (same == model.features.conv0.kernel[...]).all() and not (other == same).all()


def test_dropout_only_in_training(rng):
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    with_dropout = dj.create_model("densenet_40_k12", block_config=(2, 2, 2), drop_rate=0.5)
    without = dj.create_model("densenet_40_k12", block_config=(2, 2, 2))
    assign(with_dropout, {k: np.asarray(v) for k, v in state_arrays(without).items()})
    for m in (with_dropout, without):
        m.eval()
    np.testing.assert_array_equal(np.asarray(with_dropout(x)), np.asarray(without(x)))
    with_dropout.train(), without.train()
    first, second = np.asarray(with_dropout(x)), np.asarray(with_dropout(x))
    reference = np.asarray(without(x))
    assert not np.allclose(first, second)  # a fresh mask each call
    assert not np.allclose(first, reference)


def test_computes_in_the_input_dtype(rng):
    model = dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2))
    model.eval()
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.bfloat16)
    out = model(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(model(x.astype(jnp.float32))),
                               rtol=0.1, atol=0.1)


def test_bad_inputs_are_refused_while_tracing():
    model = dj.create_model("densenet121")
    model.eval()
    with pytest.raises(ValueError, match=r"3 channels, got shape \(1, 64, 64, 1\)"):
        model(jnp.ones((1, 64, 64, 1)))
    with pytest.raises(ValueError, match="3 channels"):
        model(jnp.ones((64, 64, 3)))
    with pytest.raises(TypeError, match="uint8"):
        model(jnp.ones((1, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match="at least 29x29"):  # torchvision's minimum
        model(jnp.ones((1, 28, 40, 3)))
    # The smallest accepted size traces (eval_shape: running it op by op would take seconds).
    assert nnx.eval_shape(lambda m, x: m(x), model, jnp.ones((1, 29, 29, 3))).shape == (1, 1000)
    assert dj.models.smallest_input(dj.get_config("densenet_bc_100_k12")) == 4

"""Architecture, parameter counts, initialisation and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import densenet_jax as dj
from densenet_jax.model.densenet import smallest_input
from densenet_jax.weights.format import assign, state_arrays
from conftest import flax_twin
from test_train import equations
from torch_twins import TORCHVISION_MODELS, cifar_bc_model, nchw, torchvision_model

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
        "densenet121", "densenet169", "densenet201", "densenet161", "densenetblur121d",
        "densenet264d", "densenet_40_k12",
        "densenet_100_k12", "densenet_100_k24", "densenet_bc_100_k12", "densenet_bc_250_k24",
        "densenet_bc_190_k40"}
    model = dj.DenseNet161(num_classes=7, rngs=nnx.Rngs(0))
    assert isinstance(model, dj.DenseNet) and model.config == dj.get_config("densenet161", num_classes=7)
    with pytest.raises(ValueError, match="unknown model"):
        dj.create_model("densenet122")
    with pytest.raises(ValueError, match="no field"):
        dj.create_model("densenet121", growth=12)


@pytest.mark.parametrize("name, depth, growth_rate", [("densenet_bc_16_k12", 16, 12), ("densenet_bc_52_k10", 52, 10)])
def test_any_depth_of_the_paper_family_is_a_name(name, depth, growth_rate):
    """densenet_bc_<L>_k<k> is the paper's DenseNet-BC of that depth: the torch twin's parameters,
    and the name comes back from the config; a depth without three equal blocks is refused."""
    from densenet_jax.model.registry import model_name

    model = dj.create_model(name, rngs=nnx.Rngs(0))
    assert num_params(model) == sum(p.numel() for p in cifar_bc_model(depth, growth_rate).parameters())
    assert model_name(model.config) == name and model_name(model.config.replace(num_classes=3)) == name
    assert model_name(dj.get_config("densenet_10_k6")) == "densenet_10_k6"  # no bottleneck: L = 3n + 4
    assert dj.get_config("densenet_10_k6").block_config == (2, 2, 2)
    with pytest.raises(ValueError, match="^densenet_bc_17_k12: depth 17 does not give three equal dense blocks"):
        dj.create_model("densenet_bc_17_k12")
    with pytest.raises(ValueError, match="^densenet_4_k12: depth 4 leaves the dense blocks empty"):
        dj.create_model("densenet_4_k12")
    for spelled_twice in ("densenet_040_k12", "densenet_40_k012"):  # one spelling a model
        with pytest.raises(ValueError, match="unknown model"):
            dj.get_config(spelled_twice)


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


@pytest.mark.parametrize("field", ["drop_rate", "head_drop_rate"])
def test_dropout_is_torchs_at_the_same_place_on_the_same_masks(rng, field, monkeypatch):
    """Rate 0.2, told apart from the keep probability 0.8: a share of 0.2 of zeros (within 0.06,
    four standard deviations of the head's 768 values), the kept values scaled by 1/(1 - 0.2); and
    training-mode logits equal torch's given the masks ours drew: after each dense layer's last
    convolution (torchvision's F.dropout in _DenseLayer), or on the pooled features before the
    classifier (where timm's head_drop sits); a fresh mask each call; none in eval mode."""
    rate = 0.2
    reference = cifar_bc_model(16, 12, drop_rate=rate if field == "drop_rate" else 0)
    with jax.default_prng_impl("rbg"):  # threefry's masks take a minute to compile on 2 cores
        model = flax_twin(reference, **{field: rate})
    if field == "head_drop_rate":
        reference.classifier = torch.nn.Sequential(torch.nn.Dropout(rate), reference.classifier)
    calls, real = [], nnx.Dropout.__call__

    def recording(self, x, **kwargs):
        out = real(self, x, **kwargs)
        calls.append((np.asarray(x), np.asarray(out)))
        return out

    monkeypatch.setattr(nnx.Dropout, "__call__", recording)
    x = rng.standard_normal((16, 16, 16, 3), dtype=np.float32)
    model.eval()  # first: training moves the running statistics
    evaluated = np.asarray(model(x))
    calls.clear()
    model.train()
    ours = np.asarray(model(x))
    assert len(calls) == (6 if field == "drop_rate" else 1)
    masks = [out != 0 for _, out in calls]
    for (inputs, out), mask in zip(calls, masks):
        np.testing.assert_allclose(out, np.where(mask, inputs / (1 - rate), 0), rtol=1e-6)
    assert abs(1 - np.mean(np.concatenate([m.ravel() for m in masks])) - rate) < 0.06
    calls.clear()
    model(x)
    assert all(not np.array_equal(out != 0, mask) for (_, out), mask in zip(calls, masks))

    queue = [torch.from_numpy(np.ascontiguousarray(np.moveaxis(m, -1, 1))) for m in masks]

    def dropout(input, p=0.5, training=True, inplace=False):
        assert p == rate
        return input * queue.pop(0) / (1 - p) if training else input

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    with torch.no_grad():
        np.testing.assert_allclose(evaluated, reference.eval()(nchw(x)).numpy(), rtol=1e-4, atol=1e-5)
        expected = reference.train()(nchw(x)).numpy()
    assert not queue
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_computes_in_the_input_dtype(rng):
    model = dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2))
    model.eval()
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.bfloat16)
    out = model(x)
    assert out.dtype == jnp.bfloat16
    # Every convolution and matrix product takes bfloat16 operands: a weight or an activation
    # promoted to float32 on the way (and cast back at the end) fails here, not only in the tolerance.
    products = [e for e in equations(jax.make_jaxpr(lambda v: model(v))(x).jaxpr)
                if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert products and all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars)
    # fp32's logits to 2% of the largest: a few bfloat16 roundings (2^-8 each) of it; about 0.3%
    # is measured.
    reference = np.asarray(model(x.astype(jnp.float32)))
    assert np.abs(np.asarray(out, np.float32) - reference).max() <= 0.02 * np.abs(reference).max()


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
    assert smallest_input(dj.get_config("densenet_bc_100_k12")) == 4


def test_create_model_reads_timms_dropout_spelling_for_timms_names():
    timm_style = dj.create_model("densenet121", drop_rate=0.2, proj_drop_rate=0.1).config
    assert (timm_style.head_drop_rate, timm_style.drop_rate) == (0.2, 0.1)  # timm: head, per layer
    assert dj.create_model("densenetblur121d", drop_rate=0.3).config.head_drop_rate == 0.3
    paper = dj.create_model("densenet_40_k12", drop_rate=0.2).config  # the paper's per-layer dropout
    assert (paper.head_drop_rate, paper.drop_rate) == (0.0, 0.2)
    assert dj.DenseNet121(drop_rate=0.1, rngs=nnx.Rngs(0)).config.drop_rate == 0.1  # torchvision's
    with pytest.raises(ValueError, match="two values for head_drop_rate"):
        dj.create_model("densenet121", drop_rate=0.2, head_drop_rate=0.1)
    with pytest.raises(ValueError, match="two values for drop_rate"):
        dj.create_model("densenet_40_k12", drop_rate=0.2, proj_drop_rate=0.1)


def test_timm_habits(rng):
    model = dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), num_classes=7)
    model.eval()
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    features = model.forward_features(x)
    assert features.shape == (2, 8, 8, model.num_features) and model.num_features == 48
    np.testing.assert_array_equal(np.asarray(features), np.maximum(np.asarray(model.features(x)), 0))
    pooled = model.forward_head(features, pre_logits=True)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(features).mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.forward_head(features)), np.asarray(model(x)))
    model.reset_classifier(3, rngs=nnx.Rngs(5))
    assert model(x).shape == (2, 3) and model.config.num_classes == 3
    model.reset_classifier(0)  # timm's num_classes=0: no head, the model returns the pooled features
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(pooled))
    with pytest.raises(ValueError, match="num_classes must be a positive integer, or 0"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("stem, in_chans", [("cifar", 1), ("deep_tiered", 2)])
def test_in_chans_builds_converts_and_refuses_other_inputs(rng, stem, in_chans):
    from densenet_jax.weights.torch_keys import from_torchvision, to_torchvision
    model = dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), stem=stem, in_chans=in_chans)
    assert model.features.conv0.kernel.shape[2] == in_chans
    assert num_params(model) == dj.count_params(model.config)
    model.eval()
    x = rng.standard_normal((1, 32, 32, in_chans), dtype=np.float32)
    torch_dict = to_torchvision({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config)
    arrays, config = from_torchvision(torch_dict, "sd")
    assert config == model.config
    twin = dj.DenseNet(config, rngs=nnx.Rngs(1))
    assign(twin, arrays)
    twin.eval()
    np.testing.assert_array_equal(np.asarray(twin(x)), np.asarray(model(x)))
    with pytest.raises(ValueError, match=rf"{in_chans} channels, got shape \(1, 32, 32, 3\)"):
        model(jnp.ones((1, 32, 32, 3)))

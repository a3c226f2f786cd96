"""Parity with timm itself (timm 1.0.31, random weights with randomised BN statistics): eval logits
at 224x224 and at an odd rectangular size, every ``features_only`` map and its feature_info, and one
float64 train step through BlurPool and the deep stem (they have backward passes of their own).

timm cannot express the paper's CIFAR models: its stem always strides by 4 (a 7x7/2 or deep 3x3/2
conv, then a stride-2 pool) and its first block always gets 2k channels, while the CIFAR stem is one
3x3/1 conv; those are checked against torchvision (test_eval_parity.py, test_backbone.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx

import densenet_jax as dj
from densenet_jax.weights.torch_keys import from_torchvision, to_torchvision, weight_table
from densenet_jax.model.registry import model_name
from densenet_jax.weights.format import assign, cast, state_arrays
from conftest import flax_twin
from test_train_parity import flat, jax_steps, relative_l2, torch_steps
from torch_twins import nchw, randomize, state_dict_numpy

TIMM_MODELS = ("densenet121", "densenetblur121d", "densenet264d")
ODD = (225, 161)


def timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


def timm_backbone(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """timm's features_only model for ``name`` holding ``model``'s weights (its modules are named
    ``features_conv0`` ..., the flattened ``features.conv0``). Built on the meta device, as timm
    itself can, to skip a random init that the weights replace; BlurPool's filter is no weight and
    is filled in afterwards."""
    backbone = timm.create_model(name, pretrained=False, features_only=True, device="meta").to_empty(device="cpu")
    weights = {k.replace("features.", "features_", 1): v for k, v in model.state_dict().items()
               if k.startswith("features.")}
    backbone.load_state_dict(weights)
    for module in backbone.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return backbone.eval()


def relative_max(ours, reference) -> float:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=TIMM_MODELS)
def twins(request):
    """(name, timm's model, our model converted from its state dict)."""
    reference = timm_model(request.param, seed=3)
    ours = flax_twin(reference)
    ours.eval()
    return request.param, reference, ours


def test_registered_with_timms_parameter_count(twins):
    name, reference, ours = twins
    count = sum(p.numel() for p in reference.parameters())
    params = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    assert params == count == dj.count_params(dj.get_config(name))
    assert model_name(ours.config) == name and ours.config == dj.get_config(name)


def test_state_dict_round_trip_is_exact(twins):
    name, reference, ours = twins
    back = to_torchvision({k: np.asarray(v) for k, v in state_arrays(ours).items()}, ours.config)
    original = {k: v for k, v in state_dict_numpy(reference).items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    # timm loads it strictly (torch's BatchNorm fills in its step counters; BlurPool's filter is
    # no part of the state dict). The values are the model's own.
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()})


def test_logits_at_224(twins, rng):
    name, reference, ours = twins
    x = rng.standard_normal((1, 224, 224, 3), dtype=np.float32)
    with torch.no_grad():
        expected = reference(nchw(x)).numpy()
    err = relative_max(nnx.jit(lambda m, x: m(x))(ours, x), expected)
    print(f"{name} 224x224 logits: relative error {err:.1e}")
    assert err <= 1e-5


def test_features_only_and_logits_at_an_odd_size(twins, rng):
    """Every features_only map and the logits at 225x161, from one forward pass; feature_info as
    timm's."""
    name, reference, ours = twins
    timm_features = timm_backbone(name, reference)
    backbone = dj.DenseNetFeatures(ours)
    info = backbone.feature_info
    assert info.channels() == timm_features.feature_info.channels()
    assert info.reduction() == timm_features.feature_info.reduction()
    assert info.module_name() == timm_features.feature_info.module_name()

    x = rng.standard_normal((1, *ODD, 3), dtype=np.float32)
    with torch.no_grad():
        timm_maps = timm_features(nchw(x))
        # timm's own head on timm's last map: timm's logits, without a second pass of the trunk.
        expected_logits = reference.forward_head(timm_maps[-1]).numpy()
    expected_maps = [nhwc(m) for m in timm_maps]

    @nnx.jit
    def forward(backbone, model, x):
        maps = backbone(x)
        return maps, model.forward_head(maps[-1])

    maps, logits = forward(backbone, ours, x)
    assert len(maps) == len(expected_maps) == 5
    for stage, a, b in zip(info, maps, expected_maps):
        assert a.shape[-1] == stage.num_chs
        err = relative_max(a, b)
        print(f"{name} {stage.module}: relative error {err:.1e}")
        assert err <= 1e-5, stage
    assert (np.asarray(maps[-1]) >= 0).all()  # after norm5 and ReLU
    err = relative_max(logits, expected_logits)
    print(f"{name} {ODD[0]}x{ODD[1]} logits: relative error {err:.1e}")
    assert err <= 1e-5


def test_one_train_step_with_blur_pooling_and_the_deep_stem_in_float64(rng):
    """Loss, every gradient, the updated parameters and running statistics, to 1e-9, for a small
    timm DenseNet with densenetblur121d's parts (deep stem, BlurPool) and blur in the transitions
    too: their backward passes are the ones the eval parity cannot see, and depth adds nothing."""
    from timm.layers import BlurPool2d
    from timm.models.densenet import DenseNet as TimmDenseNet

    torch.manual_seed(11)
    reference = randomize(TimmDenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=10, stem_type="deep",
                                       aa_layer=BlurPool2d, aa_stem_only=False), 11).eval()
    # 64x64, batch 4, as test_train_parity.py: at a 1x1 final map over a batch of 2 the last
    # BatchNorm sees 2 values per channel, and its gradient loses digits even in float64.
    x = rng.standard_normal((4, 64, 64, 3))
    y = rng.integers(0, 10, 4)
    with jax.enable_x64(True):
        model = flax_twin(reference, aa_layer="blur", aa_stem_only=False)
        cast(model, jnp.float64)
        (loss, grads), = jax_steps(model, x, y, steps=1)
        final = flat(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    ((ref_loss, ref_grads),), ref_final = torch_steps(reference, x, y, steps=1)
    grads = flat(grads)
    table = weight_table(model.config)
    worst = {"loss": abs(loss - ref_loss) / abs(ref_loss), "grad": 0.0, "state": 0.0}
    assert len(grads) == len(ref_grads)
    for e in table:
        if e.torch_key in ref_grads:
            worst["grad"] = max(worst["grad"], relative_l2(grads[e.flax_key], e.to_flax(ref_grads[e.torch_key])))
        worst["state"] = max(worst["state"], relative_l2(final[e.flax_key], e.to_flax(ref_final[e.torch_key])))
    print(f"deep stem and blur pooling train step, float64: worst relative error {worst}")
    assert max(worst.values()) <= 1e-9, worst


@pytest.mark.parametrize("stem_type, aa_stem_only", [
    ("deep_tiered", True), ("deep_tiered_narrow", False), ("", False), ("deep", None)])
def test_every_stem_type_and_blur_placement_against_timm(rng, stem_type, aa_stem_only):
    """Small timm DenseNets with each stem type, blur pooling in the stem only, in the transitions
    too (aa_stem_only=False), or none (None): the stem is read off the keys, the anti-aliasing is
    passed (no weight shows it), and logits and every features_only stage match timm's."""
    from timm.layers import BlurPool2d
    from timm.models.densenet import DenseNet as TimmDenseNet

    torch.manual_seed(0)
    aa = dict(aa_layer=BlurPool2d, aa_stem_only=aa_stem_only) if aa_stem_only is not None else {}
    reference = randomize(TimmDenseNet(growth_rate=8, block_config=(2, 2, 2), num_classes=5,
                                       stem_type=stem_type, **aa), 0).eval()
    overrides = dict(aa_layer="blur", aa_stem_only=aa_stem_only) if aa_stem_only is not None else {}
    arrays, config = from_torchvision(state_dict_numpy(reference), "timm model", **overrides)
    assert config.stem == (stem_type or "imagenet") and config.num_init_features == 16
    model = dj.DenseNet(config, rngs=nnx.Rngs(0))
    assign(model, arrays)
    model.eval()
    x = rng.standard_normal((2, 37, 29, 3), dtype=np.float32)
    with torch.no_grad():
        logits, intermediates = reference.forward_intermediates(nchw(x))
        expected_logits = reference.forward_head(logits).numpy()
    maps, ours = nnx.jit(lambda m, x: (m.feature_maps(x), m(x)))(model, x)
    assert relative_max(ours, expected_logits) <= 1e-5
    assert [s["module"] for s in reference.feature_info] == dj.feature_info(config).module_name()
    for a, b in zip(maps, intermediates, strict=True):
        assert relative_max(a, nhwc(b)) <= 1e-5

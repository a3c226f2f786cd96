"""Property-based tests (hypothesis) of architecture inference and the torchvision key mapping:
any DenseNet's state dict converts and comes back exactly; any damaged one is refused as such."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from densenet_jax.model.config import STEMS, DenseNetConfig
from densenet_jax.errors import CheckpointError
from densenet_jax.weights.torch_keys import from_torchvision, to_torchvision, weight_table

# Derandomised: the same 60 examples on every run, so that CI's verdict depends on the code alone.
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    """Small DenseNets of every kind: every stem, with and without bottleneck, any compression, any
    input channels, with and without blur pooling."""
    config = dict(
        growth_rate=draw(st.integers(1, 12)),
        block_config=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))),
        num_init_features=draw(st.integers(1, 24)),
        bn_size=draw(st.one_of(st.none(), st.integers(1, 4))),
        compression=draw(st.one_of(st.sampled_from([0.5, 1.0]), st.floats(0.05, 1.0))),
        stem=draw(st.sampled_from(STEMS)),
        num_classes=draw(st.integers(1, 20)),
        in_chans=draw(st.integers(1, 4)),
        aa_layer=draw(st.sampled_from([None, "blur"])),
        aa_stem_only=draw(st.booleans()))
    try:
        return DenseNetConfig(**config)
    except ValueError:  # e.g. a compression that leaves a transition empty: not a DenseNet
        return draw(st.nothing())


def torch_state_dict(config: DenseNetConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {e.torch_key: rng.standard_normal(e.to_torch(np.empty(e.shape, np.uint8)).shape).astype(np.float32)
            for e in weight_table(config)}


def same_architecture(a: DenseNetConfig, b: DenseNetConfig) -> bool:
    """Equal, except where compression values differ without changing any channel count, in the
    anti-aliasing, which no weight shows (test_timm.py checks that densenetblur121d's is read),
    and between timm's two tiered stems where their channels coincide (then they compute alike)."""
    def unseen(c):
        stem = "deep_tiered" if c.stem.startswith("deep_tiered") else c.stem
        return c.replace(compression=1.0, aa_layer=None, aa_stem_only=True, stem=stem)
    return (unseen(a) == unseen(b) and a.block_channels() == b.block_channels()
            and a.stem_channels() == b.stem_channels())


@SETTINGS
@given(config=configs(), seed=st.integers(0, 2**16))
def test_any_densenet_is_inferred_and_round_trips_exactly(config, seed):
    state_dict = torch_state_dict(config, seed)
    arrays, inferred = from_torchvision(state_dict, "sd")
    assert same_architecture(inferred, config), (inferred, config)
    back = to_torchvision(arrays, inferred)
    assert back.keys() == state_dict.keys()
    for key in state_dict:
        np.testing.assert_array_equal(back[key], state_dict[key], err_msg=key)


@SETTINGS
@given(config=configs(), legacy=st.booleans(),
       prefixes=st.lists(st.sampled_from(["module.", "_orig_mod.", "model.", "ema."]), max_size=3))
def test_the_forms_people_have_map_to_the_same_weights(config, prefixes, legacy):
    state_dict = torch_state_dict(config, 0)
    renamed = {}
    for key, value in state_dict.items():
        if legacy and ".denselayer" in key:  # torchvision's old names: norm.1 for norm1
            for part in ("norm", "relu", "conv"):
                key = key.replace(f".{part}1.", f".{part}.1.").replace(f".{part}2.", f".{part}.2.")
        renamed["".join(prefixes) + key] = value  # DataParallel, torch.compile, Lightning wrappers
    renamed["features.norm0.num_batches_tracked" if config.stem != "cifar" else "x.num_batches_tracked"] = np.int64(3)
    arrays, _ = from_torchvision(renamed, "sd")
    expected, _ = from_torchvision(state_dict, "sd")
    assert arrays.keys() == expected.keys()
    assert all(np.array_equal(arrays[k], expected[k]) for k in arrays)


MUTATIONS = ["drop", "add", "grow_dim", "shrink_dim", "drop_dim", "add_dim", "rename"]


@SETTINGS
@given(config=configs(), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_damaged_state_dicts_are_refused_with_checkpoint_error(config, mutation, data):
    state_dict = torch_state_dict(config, 0)
    key = data.draw(st.sampled_from(sorted(state_dict)))
    value = state_dict[key]
    if mutation == "drop":
        del state_dict[key]
    elif mutation == "add":
        state_dict[key.rsplit(".", 1)[0] + ".extra"] = value
    elif mutation == "rename":
        state_dict[key.replace(".", "_", 1)] = state_dict.pop(key)
    else:
        axis = data.draw(st.integers(0, value.ndim - 1))
        # conv0's input channels are in_chans: another count is another valid DenseNet.
        assume(not (key == "features.conv0.weight" and axis == 1 and mutation in ("grow_dim", "shrink_dim")))
        shape = list(value.shape)
        if mutation == "grow_dim":
            shape[axis] += 1
        elif mutation == "shrink_dim":
            shape[axis] = max(shape[axis] - 1, 0) if shape[axis] > 1 else 2
        elif mutation == "drop_dim":
            shape = shape[:axis] + shape[axis + 1:]
        else:
            shape.insert(axis, 2)
        state_dict[key] = np.zeros(shape, np.float32)
    with pytest.raises(CheckpointError, match="^sd: "):
        from_torchvision(state_dict, "sd")

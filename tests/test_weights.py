"""save/load of our safetensors files, and fine-tuning with a new head."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax.weights.format import state_arrays


def small_model(**overrides):
    return dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), **overrides)


def test_save_then_load_rebuilds_the_same_model(tmp_path, rng):
    model = small_model(num_classes=5, drop_rate=0.1, rngs=nnx.Rngs(3))
    path = tmp_path / "m.safetensors"
    dj.save(model, path)
    loaded = dj.load(path)
    assert loaded.config == model.config
    for key, value in state_arrays(model).items():
        np.testing.assert_array_equal(np.asarray(state_arrays(loaded)[key]), np.asarray(value))
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed, not left behind


def test_load_with_new_head_keeps_the_rest(tmp_path, caplog):
    model = small_model()
    path = tmp_path / "m.safetensors"
    dj.save(model, path)
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        tuned = dj.load(path, num_classes=3, rngs=nnx.Rngs(9))
    assert "freshly initialised" in caplog.text
    assert tuned.classifier.kernel.shape == (model.config.num_features, 3)
    original, new = state_arrays(model), state_arrays(tuned)
    for key in original:
        if not key.startswith("classifier."):
            np.testing.assert_array_equal(np.asarray(new[key]), np.asarray(original[key]))


def test_load_overrides_runtime_options(tmp_path):
    dj.save(small_model(), tmp_path / "m.safetensors")
    assert dj.load(tmp_path / "m.safetensors", memory_efficient=True).config.memory_efficient
    with pytest.raises(ValueError, match="no field 'colour'"):
        dj.load(tmp_path / "m.safetensors", colour="red")


def test_architecture_change_is_refused(tmp_path):
    dj.save(small_model(), tmp_path / "m.safetensors")
    with pytest.raises(dj.CheckpointError, match="m.safetensors: .*shape"):
        dj.load(tmp_path / "m.safetensors", growth_rate=16)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), (b"", "not a safetensors"), (b"\x00" * 100, "not a safetensors")])
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(dj.CheckpointError, match=f"bad.safetensors: {message}"):
        dj.load(path)


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    from safetensors.numpy import save_file
    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(dj.CheckpointError, match="not a densenet_jax weights file"):
        dj.load(tmp_path / "other.safetensors")


def test_saved_model_predicts_the_same(tmp_path, rng):
    model = small_model()
    model.eval()
    dj.save(model, tmp_path / "m.safetensors")
    loaded = dj.load(tmp_path / "m.safetensors")
    loaded.eval()
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3), dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))

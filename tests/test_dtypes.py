"""Every floating-point dtype torch and safetensors write (float64, float32, float16, bfloat16)
reads and writes through every command and ``dj.load``/``dj.save``, bit for bit.

safetensors' numpy reader of bytes has no BF16 (safetensors #598), and numpy files bfloat16 under
kind ``V``: both made bf16 weights unreadable here. The references are torch's own tensors and
safetensors' torch writer.
"""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from flax import nnx

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.train import loop
from densenet_jax.model.pretrained_cfg import torchvision_cfg
from densenet_jax.weights.format import read_safetensors, state_arrays
from fixtures import write_image_folder
from torch_twins import randomize

DTYPES = {"float64": (torch.float64, np.float64), "float32": (torch.float32, np.float32),
          "float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, ml_dtypes.bfloat16)}


def torch_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A small torchvision DenseNet's state dict, its floating-point tensors cast to ``dtype``."""
    torch.manual_seed(0)
    model = randomize(torchvision.models.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3), seed=0)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def as_float64(array) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def held_as(model, dtype) -> None:
    """``model``'s weights stored as ``dtype``, cast by numpy (as ``cast`` does, without compiling
    jax's astype for every shape and dtype); float64 needs ``jax.enable_x64``."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.update(model, jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a).astype(dtype)), state))


@pytest.mark.parametrize("name", DTYPES)
def test_every_dtype_converts_both_ways_bit_for_bit(name, tmp_path, capsys):
    """A .pth and a .safetensors from torch in ``name`` convert to the same densenet_jax file of
    that dtype, which converts back to torch's very tensors, and loads into a model."""
    torch_dtype, numpy_dtype = DTYPES[name]
    state = torch_state(torch_dtype)
    torch.save(state, tmp_path / "w.pth")
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    for source in ("w.pth", "w.safetensors"):
        cli.main(["convert", str(tmp_path / source), str(tmp_path / f"{source}.ours.safetensors")])
    arrays, config = read_safetensors(tmp_path / "w.pth.ours.safetensors")
    again, _ = read_safetensors(tmp_path / "w.safetensors.ours.safetensors")
    assert {a.dtype for a in arrays.values()} == {np.dtype(numpy_dtype)}
    for key in arrays:
        assert again[key].dtype == arrays[key].dtype and again[key].tobytes() == arrays[key].tobytes(), key
    cli.main(["convert", "--to", "torch", str(tmp_path / "w.pth.ours.safetensors"), str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    model = dj.load(tmp_path / "w.pth.ours.safetensors")
    for key, value in state_arrays(model).items():  # the model computes in float32
        np.testing.assert_array_equal(as_float64(value), as_float64(arrays[key]).astype(np.float32), err_msg=key)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", DTYPES)
def test_save_writes_and_load_reads_every_dtype(name, tmp_path):
    """``dj.save`` of a model cast to ``name`` writes that dtype, which torch reads as the same
    values, and ``dj.load`` reads back into a float32 model."""
    torch_dtype, numpy_dtype = DTYPES[name]
    model = dj.create_model("densenet_bc_16_k12", block_config=(1, 1), num_classes=3, rngs=nnx.Rngs(0))
    path = tmp_path / "m.safetensors"
    with jax.enable_x64(name == "float64"):
        held_as(model, numpy_dtype)
        saved = {k: np.asarray(v) for k, v in state_arrays(model).items()}
        dj.save(model, path)
    assert {v.dtype for v in saved.values()} == {np.dtype(numpy_dtype)}
    by_torch = safetensors.torch.load_file(path)
    loaded = state_arrays(dj.load(path))
    for key, value in saved.items():
        assert by_torch[key].dtype == torch_dtype, key
        np.testing.assert_array_equal(by_torch[key].double().numpy(), as_float64(value), err_msg=key)
        np.testing.assert_array_equal(as_float64(loaded[key]), as_float64(value).astype(np.float32), err_msg=key)


class Started(Exception):
    """Raised where training would begin, once the --init-from file is loaded."""


def test_bf16_weights_go_through_every_command(tmp_path, capsys, monkeypatch):
    """predict, evaluate, train --init-from and export read a bf16 file as its float32 twin (the
    same values, which float32 holds exactly). Training is stopped once its model is loaded: the
    steps after that see a float32 model whatever the file held."""
    model = dj.create_model("densenet_bc_16_k12", block_config=(1, 1), num_classes=3, rngs=nnx.Rngs(0))
    model.pretrained_cfg = torchvision_cfg(36, 32)  # predict at 32 px, as the others
    held_as(model, ml_dtypes.bfloat16)
    dj.save(model, tmp_path / "bf16.safetensors")
    held_as(model, np.float32)
    dj.save(model, tmp_path / "f32.safetensors")
    twin = state_arrays(model)
    data = write_image_folder(tmp_path / "images", per_class=1)
    image = str(next((data / "val" / "cat").iterdir()))
    outputs = {}
    for name in ("bf16", "f32"):
        cli.main(["predict", "--weights", str(tmp_path / f"{name}.safetensors"), image, "--json"])
        outputs[name] = json.loads(capsys.readouterr().out)[0]["top"]
    assert outputs["bf16"] == outputs["f32"]
    weights = str(tmp_path / "bf16.safetensors")
    common = ["--dataset", "folder", "--data-dir", str(data), "--image-size", "32", "--batch-size", "3"]
    cli.main(["evaluate", "--weights", weights, *common])
    assert "accuracy" in capsys.readouterr().out

    def loaded(config, data):
        for key, value in state_arrays(real(config, data)).items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(twin[key]), err_msg=key)
        raise Started

    real = loop.training_model
    monkeypatch.setattr(loop, "training_model", loaded)
    with pytest.raises(Started):
        cli.main(["train", "--init-from", weights, *common, "--workdir", str(tmp_path / "run"), "--no-progress"])
    out = tmp_path / "model.stablehlo"
    cli.main(["export", str(out), "--weights", weights, "--format", "stablehlo", "--image-size", "32"])
    assert out.stat().st_size > 0
    assert "Traceback" not in capsys.readouterr().err

"""Backbone features as timm's features_only (timm itself is the oracle in test_timm.py): the
stages, out_indices and feature_info; the CIFAR stem's maps against torchvision's modules; and
torchvision's pre-ReLU norm5 map, still there as ``model.features(x)``."""

import numpy as np
import pytest
import torch
from flax import nnx

import densenet_jax as dj
from densenet_jax.weights.torch_keys import from_torchvision
from densenet_jax.weights.format import write_safetensors
from torch_twins import cifar_bc_model, nchw, state_dict_numpy


def torch_module_outputs(torch_model, names, x):
    """The outputs of torch_model's modules ``names`` for input x, as NHWC numpy (copied: torchvision
    applies its last ReLU in place, after the hook)."""
    outputs = {}
    hooks = [torch_model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: outputs.__setitem__(name, out.numpy().transpose(0, 2, 3, 1).copy()))
        for name in names]
    with torch.no_grad():
        torch_model(nchw(x))
    for hook in hooks:
        hook.remove()
    return [outputs[name] for name in names]


def test_cifar_feature_maps_match_torchvision_modules(tmp_path, rng):
    """The CIFAR stem (which timm lacks): stage 0 is conv0 at full size, then each dense block, the
    last after norm5 and ReLU; ``model.features(x)`` is torchvision's norm5 before the ReLU."""
    torch_model = cifar_bc_model(40, 12, seed=5).eval()
    arrays, config = from_torchvision(state_dict_numpy(torch_model), "torch model")
    write_safetensors(arrays, config, tmp_path / "converted.safetensors")
    backbone = dj.load(tmp_path / "converted.safetensors", features_only=True)
    backbone.eval()
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    ours = nnx.jit(lambda m, x: m(x))(backbone, x)
    info = backbone.feature_info
    assert info.module_name() == ["features.conv0", "features.denseblock1", "features.denseblock2",
                                  "features.norm5"]
    assert info.reduction() == [1, 1, 2, 4] and info.channels() == [24, 96, 120, 132]
    reference = torch_module_outputs(torch_model, info.module_name(), x)
    reference[-1] = np.maximum(reference[-1], 0)  # torchvision's F.relu after features
    pre_relu = nnx.jit(lambda m, x: m(x))(backbone.features, x)
    for stage, a, b in zip(info, [*ours, pre_relu], [*reference, torch_module_outputs(torch_model, ["features.norm5"], x)[0]]):
        assert a.shape == b.shape and a.shape[1] == 32 // stage.reduction, stage
        err = np.abs(np.asarray(a) - b).max() / np.abs(b).max()
        print(f"{stage.module}: relative error {err:.1e}")
        assert err <= 1e-5, stage
    assert (np.asarray(pre_relu) < 0).any() and (np.asarray(ours[-1]) >= 0).all()


def test_out_indices_as_timm_reads_them():
    model = dj.create_model("densenet121", rngs=nnx.Rngs(0))
    info = dj.feature_info(model.config, (1, -1))
    assert info.channels() == [256, 1024] and info.reduction() == [4, 32]
    assert [s.index for s in info] == [1, 4]
    assert dj.feature_info(model.config, 2).module_name() == ["features.denseblock3", "features.norm5"]
    backbone = dj.DenseNetFeatures(model, out_indices=(0, 2, -1))
    backbone.eval()
    maps = nnx.eval_shape(lambda m, x: m(x), backbone, np.zeros((1, 224, 224, 3), np.float32))
    assert [m.shape for m in maps] == [(1, 112, 112, 64), (1, 28, 28, 512), (1, 7, 7, 1024)]
    # The backbone shares the classifier model's weights.
    assert backbone.features.conv0.kernel is model.features.conv0.kernel
    with pytest.raises(ValueError, match=r"out_indices \(5,\): this DenseNet has stages 0..4"):
        dj.create_model("densenet121", features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match="out_indices 6: this DenseNet has 5 stages"):
        dj.create_model("densenet121", features_only=True, out_indices=6)

"""Backbone features: each feature map against the output of torchvision's corresponding module,
loaded from converted weights; channels and strides as feature_info lists them."""

import numpy as np
import pytest
import torch
from flax import nnx

import densenet_jax as dj
from densenet_jax.interop import from_torchvision
from densenet_jax.weights import write_safetensors
from torch_twins import cifar_bc_model, nchw, state_dict_numpy, torchvision_model


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


@pytest.mark.parametrize("torch_model, size", [(torchvision_model("densenet121", seed=5), 97),
                                               (cifar_bc_model(40, 12, seed=5), 32)], ids=["121", "bc40"])
def test_feature_maps_match_torchvision_modules(tmp_path, rng, torch_model, size):
    torch_model.eval()
    arrays, config = from_torchvision(state_dict_numpy(torch_model), "torch model")
    write_safetensors(arrays, config, tmp_path / "converted.safetensors")
    backbone = dj.load(tmp_path / "converted.safetensors", features_only=True)
    backbone.eval()
    x = rng.standard_normal((2, size, size, 3), dtype=np.float32)
    ours = nnx.jit(lambda m, x: m(x))(backbone, x)
    info = backbone.feature_info
    reference = torch_module_outputs(torch_model, info.module_name(), x)
    assert len(ours) == len(reference) == len(config.block_config)
    for stage, a, b in zip(info, ours, reference):
        assert a.shape == b.shape and a.shape[-1] == stage.num_chs, stage
        assert a.shape[1] == -(-size // stage.reduction) or a.shape[1] == size // stage.reduction, stage
        err = np.abs(np.asarray(a) - b).max() / np.abs(b).max()
        print(f"{stage.module}: relative error {err:.1e}")
        assert err <= 1e-5, stage


def test_out_indices_choose_and_validate():
    model = dj.create_model("densenet121", rngs=nnx.Rngs(0))
    info = dj.feature_info(model.config, (1, -1))
    assert info.channels() == [512, 1024] and info.reduction() == [8, 32]
    assert [s.index for s in info] == [1, 3]
    backbone = dj.DenseNetFeatures(model, out_indices=(1, -1))
    backbone.eval()
    maps = nnx.eval_shape(lambda m, x: m(x), backbone, np.zeros((1, 224, 224, 3), np.float32))
    assert [m.shape for m in maps] == [(1, 28, 28, 512), (1, 7, 7, 1024)]
    # The backbone shares the classifier model's weights.
    assert backbone.features.conv0.kernel is model.features.conv0.kernel
    with pytest.raises(ValueError, match=r"out_indices \(4,\): this DenseNet has dense blocks 0..3"):
        dj.create_model("densenet121", features_only=True, out_indices=(4,))
    assert dj.create_model("densenet_bc_100_k12", features_only=True).feature_info.reduction() == [1, 2, 4]

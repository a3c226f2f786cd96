"""torch reference models for the parity tests: torchvision's own, with randomised statistics."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn

TORCHVISION_MODELS = ("densenet121", "densenet169", "densenet201", "densenet161")


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics (fresh init has trivial ones), and a
    random classifier bias, so that a mix-up of any of them shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, nn.Linear):
                m.bias.copy_(0.1 * torch.randn(m.out_features, generator=g))
    return model


def torchvision_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(getattr(torchvision.models, name)(weights=None, **kwargs), seed)


def cifar_bc_model(depth: int, growth_rate: int, num_classes: int = 10, seed: int = 0,
                   **kwargs) -> nn.Module:
    """The paper's CIFAR DenseNet-BC from torchvision's own DenseNet with the stem swapped for one
    3x3 convolution (torchvision's transitions already halve the channels: compression 0.5)."""
    torch.manual_seed(seed)
    layers = (depth - 4) // 6
    model = torchvision.models.DenseNet(growth_rate, (layers,) * 3, 2 * growth_rate, bn_size=4,
                                        num_classes=num_classes, **kwargs)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    del model.features.norm0, model.features.relu0, model.features.pool0
    return randomize(model, seed)


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
    """An NHWC numpy batch as the NCHW tensor torch expects."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def assert_file_holds(path, state: dict, cast=None) -> None:
    """The densenet_jax weights file at ``path`` holds every tensor of the torch state dict
    ``state`` (BN step counters aside), value for value (after ``cast``, e.g. fp16 -> fp32), read
    back in torch's layout."""
    from densenet_jax.weights.format import read_safetensors
    from densenet_jax.weights.torch_keys import to_torchvision
    ours = to_torchvision(*read_safetensors(path))
    expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        value = value.detach() if cast is None else cast(value.detach())
        assert ours[key].dtype == value.numpy().dtype, (key, ours[key].dtype)
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)

"""Eval-mode logits against torchvision itself, fp32 on CPU, randomised BN statistics."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import flax_twin
from torch_twins import TORCHVISION_MODELS, cifar_bc_model, nchw, torchvision_model

TOLERANCE = 1e-5  # max |jax - torch| / max |torch|


def relative_error(ours, reference):
    return np.abs(ours - reference).max() / np.abs(reference).max()


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_models_match(name, rng):
    """README, Models: converted torchvision weights give torchvision's logits to within 1e-5 of the
    largest logit (fp32, CPU)."""
    torch_model = torchvision_model(name, seed=len(name)).eval()
    model = flax_twin(torch_model)
    model.eval()
    forward = nnx.jit(lambda m, x: m(x))
    # 224 as trained; 97 is odd at every stage, so it checks torch's floor pooling and -inf max-pool pad.
    for size in (224, 97):
        x = rng.standard_normal((2, size, size, 3), dtype=np.float32)
        with torch.no_grad():
            reference = torch_model(nchw(x)).numpy()
        ours = np.asarray(forward(model, x))
        assert ours.shape == reference.shape == (2, 1000)
        err = relative_error(ours, reference)
        print(f"{name} @{size}: relative error {err:.2e}")
        assert err <= TOLERANCE


def test_paper_cifar_model_matches(rng):
    """README, Models: the paper's CIFAR models are torchvision's DenseNet with a 3x3 stem."""
    torch_model = cifar_bc_model(100, 12, num_classes=10).eval()
    model = flax_twin(torch_model)
    model.eval()
    x = rng.standard_normal((4, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        reference = torch_model(nchw(x)).numpy()
    ours = np.asarray(jax.jit(lambda x: model(x))(x))
    assert relative_error(ours, reference) <= TOLERANCE

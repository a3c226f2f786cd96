"""Two SGD steps in train mode against torch, in float64 on both sides (porting-notes 9b): the loss,
every gradient, the updated parameters and the updated running statistics must agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from conftest import flax_twin
from densenet_jax.interop import weight_table
from densenet_jax.weights import cast
from torch_twins import cifar_bc_model, nchw, torchvision_model

TOLERANCE = 1e-9  # per-leaf relative L2
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4


def relative_l2(ours, reference):
    return np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), 1e-300)


def torch_steps(model, x, y, steps):
    model.double().train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(nchw(x)), torch.from_numpy(y))
        loss.backward()
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        opt.step()
        history.append((loss.item(), grads))
    return history, {k: v.numpy() for k, v in model.state_dict().items()}


def jax_steps(model, x, y, steps):
    model.train()
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    history = []
    for _ in range(steps):
        loss, grads = step(model, optimizer, x, y)
        history.append((float(loss), grads))
    return history


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("case", ["densenet121", "densenet_bc_100_k12"])
def test_two_sgd_steps_match_torch_in_float64(case, rng):
    if case == "densenet121":
        torch_model, size, classes = torchvision_model("densenet121", seed=7), 64, 1000
    else:
        torch_model, size, classes = cifar_bc_model(100, 12, seed=7), 32, 10
    x = rng.standard_normal((4, size, size, 3))
    y = rng.integers(0, classes, 4)
    with jax.enable_x64(True):
        model = flax_twin(torch_model)
        cast(model, jnp.float64)
        ours = jax_steps(model, x, y, steps=2)
        final = flat(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    reference, reference_final = torch_steps(torch_model, x, y, steps=2)

    table = weight_table(model.config)
    worst = {"loss": 0.0, "grad": 0.0, "state": 0.0}
    for (loss, grads), (ref_loss, ref_grads) in zip(ours, reference):
        worst["loss"] = max(worst["loss"], abs(loss - ref_loss) / abs(ref_loss))
        grads = flat(grads)
        for e in table:
            if e.torch_key in ref_grads:
                worst["grad"] = max(worst["grad"], relative_l2(grads[e.flax_key], e.to_flax(ref_grads[e.torch_key])))
    assert len(grads) == len(ref_grads)
    for e in table:  # parameters and running mean/var, after both steps
        worst["state"] = max(worst["state"], relative_l2(final[e.flax_key], e.to_flax(reference_final[e.torch_key])))
    print(f"{case}: worst relative error {worst}")
    assert max(worst.values()) <= TOLERANCE, worst

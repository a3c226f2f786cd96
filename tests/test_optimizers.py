"""create_optimizer against timm's create_optimizer_v2 in float64: the same weights and the same two
gradients (given, at scales from 1e-4 to 10) through two steps of each optimizer, every parameter,
every clipping mode and layer decay to 1e-9 relative to the change (porting-notes 17: RMSpropTF's
epsilon inside the square root and square average from one, timm's filter_bias_and_bn).

The parameter tree is timm's DenseNet with densenet121's structure (ImageNet stem, four blocks,
transitions, final norm, classifier; timm's group_matcher for layer decay) at two layers a block:
densenet121's 364 tensors of 120 shapes cost a minute of eager dispatch per optimizer here."""

import jax
import numpy as np
import optax
import pytest
from timm.models.densenet import DenseNet
import torch
from timm.optim import create_optimizer_v2
from timm.utils import dispatch_clip_grad

from densenet_jax.train import create_optimizer
from densenet_jax.weights.torch_keys import from_torchvision, weight_table
from torch_twins import randomize, state_dict_numpy

TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def densenet_grads():
    """The model in float64 with random BN parameters, two given gradients for it (each tensor at a
    scale of its own, from 1e-4 to 10), and its table of our keys."""
    model = randomize(DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_classes=10), seed=11).double()
    rng = np.random.default_rng(0)
    params = {k: p.detach().numpy().copy() for k, p in model.named_parameters()}
    scales = {k: 10.0 ** rng.uniform(-4, 1) for k in params}
    grads = [{k: scales[k] * rng.standard_normal(p.shape) for k, p in params.items()} for _ in range(2)]
    _, config = from_torchvision(state_dict_numpy(model), "timm DenseNet")
    table = [e for e in weight_table(config) if e.torch_key in params]
    return model, params, grads, table


def nested(flat: dict) -> dict:
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def torch_two_steps(model, params, grads, opt, lr, wd, clip=None, layer_decay=None, **kwargs):
    """timm's optimizer for ``model`` holding ``params``, stepped with the given gradients."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(torch.from_numpy(params[k]))
    optimizer = create_optimizer_v2(model, opt, lr=lr, weight_decay=wd, layer_decay=layer_decay,
                                               **kwargs)
    for group in optimizer.param_groups:  # timm's scheduler applies the layer scale to each group
        group["lr"] = lr * group.get("lr_scale", 1.0)
    named = dict(model.named_parameters())
    for g in grads:
        for k, p in named.items():
            p.grad = torch.from_numpy(g[k].copy())
        if clip:
            dispatch_clip_grad(model.parameters(), clip[1], mode=clip[0])
        optimizer.step()
    return {k: p.detach().numpy() for k, p in named.items()}


def jax_two_steps(params, grads, table, opt, lr, wd, clip=None, layer_decay=None, **kwargs):
    ours = nested({e.flax_key: e.to_flax(params[e.torch_key]) for e in table})
    with jax.enable_x64(True):
        tx = create_optimizer(ours, opt, lr=lr, weight_decay=wd, clip_grad=clip and clip[1],
                              clip_mode=clip[0] if clip else "norm", layer_decay=layer_decay, **kwargs)
        state = tx.init(ours)
        for g in grads:
            updates, state = tx.update(nested({e.flax_key: e.to_flax(g[e.torch_key]) for e in table}), state, ours)
            ours = optax.apply_updates(ours, updates)
        return {e.flax_key: np.asarray(x) for e, x in zip(table, [_at(ours, e.flax_key) for e in table])}


def _at(tree, key):
    for part in key.split("."):
        tree = tree[part]
    return tree


CASES = {  # name: (opt, lr, weight decay, extra)
    "sgd": ("sgd", 0.1, 1e-4, {}),
    "momentum": ("momentum", 0.1, 1e-2, {"momentum": 0.8}),
    "nesterov-no-filter": ("nesterov", 0.1, 1e-2, {"filter_bias_and_bn": False}),
    "adamw": ("adamw", 1e-3, 0.05, {"betas": (0.8, 0.95), "eps": 1e-7}),
    "rmsproptf": ("rmsproptf", 0.016, 1e-2, {"eps": 1e-3}),
    "rmsproptf-default-eps": ("rmsproptf", 0.016, 1e-5, {}),
    "lamb": ("lamb", 1e-2, 0.02, {}),
    "lars": ("lars", 1.0, 1e-2, {}),
    "lion": ("lion", 1e-3, 0.1, {}),
    "clip-norm": ("sgd", 0.1, 1e-4, {"clip": ("norm", 0.5)}),
    "clip-value": ("adamw", 1e-3, 0.05, {"clip": ("value", 1e-3)}),
    "clip-agc": ("sgd", 0.1, 1e-4, {"clip": ("agc", 0.01)}),
    "layer-decay": ("adamw", 1e-3, 0.05, {"layer_decay": 0.7}),
}


def test_each_optimizer_matches_timm_in_float64(densenet_grads):
    model, params, grads, table = densenet_grads
    failures = {}
    for name, (opt, lr, wd, extra) in CASES.items():
        extra = dict(extra)
        kwargs = {k: extra.pop(k) for k in ("momentum", "filter_bias_and_bn") if k in extra}
        torch_kwargs = {**kwargs, **({"eps": extra["eps"]} if "eps" in extra else {}),
                        **({"betas": extra["betas"]} if "betas" in extra else {})}
        reference = torch_two_steps(model, params, grads, opt, lr, wd, extra.get("clip"), extra.get("layer_decay"),
                                    **torch_kwargs)
        ours = jax_two_steps(params, grads, table, opt, lr, wd, **kwargs, **extra)
        errors = {e.flax_key: np.linalg.norm(ours[e.flax_key] - e.to_flax(reference[e.torch_key]))
                  / np.linalg.norm(e.to_flax(reference[e.torch_key]) - e.to_flax(params[e.torch_key]))
                  for e in table}
        worst = max(errors, key=errors.get)
        print(f"{name}: worst relative error of the change {errors[worst]:.2e} ({worst})")
        if not errors[worst] <= TOLERANCE:
            failures[name] = (worst, errors[worst])
    assert not failures, failures

"""The models the harness races: densenet_jax as a user writes it, torchvision, Keras-JAX.

Each contender prepares, for a task, a callable that runs one batch to completion (inference) or
one SGD step (training) and blocks until the result is ready.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import densenet_jax as dj
from densenet_jax.train import optim, parallel


@dataclasses.dataclass(frozen=True)
class Task:
    model: str          # a registered densenet_jax name
    mode: str           # "inference" or "train"
    batch: int
    size: int

    @property
    def label(self):
        return f"{self.model} {self.mode} {self.size}x{self.size} b{self.batch}"

    def num_classes(self):
        return dj.get_config(self.model).num_classes


def _data(task: Task, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((task.batch, task.size, task.size, 3), dtype=np.float32)
    y = rng.integers(0, task.num_classes(), task.batch).astype(np.int32)
    return x, y


def _sgd():
    """The trainer's update direction; its runner applies the learning rate (0.01) in the step."""
    return optim.sgd(nesterov=False)


def _sgd_with_lr():
    """The same SGD as one optax transformation, for plain NNX code: lr 0.01 applied by optax."""
    return optax.chain(_sgd(), optax.scale_by_learning_rate(0.01))


# --- densenet_jax -----------------------------------------------------------------------------

def jax_split(task: Task, store=None, **model_options) -> Callable[[], None]:
    """The project's own path: inference as jit of the split model; training through the trainer's
    runner (what ``densenet-jax train`` runs; ``store``: its folder for traced steps)."""
    model = dj.create_model(task.model, **model_options)
    x, y = _data(task)
    if task.mode == "inference":
        model.eval()
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        x = jnp.asarray(x)
        return lambda: forward(state, x).block_until_ready()
    runner = parallel.make("mesh", model, _sgd(), store and (store, task.label))
    holder = {"state": runner.place_state(runner.steps.initial)}
    images, labels = runner.place_batch(x, y)

    def step():
        holder["state"], metrics = runner.train(holder["state"], images, labels, 0.01)
        metrics["loss"].block_until_ready()
    return step


def jax_nnx_jit(task: Task, **model_options) -> Callable[[], None]:
    """Ordinary Flax NNX user code: nnx.jit, nnx.value_and_grad, nnx.Optimizer."""
    model = dj.create_model(task.model, **model_options)
    x, y = jnp.asarray(_data(task)[0]), jnp.asarray(_data(task)[1])
    if task.mode == "inference":
        model.eval()
        forward = nnx.jit(lambda m, x: m(x))
        return lambda: forward(model, x).block_until_ready()
    model.train()
    optimizer = nnx.Optimizer(model, _sgd_with_lr(), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return lambda: step(model, optimizer, x, y).block_until_ready()


# --- torchvision ------------------------------------------------------------------------------

def _torch_model(task: Task):
    import torchvision
    name = task.model
    if name in ("densenet121", "densenet169", "densenet201", "densenet161"):
        return getattr(torchvision.models, name)(weights=None)
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from torch_twins import cifar_bc_model
    config = dj.get_config(name)
    depth = sum(config.block_config) * 2 + 4
    return cifar_bc_model(depth, config.growth_rate, config.num_classes)


def torch_eager(task: Task, channels_last=False, compile=False) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F
    model = _torch_model(task)
    x, y = _data(task)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y).long()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if task.mode == "inference":
        model.eval()
        forward = torch.compile(model) if compile else model

        def run():
            with torch.no_grad():
                forward(x)
        return run
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return torch.compile(train_step) if compile else train_step


# --- Keras 3 on JAX ---------------------------------------------------------------------------

def keras_available() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("keras") is not None
    except ValueError:
        return False


def keras_jax(task: Task) -> Callable[[], None]:
    import os
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    if task.model != "densenet121" or task.mode != "inference":
        raise NotImplementedError("Keras has DenseNet121 (ImageNet) only; measured for inference")
    model = keras.applications.DenseNet121(weights=None, input_shape=(task.size, task.size, 3))
    x = _data(task)[0]
    model.predict(x, verbose=0)
    return lambda: np.asarray(model(x, training=False))


CONTENDERS: dict[str, Callable[..., Callable[[], None]]] = {
    "densenet_jax": jax_split,
    "densenet_jax nnx.jit": jax_nnx_jit,
    "torch eager": torch_eager,
    "torch channels_last": lambda task: torch_eager(task, channels_last=True),
    "torch.compile": lambda task: torch_eager(task, channels_last=True, compile=True),
    "keras-jax": keras_jax,
}

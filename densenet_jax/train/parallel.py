"""Where the steps run: ``mesh`` (jit over a device mesh, the batch sharded across it) or
``pmap`` (one replica per device, BatchNorm synchronised through an axis name), over every
device of every process.

Under ``mesh`` the batch statistics are global by construction (XLA computes the mean over the
sharded batch); under ``pmap`` the BatchNorm layers average theirs across the ``batch`` axis.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from densenet_jax.model.densenet import DenseNet
from densenet_jax.train.trace_cache import StoredJit
from densenet_jax.train.step import Steps, TrainState

PMAP_AXIS = "batch"


class Runner:
    """What both forms share: run the steps on placed state and batches, read results back."""

    steps: Steps
    rest: object

    def train(self, state, images, labels, lr: float):
        """One training step at learning rate ``lr`` on placed state and batch: (new state, metrics)."""
        return self._train(state, self.rest, images, labels, np.asarray(lr, self.steps.lr_dtype))

    def eval(self, state, images, labels, weights):
        """Sums of loss, correct predictions and weights over a placed batch."""
        return self._eval(state, self.rest, images, labels, weights)

    @staticmethod
    def host_state(state: TrainState) -> TrainState:
        """The state as numpy arrays on this host (every host and device holds all of it)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)

    @staticmethod
    def fetch(metrics) -> dict[str, float]:
        """Scalar metrics as floats (under pmap, the first device's copy: all are equal)."""
        return {k: float(np.asarray(v.addressable_data(0)).reshape(-1)[0]) for k, v in metrics.items()}


class Mesh(Runner):
    """jit over a 1-D mesh of all devices; parameters replicated, the batch split along "data".

    With ``store=(folder, config_key)`` (one process only) the traced train step is kept in
    ``folder`` and a rerun skips tracing it (see :mod:`densenet_jax.train.trace_cache`).
    """

    def __init__(self, model: DenseNet, tx: optax.GradientTransformation,
                 store: tuple[Path, str] | None = None, **step_options):
        self.steps = Steps(model, tx, **step_options)
        # Auto axes: XLA propagates the shardings (the batch split, weights replicated) by itself.
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P("data"))
        self.rest = jax.device_put(self.steps.rest, self.replicated)
        # flatbuffers (jax.export's serialisation) is a dependency, but a checkout run with
        # PYTHONPATH=. on a machine that lacks it still trains, tracing every time.
        if store is not None and jax.process_count() == 1 and importlib.util.find_spec("flatbuffers"):
            self._train = StoredJit(self.steps.train, *store, out_structure=self.steps.train_result_structure,
                                    out_sharding=self.replicated)
        else:
            self._train = jax.jit(self.steps.train, donate_argnums=0,
                                  out_shardings=(self.replicated, self.replicated))
        self._eval = jax.jit(self.steps.eval, out_shardings=self.replicated)

    def place_state(self, state: TrainState) -> TrainState:
        """``state`` replicated over the mesh."""
        return jax.device_put(state, self.replicated)

    def place_batch(self, *arrays: np.ndarray) -> list[jax.Array]:
        """This process's slice of the global batch, as one global array per input."""
        return [jax.make_array_from_process_local_data(self.sharded, a) for a in arrays]


class Pmap(Runner):
    """pmap over this process's devices (pmap spans every process's devices under jax.distributed)."""

    def __init__(self, model: DenseNet, tx: optax.GradientTransformation, **step_options):
        self.steps = Steps(model, tx, axis_name=PMAP_AXIS, **step_options)
        self.devices = jax.local_devices()
        self.rest = self.steps.rest
        self._train = jax.pmap(self.steps.train, axis_name=PMAP_AXIS, in_axes=(0, None, 0, 0, None),
                               donate_argnums=0)
        self._eval = jax.pmap(self.steps.eval, axis_name=PMAP_AXIS, in_axes=(0, None, 0, 0, 0))

    def place_state(self, state: TrainState) -> TrainState:
        """One copy per local device, stacked along a leading axis as pmap takes it."""
        stacked = NamedSharding(jax.sharding.Mesh(np.array(self.devices), ("replica",)), P("replica"))
        n = len(self.devices)
        return jax.device_put(jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), state), stacked)

    @staticmethod
    def host_state(state: TrainState) -> TrainState:
        """The first device's replica, without the device axis, as numpy arrays."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), state)

    def place_batch(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """This process's batch split into one slice per local device."""
        n = len(self.devices)
        if len(arrays[0]) % n:
            raise ValueError(f"per-process batch {len(arrays[0])} is not divisible by {n} devices")
        return [a.reshape(n, len(a) // n, *a.shape[1:]) for a in arrays]


def make(kind: str, model: DenseNet, tx: optax.GradientTransformation,
         store: tuple[Path, str] | None = None, **step_options) -> Runner:
    """The runner for ``kind``: ``mesh`` (which can keep its traced step in ``store``) or ``pmap``."""
    if kind == "mesh":
        return Mesh(model, tx, store, **step_options)
    if kind == "pmap":
        return Pmap(model, tx, **step_options)
    raise ValueError(f"unknown parallel mode {kind!r}: mesh or pmap")

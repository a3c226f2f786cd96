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
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from densenet_jax.model.densenet import DenseNet
from densenet_jax.train.trace_cache import StoredJit
from densenet_jax.train.step import Steps, TrainState

PMAP_AXIS = "batch"


def process_ordered_devices() -> np.ndarray:
    """Every device, each process's together in process order (pmap's order): the global batch
    is then process 0's examples, then process 1's, as one process would hold them, and each
    example meets the dropout mask (and, under pmap, the device key) it would meet there."""
    return np.array([d for i in range(jax.process_count()) for d in jax.local_devices(i)])


def replicate(tree, sharding: NamedSharding):
    """``tree`` (arrays with the same values in every process) placed whole on every device of
    ``sharding``. Typed PRNG keys (dropout's RNG state) travel as their data and are wrapped again
    on the devices, all in one program: across processes ``jax.device_put`` places plain arrays only."""
    leaves, treedef = jax.tree.flatten(tree)
    impls = [jax.random.key_impl(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else None
             for x in leaves]
    data = jax.device_put([np.asarray(jax.random.key_data(x)) if impl else x for x, impl in zip(leaves, impls)],
                          sharding)
    if any(impls):
        data = jax.jit(lambda d: [jax.random.wrap_key_data(v, impl=impl) if impl else v
                                  for v, impl in zip(d, impls)], out_shardings=sharding)(data)
    return treedef.unflatten(data)


class Runner:
    """What both forms share: state replicated and the batch split over a 1-D mesh of every device;
    run the steps on them, read results back."""

    steps: Steps
    rest: object
    replicated: NamedSharding
    sharded: NamedSharding

    def train(self, state, images, labels, lr: float):
        """One training step at learning rate ``lr`` on placed state and batch: (new state, metrics)."""
        return self._train(state, self.rest, images, labels, np.asarray(lr, self.steps.lr_dtype))

    def eval(self, state, images, labels, weights):
        """Sums of loss, correct predictions and weights over a placed batch."""
        return self._eval(state, self.rest, images, labels, weights)

    def scores(self, state, images, labels, weights) -> dict:
        """The eval logits of a placed batch, with its labels and weights, each whole on every
        device (:meth:`Steps.scores`; compiled on first use, as plain jit under both forms)."""
        if getattr(self, "_scores", None) is None:
            self._scores = jax.jit(self.steps.scores, out_shardings=self.replicated)
        return self._scores(state, self.rest, images, labels, weights)

    def place_state(self, state: TrainState) -> TrainState:
        """``state`` replicated over the mesh."""
        return jax.device_put(state, self.replicated)

    def place_batch(self, *arrays: np.ndarray) -> list[jax.Array]:
        """This process's slice of the global batch, as one global array per input."""
        return [jax.make_array_from_process_local_data(self.sharded, a) for a in arrays]

    @staticmethod
    def host_state(state: TrainState) -> TrainState:
        """The state as numpy arrays on this host (every host and device holds all of it)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)

    @staticmethod
    def fetch(metrics) -> dict[str, float]:
        """Scalar metrics as floats (every device holds the same value)."""
        return {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}


class Mesh(Runner):
    """jit over a 1-D mesh of all devices; parameters replicated, the batch split along "data".

    With ``store=(folder, config_key)`` (one process only) the traced train step is kept in
    ``folder`` and a rerun skips tracing it (see :mod:`densenet_jax.train.trace_cache`).
    """

    def __init__(self, model: DenseNet, tx: optax.GradientTransformation,
                 store: tuple[Path, str] | None = None, **step_options):
        self.steps = Steps(model, tx, **step_options)
        # Auto, not make_mesh's default Explicit: the model is written without sharding
        # annotations, and under Explicit axes JAX refuses ops whose output sharding it cannot
        # infer (the pooling's reshape of the batch-split activations). Under Auto XLA propagates
        # the batch split and the replicated weights itself, which makes BatchNorm's statistics the
        # global batch's.
        mesh = jax.sharding.Mesh(process_ordered_devices(), ("data",), axis_types=(AxisType.Auto,))
        self.replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P("data"))
        self.rest = replicate(self.steps.rest, self.replicated)
        # flatbuffers (jax.export's serialisation) is a dependency, but a checkout run with
        # PYTHONPATH=. on a machine that lacks it still trains, tracing every time.
        if store is not None and jax.process_count() == 1 and importlib.util.find_spec("flatbuffers"):
            self._train = StoredJit(self.steps.train, *store, out_structure=self.steps.train_result_structure,
                                    out_sharding=self.replicated)
        else:
            self._train = jax.jit(self.steps.train, donate_argnums=0,
                                  out_shardings=(self.replicated, self.replicated))
        self._eval = jax.jit(self.steps.eval, out_shardings=self.replicated)


class Pmap(Runner):
    """pmap's semantics, each device a replica running the steps on its slice of the batch, with
    BatchNorm statistics, gradients and metrics averaged or summed across the ``batch`` axis.

    Written as jit over ``jax.shard_map``, which is what ``jax.pmap`` itself now runs on: the form
    JAX maintains, without pmap's stacked per-device copies of the state.
    """

    def __init__(self, model: DenseNet, tx: optax.GradientTransformation, **step_options):
        self.steps = Steps(model, tx, axis_name=PMAP_AXIS, **step_options)
        # Auto: shard_map sets every sharding.
        mesh = jax.sharding.Mesh(process_ordered_devices(), (PMAP_AXIS,), axis_types=(AxisType.Auto,))
        self.replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P(PMAP_AXIS))
        self.local_device_count = jax.local_device_count()
        self.rest = replicate(self.steps.rest, self.replicated)
        split = P(PMAP_AXIS)
        self._train = jax.jit(self._map(mesh, self.steps.train, (P(), P(), split, split, P())),
                              donate_argnums=0)
        self._eval = jax.jit(self._map(mesh, self.steps.eval, (P(), P(), split, split, split)))

    @staticmethod
    def _map(mesh, step, in_specs):
        # check_vma=False, as pmap has it: the step averages each device's own gradients itself
        # (pmean), which shard_map's replication typing does not express; with the check on, the
        # model's custom VJPs are refused for giving per-device cotangents to replicated weights.
        return jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)

    def place_batch(self, *arrays: np.ndarray) -> list[jax.Array]:
        """This process's batch, one slice per local device."""
        if len(arrays[0]) % self.local_device_count:
            raise ValueError(f"per-process batch {len(arrays[0])} is not divisible by "
                             f"{self.local_device_count} devices")
        return super().place_batch(*arrays)


def make(kind: str, model: DenseNet, tx: optax.GradientTransformation,
         store: tuple[Path, str] | None = None, **step_options) -> Runner:
    """The runner for ``kind``: ``mesh`` (which can keep its traced step in ``store``) or ``pmap``."""
    if kind == "mesh":
        return Mesh(model, tx, store, **step_options)
    if kind == "pmap":
        return Pmap(model, tx, **step_options)
    raise ValueError(f"unknown parallel mode {kind!r}: mesh or pmap")

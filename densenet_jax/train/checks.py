"""Checks that refuse a training run before its work directory is touched or anything compiles,
where the answer depends on this machine, the data or a file rather than on the config's own values
(those :class:`densenet_jax.train.config.TrainConfig` checks when built); each raises ValueError
(SingleValueStatistics for a BatchNorm) in one line saying what to change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.model.densenet import DenseNet, smallest_input
from densenet_jax.model.registry import architecture_name
from densenet_jax.train.config import PRECISIONS, TrainConfig, check_choice
from densenet_jax.weights.format import read_safetensors


def check_steps_per_epoch(steps: int, batch_size: int, train_examples: int) -> None:
    """Refuse an epoch of no steps: a batch larger than the training split."""
    if steps == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {train_examples} training examples")


def check_accumulation(steps: int, accum_steps: int) -> None:
    """Refuse an epoch whose steps do not split into whole updates (timm's last, shorter
    accumulation of an epoch has no counterpart here)."""
    if steps % accum_steps:
        raise ValueError(f"--grad-accum-steps {accum_steps}: must divide the {steps} steps of an epoch")


def check_image_size(architecture: DenseNetConfig, image_size: int, dataset: str) -> None:
    """Refuse images too small to leave every stage of ``architecture`` at least a pixel."""
    minimum = smallest_input(architecture)
    if image_size < minimum:
        raise ValueError(f"images of {image_size}x{image_size} are too small for "
                         f"{architecture_name(architecture)}: at least {minimum}x{minimum}"
                         + (" (--image-size)" if dataset == "folder" else ""))


def check_batch_norm_inputs(model: DenseNet, batch_size: int, image_size: int) -> None:
    """Refuse a train step in which some BatchNorm would average one value per channel (see
    :class:`densenet_jax.model.layers.SingleValueStatistics`, raised with the layer's path).

    Only a global batch of 1 can do that (mesh and pmap both average over the global batch), so only
    then is the forward pass traced, abstractly (``jax.eval_shape``: shapes only, no compilation).
    """
    if batch_size != 1:
        return
    graphdef, state = nnx.split(model)  # merged anew inside: the trace never touches ``model``
    spec = jax.ShapeDtypeStruct((1, image_size, image_size, model.config.in_chans), jnp.float32)
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, spec)


def check_precision_available(precision: str) -> None:
    """Refuse fp64 when JAX was started without 64-bit types (it would silently compute in fp32)."""
    if precision == "fp64" and not jax.config.jax_enable_x64:
        raise ValueError("--precision fp64 needs jax_enable_x64 (JAX_ENABLE_X64=1)")


def compute_dtype(precision: str):
    """The dtype that ``precision`` computes in. ValueError for an unknown precision, and for fp64
    while JAX's 64-bit mode is off (float64 arrays would silently be float32)."""
    check_choice("--precision", precision, PRECISIONS)
    check_precision_available(precision)
    return PRECISIONS[precision]


def check_model_matches(config: TrainConfig) -> None:
    """``config.model`` names the architecture of the ``config.init_from`` file (heads aside), when
    both are given; else ValueError. Reads the file's header (CheckpointError, FileNotFoundError)."""
    if not (config.model and config.init_from):
        return
    stored = architecture_name(read_safetensors(config.init_from)[1])
    if stored != config.model:
        raise ValueError(f"--model {config.model} contradicts --init-from {config.init_from}, which holds "
                         f"{stored}: leave --model out to train the file's architecture")


def check_devices(batch_size: int) -> None:
    """ValueError unless the global batch splits evenly over every process's devices (else a raw
    sharding error once compiled). After ``jax.distributed.initialize``, where there are hosts."""
    processes, devices = jax.process_count(), jax.device_count()
    if batch_size % devices:
        raise ValueError(f"--batch-size {batch_size} does not split over {devices} devices "
                         f"({processes} process{'es' * (processes > 1)}): use a multiple of {devices}")

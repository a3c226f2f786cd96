"""Flax weights as safetensors: a flat ``{"features.conv0.kernel": array}`` plus the config.

The file alone rebuilds the model: its metadata holds the DenseNetConfig as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from densenet_jax.backbone import DenseNetFeatures
from densenet_jax.configs import DenseNetConfig
from densenet_jax.errors import CheckpointError
from densenet_jax.models import DenseNet

log = logging.getLogger("densenet_jax")

FORMAT = "densenet_jax"
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)
_HEAD = "classifier."


def state_arrays(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters and BatchNorm statistics by dotted path (``features.norm0.mean``)."""
    return {".".join(map(str, path)): var.get_value()
            for path, var in nnx.to_flat_state(nnx.state(model, _WEIGHTS))}


def check_arrays(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """CheckpointError unless ``arrays`` has exactly the keys of ``shapes``, each with that shape."""
    missing = sorted(shapes.keys() - arrays.keys())
    extra = sorted(arrays.keys() - shapes.keys())
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]}" + _more(missing))
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]}" + _more(extra))
    for key, shape in shapes.items():
        if tuple(arrays[key].shape) != tuple(shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(arrays[key].shape)}, "
                                  f"the model expects {tuple(shape)}")


def assign(model: nnx.Module, arrays: dict[str, np.ndarray], source: str = "arrays") -> None:
    """Set every parameter and statistic of ``model`` from ``arrays``: same keys, same shapes.

    Values are cast to the dtype the model holds. ``source`` names the origin in error messages.
    """
    state = nnx.state(model, _WEIGHTS)
    flat = [(".".join(map(str, path)), var) for path, var in nnx.to_flat_state(state)]
    check_arrays(arrays, {key: var.shape for key, var in flat}, source)
    for key, var in flat:
        var[...] = jax.numpy.asarray(arrays[key], dtype=var.dtype)
    nnx.update(model, state)


def cast(model: nnx.Module, dtype) -> None:
    """Store every floating-point parameter and statistic of ``model`` as ``dtype`` (e.g. float64
    for reference checks; the model computes in the dtype of its input)."""
    state = nnx.state(model, _WEIGHTS)
    nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), state))


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def config_to_json(config: DenseNetConfig) -> str:
    """The config as the JSON stored in a weights file's metadata."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str, source: str) -> DenseNetConfig:
    """The config stored as ``text``; CheckpointError naming ``source`` if it is not a valid one."""
    try:
        return DenseNetConfig(**json.loads(text))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: metadata holds no valid DenseNet config ({e})") from None


def write_safetensors(arrays: dict[str, np.ndarray], config: DenseNetConfig, path: str | os.PathLike,
                      *, force: bool = True, class_names: list[str] | None = None) -> None:
    """Write ``arrays`` and ``config`` (and the names of the classes, when known) to ``path``
    atomically: a temporary file, then a rename."""
    from safetensors.numpy import save

    path = Path(path)
    if not force and path.exists():
        raise CheckpointError(f"{path}: already exists (pass --force to overwrite)")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: folder {path.parent} does not exist")
    metadata = {"format": FORMAT, "config": config_to_json(config)}
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    payload = save({k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}, metadata=metadata)
    atomic_write_bytes(path, payload)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it, so no half-written file remains."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """The arrays and config of a densenet_jax safetensors file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    data = path.read_bytes()
    try:
        arrays = load(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: not a densenet_jax weights file (no config in its metadata; "
                              "convert torch checkpoints with convert/torch_to_flax.py)")
    for key, value in arrays.items():
        if value.dtype.kind != "f":
            raise CheckpointError(f"{path}: {key} is {value.dtype}, not floating-point")
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds NaN or Inf values")
    return arrays, config_from_json(metadata["config"], str(path))


def stored_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a weights file was trained with (``densenet-jax train`` stores them), or None."""
    with open(path, "rb") as f:
        head = f.read(8)
        header = head + f.read(int.from_bytes(head, "little"))
    try:
        names = _safetensors_metadata(header).get("class_names")
        return json.loads(names) if names else None
    except ValueError:
        return None


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header: 8-byte little-endian length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return header.get("__metadata__") or {}


def save(model: DenseNet, path: str | os.PathLike) -> None:
    """Write ``model``'s weights and config to ``path`` (safetensors), atomically."""
    write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config, path)


def load(path: str | os.PathLike, *, rngs: nnx.Rngs | None = None, features_only: bool = False,
         out_indices=None, **overrides):
    """Rebuild the model saved at ``path``; ``overrides`` replace config fields.

    With ``num_classes`` different from the file's, every weight but the classifier is loaded and the
    classifier is freshly initialised from ``rngs`` (for fine-tuning). ``features_only=True`` gives
    its backbone (:class:`densenet_jax.DenseNetFeatures`) returning the feature maps ``out_indices``.
    Raises CheckpointError, naming the file and the fault, for anything unusable.
    """
    if features_only:
        return DenseNetFeatures(load(path, rngs=rngs, **overrides), out_indices)
    arrays, config = read_safetensors(path)
    new_config = config.replace(**overrides)
    model = DenseNet(new_config, rngs=rngs if rngs is not None else nnx.Rngs(0))
    if new_config.num_classes != config.num_classes:
        log.warning("%s: new %d-class classifier, freshly initialised (the file's has %d classes)",
                    path, new_config.num_classes, config.num_classes)
        fresh_head = {k: v for k, v in state_arrays(model).items() if k.startswith(_HEAD)}
        arrays = {**{k: v for k, v in arrays.items() if not k.startswith(_HEAD)}, **fresh_head}
    assign(model, arrays, source=str(path))
    return model

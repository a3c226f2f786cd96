"""Flax weights as safetensors: a flat ``{"features.conv0.kernel": array}`` plus the config.

The file alone rebuilds the model: its metadata holds the DenseNetConfig as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import nnx
from safetensors import SafetensorError

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.errors import CheckpointError
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.files import atomic_write_bytes, check_output

FORMAT = "densenet_jax"
HEAD = "classifier."  # the classifier's keys, which a new head replaces
CONV0 = "features.conv0.kernel"  # the first convolution, which in_chans adapts
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


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


def is_floating(dtype) -> bool:
    """Whether ``dtype`` is a floating-point type, bfloat16 included (numpy files it under kind
    ``V``, so ``dtype.kind == "f"`` refuses it)."""
    return jax.dtypes.issubdtype(dtype, jax.numpy.floating)


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file at ``path`` as a numpy array of the file's dtype: F64,
    F32, F16, and BF16 as ``ml_dtypes.bfloat16`` (what jax gives for a bf16 array). Read with
    safetensors' own file reader, which knows BF16; its reader of bytes
    (``safetensors.numpy.load``) does not. SafetensorError for a file that is not safetensors."""
    return safetensors.numpy.load_file(path)


def to_torch_tensor(torch, array: np.ndarray):
    """``array`` as a torch tensor of the same dtype; a bfloat16 one through its bits, since
    ``torch.from_numpy`` does not know ml_dtypes' bfloat16."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


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
                      *, force: bool = True, class_names: list[str] | None = None,
                      pretrained_cfg: PretrainedCfg | None = None, multi_label: bool = False) -> None:
    """Write ``arrays`` and ``config`` (and, when known, the names of the classes and the
    preprocessing the weights expect) to ``path`` atomically: a temporary file, then a rename.
    ``multi_label``: the outputs are independent labels (a sigmoid each; ``class_names`` name the
    labels), recorded as ``"multi_label": "true"`` in the metadata."""
    path = Path(path)
    check_output(path, force=force)
    metadata = {"format": FORMAT, "config": config_to_json(config)}
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    if pretrained_cfg is not None:
        metadata["pretrained_cfg"] = pretrained_cfg.to_json()
    if multi_label:
        metadata["multi_label"] = "true"
    payload = safetensors.numpy.save({k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}, metadata=metadata)
    atomic_write_bytes(path, _sorted_header(payload))


def _sorted_header(payload: bytes) -> bytes:
    """``payload`` with its safetensors header's keys in sorted order, so that the same weights give
    the same bytes: safetensors writes the metadata in a hash map's order, which changes from
    one call to the next. The header stays padded with spaces to a multiple of 8 bytes (the format's
    alignment); the tensor data and its offsets are unchanged."""
    length = int.from_bytes(payload[:8], "little")
    header = json.dumps(json.loads(payload[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + payload[8 + length:]


@dataclasses.dataclass(frozen=True)
class Weights:
    """A set of weights ready to go into a model: our keys and layouts (``features.conv0.kernel``,
    HWIO), the config they fit, where they came from (named in messages), and the preprocessing
    they expect and the names of their classes when known."""
    arrays: dict[str, np.ndarray]
    config: DenseNetConfig
    source: str
    pretrained_cfg: PretrainedCfg | None = None
    class_names: list[str] | None = None
    multi_label: bool = False  # a sigmoid per output (write_safetensors)


def read_weights(path: str | os.PathLike) -> Weights:
    """The weights, config, stored preprocessing and class names of a densenet_jax safetensors
    file; CheckpointError naming the file for anything unusable."""
    arrays, config = read_safetensors(path)
    return Weights(arrays, config, str(path), stored_pretrained_cfg(path), stored_class_names(path),
                   stored_multi_label(path))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """The arrays and config of a densenet_jax safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if file_format(path) == "torch":
        out = (path.with_suffix(".safetensors") if path.suffix != ".safetensors"
               else path.with_name(f"{path.stem}-converted.safetensors"))
        raise CheckpointError(f"{path}: a torch checkpoint, not densenet_jax weights; convert it first: "
                              f"densenet-jax convert {path} {out}")
    try:
        arrays = load_arrays(path)
        metadata = header_metadata(path)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: not a densenet_jax weights file (no config in its metadata; "
                              "convert torchvision or timm weights with densenet-jax convert)")
    for key, value in arrays.items():
        if not is_floating(value.dtype):
            raise CheckpointError(f"{path}: {key} is {value.dtype}, not floating-point")
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds NaN or Inf values")
    return arrays, config_from_json(metadata["config"], str(path))


def file_format(path: str | os.PathLike) -> str | None:
    """What the file at ``path`` holds, from its first bytes: ``"densenet_jax"`` (our weights),
    ``"safetensors"`` (any other safetensors file), ``"torch"`` (``torch.save``'s zip archive, or its
    legacy format: a pickle, protocol 2 or higher), or None. Reads the header only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04" or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
            return "torch"
        if len(head) < 8 or f.read(1) != b"{":
            return None
        header = head + b"{" + f.read(min(int.from_bytes(head, "little"), 100_000_000) - 1)
    try:
        metadata = safetensors_metadata(header)
    except (ValueError, AttributeError):  # not JSON, or JSON of another shape: not safetensors
        return None
    return FORMAT if metadata.get("format") == FORMAT else "safetensors"


def stored_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a weights file was trained with (``densenet-jax train`` stores them), or None."""
    try:
        names = header_metadata(path).get("class_names")
        return json.loads(names) if names else None
    except ValueError:
        return None


def stored_multi_label(path: str | os.PathLike) -> bool:
    """Whether a weights file's outputs are independent labels (``write_safetensors``'s
    ``multi_label``) rather than the classes of one softmax."""
    return header_metadata(path).get("multi_label") == "true"


def stored_pretrained_cfg(path: str | os.PathLike) -> PretrainedCfg | None:
    """The preprocessing stored with a weights file (a pretrained tag's, or the one a
    ``densenet-jax train`` run used), or None; CheckpointError naming the file if it is invalid."""
    text = header_metadata(path).get("pretrained_cfg")
    if not text:
        return None
    try:
        return PretrainedCfg.from_dict(json.loads(text))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata holds no valid pretrained_cfg ({e})") from None


def header_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file at ``path``, reading only its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        return safetensors_metadata(head + f.read(int.from_bytes(head, "little")))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header: 8-byte little-endian length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return header.get("__metadata__") or {}


def save(model: DenseNet, path: str | os.PathLike) -> None:
    """Write ``model``'s weights, config, preprocessing and class names (``model.pretrained_cfg``,
    ``model.class_names``, when it has them, and ``model.multi_label``) to ``path`` (safetensors),
    atomically."""
    write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config, path,
                      pretrained_cfg=model.pretrained_cfg, class_names=model.class_names,
                      multi_label=model.multi_label)

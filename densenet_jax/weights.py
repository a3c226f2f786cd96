"""Flax weights as safetensors: a flat ``{"features.conv0.kernel": array}`` plus the config.

The file alone rebuilds the model: its metadata holds the DenseNetConfig as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from densenet_jax.backbone import DenseNetFeatures
from densenet_jax.configs import DenseNetConfig
from densenet_jax.errors import CheckpointError
from densenet_jax.models import DenseNet
from densenet_jax.pretrained import HF_HUB_PREFIX, PretrainedCfg, adapt_input_conv

log = logging.getLogger("densenet_jax")

FORMAT = "densenet_jax"
_WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)
_HEAD = "classifier."
_CONV0 = "features.conv0.kernel"


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
                      *, force: bool = True, class_names: list[str] | None = None,
                      pretrained_cfg: PretrainedCfg | None = None) -> None:
    """Write ``arrays`` and ``config`` (and, when known, the names of the classes and the
    preprocessing the weights expect) to ``path`` atomically: a temporary file, then a rename."""
    from safetensors.numpy import save

    path = Path(path)
    check_output(path, force)
    metadata = {"format": FORMAT, "config": config_to_json(config)}
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    if pretrained_cfg is not None:
        metadata["pretrained_cfg"] = pretrained_cfg.to_json()
    payload = save({k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}, metadata=metadata)
    atomic_write_bytes(path, _sorted_header(payload))


def check_output(path: Path, force: bool, source: Path | None = None) -> None:
    """CheckpointError unless ``path`` can be written: its folder exists, and it does not exist yet
    (or ``force``), and it is not the file ``source`` being read."""
    if path.exists() and source is not None and path.resolve() == Path(source).resolve():
        raise CheckpointError(f"{path}: is the input file; write the output elsewhere")
    if not force and path.exists():
        raise CheckpointError(f"{path}: already exists (pass --force to overwrite)")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: folder {path.parent} does not exist")


def _sorted_header(payload: bytes) -> bytes:
    """``payload`` with its safetensors header's keys in sorted order, so that the same weights give
    the same bytes: safetensors 0.8 writes the metadata in a hash map's order, which changes from
    one call to the next. The header stays padded with spaces to a multiple of 8 bytes (the format's
    alignment); the tensor data and its offsets are unchanged."""
    length = int.from_bytes(payload[:8], "little")
    header = json.dumps(json.loads(payload[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + payload[8 + length:]


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it, so no half-written file remains.

    The file gets the mode the umask gives a new file (0644 under the usual 022), as ``open`` would:
    the temporary file is created with 0666 and the kernel applies the umask (``mkstemp``'s 0600
    would survive the rename and hide the file from colleagues sharing a runs folder). It is
    fsynced before the rename, so a power cut leaves the old file or the new one, never an empty one.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail after the write; say so first, in one line
        raise CheckpointError(f"{path}: is a folder; name a file to write")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
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
    if file_format(path) == "torch":
        out = (path.with_suffix(".safetensors") if path.suffix != ".safetensors"
               else path.with_name(f"{path.stem}-converted.safetensors"))
        raise CheckpointError(f"{path}: a torch checkpoint, not densenet_jax weights; convert it first: "
                              f"densenet-jax convert {path} {out}")
    data = path.read_bytes()
    try:
        arrays = load(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: not a densenet_jax weights file (no config in its metadata; "
                              "convert torchvision or timm weights with densenet-jax convert)")
    for key, value in arrays.items():
        if value.dtype.kind != "f":
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
        metadata = _safetensors_metadata(header)
    except (ValueError, AttributeError):  # not JSON, or JSON of another shape: not safetensors
        return None
    return FORMAT if metadata.get("format") == FORMAT else "safetensors"


def stored_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a weights file was trained with (``densenet-jax train`` stores them), or None."""
    try:
        names = _header_metadata(path).get("class_names")
        return json.loads(names) if names else None
    except ValueError:
        return None


def stored_pretrained_cfg(path: str | os.PathLike) -> PretrainedCfg | None:
    """The preprocessing stored with a weights file (a pretrained tag's, or the one a
    ``densenet-jax train`` run used), or None; CheckpointError naming the file if it is invalid."""
    text = _header_metadata(path).get("pretrained_cfg")
    if not text:
        return None
    try:
        return PretrainedCfg.from_dict(json.loads(text))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata holds no valid pretrained_cfg ({e})") from None


def _header_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file at ``path``, reading only its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        return _safetensors_metadata(head + f.read(int.from_bytes(head, "little")))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header: 8-byte little-endian length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return header.get("__metadata__") or {}


def save(model: DenseNet, path: str | os.PathLike) -> None:
    """Write ``model``'s weights, config and preprocessing (``model.pretrained_cfg``, when it has
    one) to ``path`` (safetensors), atomically."""
    write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config, path,
                      pretrained_cfg=model.pretrained_cfg)


def load(path: str | os.PathLike, *, rngs: nnx.Rngs | None = None, features_only: bool = False,
         out_indices=None, **overrides):
    """Rebuild the model saved at ``path``; ``overrides`` replace config fields.

    ``path`` may also be ``"hf-hub:<repo>"``, a Hugging Face Hub repo laid out as timm's
    (:func:`densenet_jax.hub.load_hub`). With ``num_classes`` different from the file's, every
    weight but the classifier is loaded and the classifier is freshly initialised from ``rngs`` (for
    fine-tuning); ``in_chans`` adapts the first convolution (:func:`densenet_jax.pretrained.adapt_input_conv`).
    ``features_only=True`` gives its backbone (:class:`densenet_jax.DenseNetFeatures`) returning the
    feature maps ``out_indices``. Raises CheckpointError, naming the file and the fault, for
    anything unusable.
    """
    if str(path).startswith(HF_HUB_PREFIX):
        from densenet_jax.hub import load_hub
        return load_hub(str(path)[len(HF_HUB_PREFIX):], rngs=rngs, features_only=features_only,
                        out_indices=out_indices, **overrides)
    arrays, config = read_safetensors(path)
    return build(arrays, config, str(path), rngs=rngs, features_only=features_only,
                 out_indices=out_indices, pretrained_cfg=stored_pretrained_cfg(path), **overrides)


def build(arrays: dict[str, np.ndarray], config: DenseNetConfig, source: str, *,
          rngs: nnx.Rngs | None = None, features_only: bool = False,
          out_indices: tuple[int, ...] | None = None, pretrained_cfg: PretrainedCfg | None = None,
          **overrides):
    """The model ``config`` describes holding ``arrays`` (our keys and layouts), with ``overrides``
    as :func:`load` takes them; ``pretrained_cfg`` becomes ``model.pretrained_cfg`` (adapted to
    ``in_chans``). ``source`` names the weights in messages and errors."""
    new_config = config.replace(**overrides)
    model = DenseNet(new_config, rngs=rngs if rngs is not None else nnx.Rngs(0))
    if new_config.num_classes != config.num_classes:
        if new_config.num_classes:  # 0: the head is dropped, nothing new to say
            had = f"the file's has {config.num_classes} classes" if config.num_classes else "the file has none"
            log.warning("%s: new %d-class classifier, freshly initialised (%s)", source, new_config.num_classes, had)
        fresh_head = {k: v for k, v in state_arrays(model).items() if k.startswith(_HEAD)}
        arrays = {**{k: v for k, v in arrays.items() if not k.startswith(_HEAD)}, **fresh_head}
    if new_config.in_chans != config.in_chans:
        arrays = {**arrays, _CONV0: _adapted_conv0(arrays[_CONV0], new_config.in_chans, source)}
    assign(model, arrays, source=source)
    if pretrained_cfg is not None:
        model.pretrained_cfg = pretrained_cfg.with_in_chans(new_config.in_chans)
    if features_only:
        backbone = DenseNetFeatures(model, out_indices)
        backbone.pretrained_cfg = model.pretrained_cfg
        return backbone
    return model


def _adapted_conv0(kernel: np.ndarray, in_chans: int, source: str) -> np.ndarray:
    """conv0's HWIO kernel adapted to ``in_chans`` inputs through timm's rule (on OIHW)."""
    kernel = np.asarray(kernel)
    if kernel.shape[2] != 3:
        raise CheckpointError(f"{source}: {_CONV0} takes {kernel.shape[2]} channels; only 3-channel "
                              f"weights adapt to in_chans={in_chans}")
    return np.transpose(adapt_input_conv(in_chans, np.transpose(kernel, (3, 2, 0, 1))), (2, 3, 1, 0))

"""torch's checkpoint files <-> densenet_jax weights: what ``densenet-jax convert`` runs.

Reads what people have: a ``.pth``/``.pt`` (a state dict, or the dict a training script saves
around one: model, EMA copy, optimizer, scheduler, epoch, argparse arguments) or a safetensors file
with torchvision's key names, the DenseNet under any wrapper prefix. torch is imported only inside
the functions that read or write pickles, so that ``import densenet_jax`` and converting a
safetensors file need no torch; pickles are read with ``weights_only=True`` and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError

from densenet_jax.model.config import count_params
from densenet_jax.errors import CheckpointError
from densenet_jax.weights.torch_keys import (choose_prefix, densenet_keys, densenet_prefixes, from_torchvision,
                                  to_torchvision)
from densenet_jax.model.registry import architecture_name
from densenet_jax.weights.format import (FORMAT, atomic_write_bytes, check_output, file_format, is_floating,
                                         load_arrays, read_safetensors, stored_class_names, stored_pretrained_cfg,
                                         to_torch_tensor, write_safetensors)
from densenet_jax.weights import xrv

EXTRA = "the [convert] extra: pip install torch torchvision"
# torch.hub's download names: the hex after the stem's last '-' is a prefix of the file's SHA-256
# (torch.hub.HASH_REGEX and download_url_to_file; torchvision's densenet121-a639ec97.pth).
_HUB_HASH = re.compile(r"-([0-9a-f]{8,64})$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED = (re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)"),
            re.compile(r"unrecognized function (\S+)"), re.compile(r"but got <class '([^']+)'>"))


@dataclass(frozen=True)
class TorchCheckpoint:
    """The DenseNet found in a torch checkpoint file.

    state_dict: its tensors as numpy arrays of their own dtypes (float64, float32, float16 or
        ``ml_dtypes.bfloat16``; BN step counters as they are), keyed as
        torchvision keys them, the wrapper prefix removed.
    prefix: the prefix it sat under in the file's flattened keys ("" for a plain state dict,
        ``model.`` inside ``{"model": state_dict}``, ``module._orig_mod.`` for DDP over
        torch.compile, ...).
    others: the prefixes of the other DenseNets in the file (an EMA copy, a teacher).
    ignored: how many tensors outside ``prefix`` (optimizer state, other modules) were left out.
    op_threshs: torchxrayvision's operating points, where the file holds its ``op_threshs``
        buffer beside the network (NaN where an output has none), else None.
    """
    state_dict: dict[str, np.ndarray]
    prefix: str
    others: tuple[str, ...]
    ignored: int
    op_threshs: np.ndarray | None = None


def read_torch_checkpoint(path: str | Path, prefix: str | None = None) -> TorchCheckpoint:
    """The DenseNet in the ``.pth``/``.pt``/``.safetensors`` at ``path`` (``prefix`` picks one when
    it holds several; see :func:`densenet_jax.weights.torch_keys.choose_prefix`).

    Raises CheckpointError naming the file for a missing, empty or unreadable file, a torch.hub name
    whose hash does not match the contents, a pickle global outside the allow-list, densenet_jax's
    own format (nothing to convert), non-float or non-finite tensors, and when no DenseNet is found.
    """
    path = Path(path)
    _check_input(path)
    kind = file_format(path)
    if kind == FORMAT:
        raise CheckpointError(f"{path}: already densenet_jax weights (its own format, nothing to convert: "
                              "load it as it is, or densenet-jax convert --to torch for a .pth)")
    if kind is None:  # by its bytes, whatever its name: a text file named .pth is no pickle
        raise CheckpointError(f"{path}: not a loadable torch checkpoint or safetensors file (its first "
                              "bytes are neither a zip archive, a pickle nor a safetensors header)")
    flat = _read_safetensors(path) if kind == "safetensors" else _flatten(_unpickle(path))
    chosen = choose_prefix(flat, str(path), prefix)  # keys only: other tensors are never converted
    threshs = flat.get(chosen + xrv.THRESHOLDS_KEY)  # not weights, and NaN in it is meaningful
    state_dict = {key[len(chosen):]: _to_numpy(key, flat[key], path) for key in densenet_keys(flat, chosen)
                  if key != chosen + xrv.THRESHOLDS_KEY}
    return TorchCheckpoint(state_dict=state_dict, prefix=chosen,
                           others=tuple(p for p in densenet_prefixes(flat) if p != chosen),
                           ignored=len(flat) - len(state_dict) - (threshs is not None),
                           op_threshs=None if threshs is None else np.asarray(threshs, np.float64))


def _check_input(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    match = _HUB_HASH.search(path.stem)
    if match:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        expected, actual = match.group(1), digest.hexdigest()
        if not actual.startswith(expected):
            raise CheckpointError(f"{path}: SHA-256 begins {actual[:len(expected)]}, not {expected} as the "
                                  "name's torch.hub suffix says: a damaged or different download (download "
                                  "it again; rename the file if that suffix is no hash)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_arrays(path)
    except (SafetensorError, ValueError, TypeError, OSError) as e:  # TypeError: a dtype numpy lacks
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _unpickle(path: Path):
    """The object ``torch.save`` wrote, read with ``weights_only=True`` and the allow-list below."""
    torch = _import_torch()
    if torch is None:
        raise CheckpointError(f"{path}: a torch pickle; reading it needs torch ({EXTRA})")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = _ANSI.sub("", str(e))
        names = [m.group(1) for pattern in _REFUSED if (m := pattern.search(text))]
        if names:
            raise CheckpointError(f"{path}: refused to unpickle {names[0]} (only tensors, containers and "
                                  "plain records are read from a pickle; save the state_dict alone)") from None
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({_unpickler_reason(text)})") from None
    except Exception as e:  # torch raises many types for a bad file; all mean "not loadable"
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({_first_line(e)})") from None


def _allowed_globals() -> list:
    """What training checkpoints hold besides tensors, none of which can run code when rebuilt:
    ``argparse.Namespace`` (a script's arguments; rebuilt by setting attributes), paths (read as
    pure paths, which never touch the file system, whichever system wrote them), and numpy scalars,
    dtypes and arrays (a best accuracy as np.float64; object arrays hold only what the same
    restricted unpickler already rebuilt). Both numpy module names are listed: numpy 1 pickles
    ``numpy.core``, numpy 2 ``numpy._core``."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [argparse.Namespace, pathlib.PurePosixPath, pathlib.PureWindowsPath,
               (pathlib.PurePosixPath, "pathlib.PosixPath"), (pathlib.PureWindowsPath, "pathlib.WindowsPath"),
               np.dtype, np.ndarray]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += list({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"})  # numpy 2's dtype classes
    return allowed


def _flatten(obj, prefix: str = "") -> dict:
    """Every tensor in the containers ``obj`` nests, keyed by its path with dots, as Lightning keys
    its modules: ``{"model": {"features.conv0.weight": t}}`` gives ``model.features.conv0.weight``.
    Anything else (epochs, arguments, strings) is left out."""
    if _is_tensor(obj):
        return {prefix[:-1]: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    flat = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _is_tensor(value) -> bool:
    torch = sys.modules.get("torch")
    return isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor))


def _to_numpy(key: str, value, path: Path) -> np.ndarray:
    """``value`` (a torch tensor or numpy array) as a numpy array of its own dtype, so that a
    conversion keeps the file's precision both ways (bfloat16 as ``ml_dtypes.bfloat16``)."""
    array = value if isinstance(value, np.ndarray) else _torch_to_numpy(value.detach())
    if key.endswith("num_batches_tracked"):
        return array
    if not is_floating(array.dtype):
        raise CheckpointError(f"{path}: {key} is {value.dtype}, not a floating-point tensor")
    if not np.isfinite(array).all():
        raise CheckpointError(f"{path}: {key} holds NaN or Inf values")
    return array


def _torch_to_numpy(tensor) -> np.ndarray:
    """A CPU tensor as numpy, bfloat16 through its bits (``Tensor.numpy`` refuses bfloat16)."""
    torch = sys.modules["torch"]
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _unpickler_reason(text: str) -> str:
    """The weights_only unpickler's own words inside torch's message, without torch's paragraphs
    around them (which advise loading the file unsafely)."""
    paragraphs = [p.strip() for p in text.split("\n\n")[1:]]
    reasons = [p for p in paragraphs if p and not p.startswith("Check the documentation")]
    return reasons[0].splitlines()[0] if reasons else "refused by the weights_only unpickler"


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def to_densenet_jax(source: str | Path, output: str | Path, *, prefix: str | None = None,
                    force: bool = False, preprocess: str | None = None, xrv_weights: str | None = None) -> str:
    """Convert the torchvision/timm DenseNet checkpoint ``source`` to densenet_jax weights at
    ``output`` (atomically; an existing ``output`` only with ``force``). The architecture is read off
    the checkpoint's shapes; a checkpoint without a classifier gives a headless file
    (``num_classes`` 0). Returns the line that says what was converted. Raises CheckpointError.

    torchxrayvision's DenseNets (:mod:`densenet_jax.weights.xrv`): ``preprocess="xrv"`` records its
    input pipeline; ``xrv_weights`` (``densenet121-res224-all``, ...) also the names and
    thresholds its table gives those weights; a file holding xrv's ``op_threshs`` buffer records
    them and the pipeline unasked. ValueError for another ``preprocess``."""
    if preprocess not in (None, "xrv"):
        raise ValueError(f"--preprocess {preprocess!r}: the only preprocessing convert records is 'xrv'")
    source, output = Path(source), Path(output)
    check_output(output, force=force, source=source)
    published = xrv.xrv_weights(xrv_weights) if xrv_weights else None
    found = read_torch_checkpoint(source, prefix)
    arrays, config = from_torchvision(found.state_dict, str(source))
    cfg = class_names = None
    if preprocess or published or found.op_threshs is not None:
        cfg, class_names = xrv.xrv_record(config.num_classes, str(source), published, found.op_threshs)
        if config.in_chans != 1:
            raise CheckpointError(f"{source}: torchxrayvision's preprocessing gives 1 channel; the network takes "
                                  f"{config.in_chans}")
    # torchxrayvision's outputs are independent labels: a sigmoid each.
    write_safetensors(arrays, config, output, class_names=class_names, pretrained_cfg=cfg,
                      multi_label=cfg is not None)
    name = architecture_name(config)
    head = (f"{config.num_classes} classes" if config.num_classes else
            "no classifier (a backbone: load it with features_only=True, or num_classes=N for a new head)")
    line = f"{source} -> {output}: {name}, {head}, {count_params(config):,} parameters"
    if found.prefix:
        line += f"; the DenseNet under {found.prefix!r}"
    if found.others:
        line += f" (also in the file: {', '.join(map(repr, found.others))}; --prefix picks one)"
    if found.ignored:
        line += f"; {found.ignored} other tensor{'s' if found.ignored > 1 else ''} left out"
    if cfg is not None:
        line += (f"; torchxrayvision's preprocessing recorded{' with op_threshs' if cfg.op_threshs else ''}"
                 f"{f' and the names of {xrv_weights}' if class_names else ''}")
    return line


def to_torch(source: str | Path, output: str | Path, *, force: bool = False) -> str:
    """Write the densenet_jax weights ``source`` as a torchvision state dict (``.pth``) at ``output``,
    with a zero ``num_batches_tracked`` per BatchNorm as torchvision has; it loads strictly into
    ``torchvision.models.densenet121()`` (or the matching model; a headless file into one whose
    classifier is ``torch.nn.Identity()``). Needs torch. Returns the line that says what was written."""
    source, output = Path(source), Path(output)
    check_output(output, force=force, source=source)
    arrays, config = read_safetensors(source)
    torch = _import_torch()
    if torch is None:
        raise CheckpointError(f"{output}: writing a torch .pth needs torch ({EXTRA})")
    state_dict = {}
    for key, value in to_torchvision(arrays, config, str(source)).items():
        state_dict[key] = to_torch_tensor(torch, value)
        if key.endswith(".running_var"):  # torch's BN has a step counter; ours has none
            state_dict[key[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    atomic_write_bytes(output, buffer.getvalue())
    return f"{source} -> {output}: {len(state_dict)} tensors{_torch_class_note(config)}{_left_behind(source)}"


def _left_behind(source: Path) -> str:
    """What the weights file holds besides tensors, which a state dict cannot carry."""
    kept = [what for what, value in (("class names", stored_class_names(source)),
                                     ("preprocessing", stored_pretrained_cfg(source))) if value]
    return f"; its {' and '.join(kept)} stay in {source.name} (a .pth holds tensors only)" if kept else ""


def _torch_class_note(config) -> str:
    """What loads the written state dict, where torchvision's DenseNet class cannot."""
    if config.stem == "cifar":
        return ("; a CIFAR-stem DenseNet (3x3 conv0, no norm0 or max-pool): torchvision's and timm's "
                "DenseNet classes build the ImageNet stem, so load it into a torch model with this stem")
    if config.stem != "imagenet":
        return f"; timm's DenseNet loads it (stem_type={config.stem!r}), torchvision's does not"
    if config.aa_layer:
        return ("; torchvision's DenseNet loads it without anti-aliasing: timm's with "
                "aa_layer=BlurPool2d computes as this model")
    return ""

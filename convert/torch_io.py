"""Reading torch checkpoints safely, and the error handling both converters share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from densenet_jax.errors import CheckpointError

# Containers that training scripts wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as float32 numpy arrays, keyed as the file has them.

    Accepts a ``.pth``/``.pt`` (unpickled with ``weights_only=True``: no code in the file runs), a
    dict that holds the state dict under a usual key, or a safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    obj = _read_safetensors(path) if _is_safetensors(path) else _unpickle(path)
    return {key: _to_numpy(key, value, path) for key, value in _unwrap(obj, path).items()}


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None


def _unpickle(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "not loadable"
        raise CheckpointError(f"{path}: not a loadable torch checkpoint ({_first_line(e)})") from None


def _unwrap(obj, path: Path) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    raise CheckpointError(f"{path}: holds no state dict (a dict of tensors, or one under "
                          f"{', '.join(_WRAPPER_KEYS)})")


def _to_numpy(key: str, value, path: Path) -> np.ndarray:
    if key.endswith("num_batches_tracked"):
        return value.numpy()
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"{path}: {key} is {kind}, not a floating-point tensor")
    array = value.detach().to(torch.float32).numpy()
    if not np.isfinite(array).all():
        raise CheckpointError(f"{path}: {key} holds NaN or Inf values")
    return array


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def run_cli(name: str, main: Callable[[], None]) -> None:
    """Run ``main``; a bad input ends in one line on stderr and exit status 1, no traceback."""
    try:
        main()
    except (CheckpointError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(1)

"""Pretrained DenseNets from the Hugging Face Hub (timm's repos), converted with numpy alone.

``huggingface_hub`` downloads and caches (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT, proxies, resumed
downloads, progress bars are its own; :mod:`densenet_jax.weights.hub_files` wraps it). The weights
are timm's layout (torchvision's key names and layouts, safetensors; a repo with only a torch
pickle needs torch, as ``convert`` does) and go through the same table as converted torchvision
checkpoints (:func:`densenet_jax.weights.torch_keys.from_torchvision`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.errors import CheckpointError
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.model.registry import (HF_HUB_PREFIX, LOCAL_DIR_PREFIX, NOT_ARCHITECTURE, architecture_name, get_config, resolve,
                                         weights_architecture)
from densenet_jax.weights.format import (FORMAT, Weights, file_format, header_metadata, is_floating, load_arrays,
                                         read_safetensors)
from densenet_jax.weights.hub_files import DamagedFile, MissingFile, fetch, split_repo
from densenet_jax.weights.torch_files import read_torch_checkpoint
from densenet_jax.weights.torch_keys import from_torchvision

_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
WEIGHTS_NAME = "model.safetensors"  # the file timm's repos hold the weights in (timm's HF_SAFE_WEIGHTS_NAME)
TORCH_WEIGHTS_NAME = "pytorch_model.bin"  # timm's default name, after its safetensors twin (HF_WEIGHTS_NAME)


def pretrained_weights(name: str, pretrained_cfg_overlay: dict | None = None,
                       architecture_fields: dict | None = None) -> Weights:
    """The weights of pretrained tag ``name`` (``name.tag``, or a bare name for timm's default tag;
    ``hf-hub:<repo>`` as :func:`repo_weights`), with the tag's preprocessing.

    ``pretrained_cfg_overlay`` replaces cfg fields, as in timm: ``dict(file=PATH)`` reads the
    weights from a local safetensors file instead of the Hub, which must then hold the tag's
    architecture as changed by ``architecture_fields`` (the config fields the caller overrides).
    Raises ValueError (CheckpointError) naming the tag or file at fault.
    """
    if name.startswith(HF_HUB_PREFIX) and not pretrained_cfg_overlay:
        return repo_weights(name[len(HF_HUB_PREFIX):])
    if name.startswith(LOCAL_DIR_PREFIX) and not pretrained_cfg_overlay:
        return folder_weights(name[len(LOCAL_DIR_PREFIX):])
    cfg = resolve(name)
    if pretrained_cfg_overlay:
        cfg = PretrainedCfg.from_dict({**cfg.__dict__, **pretrained_cfg_overlay})
    if cfg.file:
        arrays, config = weights_file(cfg.file)
        _check_tag_architecture(config, cfg, name, architecture_fields or {})
        return Weights(arrays, config, str(cfg.file), cfg)
    arrays, config = hub_weights(cfg.hf_hub_id, name, filename=cfg.hf_hub_filename)
    return Weights(arrays, config, f"{name} (hf-hub:{cfg.hf_hub_id})", cfg)


def _check_tag_architecture(config: DenseNetConfig, cfg: PretrainedCfg, name: str, overrides: dict) -> None:
    """A local file given for a tag must hold the tag's architecture, as changed by the
    architecture fields the call passes (timm's strict load of the file into the model the call
    describes demands the same); classes, input channels and dropout may differ, as a fine-tune's.
    CheckpointError naming the file and both architectures otherwise: the tag's preprocessing on
    another network would give confident nonsense."""
    if not cfg.architecture:
        return
    fields = set(DenseNetConfig.__dataclass_fields__) - set(NOT_ARCHITECTURE)
    expected = get_config(cfg.architecture, **{k: v for k, v in overrides.items() if k in fields})
    if weights_architecture(config) != weights_architecture(expected):
        holds = architecture_name(config)
        raise CheckpointError(f"{cfg.file}: holds {holds}, not {name}'s {cfg.architecture}: load it "
                              "without the tag (densenet_jax.load, or predict --weights alone)")


def repo_weights(spec: str) -> Weights:
    """The weights of a Hub repo laid out as timm's, ``config.json`` (architecture, num_classes,
    pretrained_cfg) beside the weights (torchvision's key names), with that preprocessing.

    ``spec`` is what follows ``hf-hub:`` in timm's grammar: ``org/name``, or ``org/name@revision``
    (a branch, tag or commit). The weights file is the one config.json's ``hf_hub_filename`` names,
    else timm's default, read as timm reads it (:func:`weight_files`). Raises CheckpointError naming
    the repo and file at fault, for a repo that is not a DenseNet too."""
    repo_id, revision = split_repo(spec)
    name = f"{HF_HUB_PREFIX}{spec}"
    cfg, config_path = fetch(repo_id, "config.json", name, lambda path: (read_timm_config(path, spec), path), revision)
    arrays, config = hub_weights(repo_id, name, revision, cfg.hf_hub_filename)
    return Weights(arrays, config, name, cfg, timm_label_names(config_path, config.num_classes))


def folder_weights(folder: str | os.PathLike) -> Weights:
    """The weights of a folder laid out as a timm Hub repo (timm's ``local-dir:``; what
    ``densenet-jax export --format timm`` writes), with its preprocessing and class names.
    CheckpointError naming the folder or file at fault."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{LOCAL_DIR_PREFIX}{folder}: no config.json there (timm's Hub layout: "
                              f"config.json beside {WEIGHTS_NAME})")
    cfg = read_timm_config(config_path, None, source=f"{LOCAL_DIR_PREFIX}{folder}")
    arrays, config = weights_file(folder / WEIGHTS_NAME)
    return Weights(arrays, config, f"{LOCAL_DIR_PREFIX}{folder}", cfg,
                   timm_label_names(config_path, config.num_classes))


def timm_label_names(path: str | os.PathLike, num_classes: int) -> list[str] | None:
    """The class names a timm ``config.json`` records, where timm reads them (``label_names``, at
    the top or in ``pretrained_cfg``; the older ``labels``), when they are one string per class."""
    document = json.loads(Path(path).read_text())
    inner = document.get("pretrained_cfg") or {}
    names = document.get("label_names") or inner.get("label_names") or inner.get("labels")
    ok = isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)
    return names if ok else None


def read_timm_config(path: str | os.PathLike, repo_id: str | None, source: str | None = None) -> PretrainedCfg:
    """The pretrained cfg of a timm ``config.json`` (its ``pretrained_cfg``, with the architecture
    and class count beside it), named ``source`` in messages (default ``hf-hub:<repo_id>``).
    DamagedFile naming ``path`` for a file that is no such config; CheckpointError for one that
    describes no DenseNet."""
    source = source or f"hf-hub:{repo_id}"
    try:
        document = json.loads(Path(path).read_text())
        architecture = document.get("architecture", "")
        values = {**document.get("pretrained_cfg", {}), "architecture": architecture,
                  "hf_hub_id": repo_id, "num_classes": document.get("num_classes", 1000)}
        cfg = PretrainedCfg.from_dict(values)
    except (ValueError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise DamagedFile(f"{path}: not a timm model config ({e})") from None
    if not architecture.startswith("densenet"):
        raise CheckpointError(f"{source}: holds a {architecture or 'model of no named architecture'}, "
                              "not a DenseNet (config.json's architecture)")
    return cfg


def hub_weights(repo_id: str, name: str, revision: str | None = None,
                filename: str | None = None) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """Our arrays and config from the weights of Hub repo ``repo_id`` (downloaded when not cached):
    the first of :func:`weight_files` the repo has. A file that is not usable weights is removed
    from the cache, so that nothing bad stays there for the next load to trip on."""
    candidates = weight_files(filename)
    for candidate in candidates:
        try:
            return fetch(repo_id, candidate, name, _read_weights, revision)
        except MissingFile:
            continue
    at = f" at revision {revision}" if revision else ""
    raise MissingFile(f"{name}: Hub repo {repo_id} has no {' or '.join(candidates)}{at}")


def weight_files(filename: str | None) -> list[str]:
    """The files that may hold a repo's weights, in the order timm tries them: the name the
    pretrained cfg gives (``hf_hub_filename``), else ``pytorch_model.bin``, after its safetensors
    twin (``model.safetensors`` for that default, ``x.safetensors`` for an ``x.bin``): timm's
    ``load_state_dict_from_hf`` and ``_get_safe_alternatives``."""
    filename = filename or TORCH_WEIGHTS_NAME
    if filename == TORCH_WEIGHTS_NAME:
        return [WEIGHTS_NAME, filename]
    if filename.endswith(".bin"):
        return [filename.removesuffix(".bin") + ".safetensors", filename]
    return [filename]


def _read_weights(path: Path) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """Our arrays and config from a downloaded weights file: safetensors, else a torch pickle (read
    as ``convert`` reads one, ``weights_only``). DamagedFile for anything unusable."""
    try:
        if file_format(path) == "torch":
            return from_torchvision(read_torch_checkpoint(path).state_dict, str(path))
        return weights_file(path)
    except DamagedFile:
        raise
    except CheckpointError as e:
        raise DamagedFile(str(e)) from None


def weights_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """Our arrays and config from a safetensors file: timm's/torchvision's layout, or ours.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are dropped. CheckpointError naming the
    file for anything else: a Git LFS pointer in place of the weights, a truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        raise CheckpointError(f"{path}: a Git LFS pointer, not the weights (the repo's file was "
                              "pushed without Git LFS, or fetched with git without git-lfs)")
    try:
        arrays = load_arrays(path)
        metadata = header_metadata(path)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: not a complete safetensors file, truncated or corrupt ({e})") from None
    if metadata.get("format") == FORMAT:
        return read_safetensors(path)
    return from_torchvision({k: v for k, v in arrays.items() if is_floating(v.dtype)}, str(path))

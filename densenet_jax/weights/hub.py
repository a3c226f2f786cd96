"""Pretrained DenseNets from the Hugging Face Hub (timm's repos), converted with numpy alone.

``huggingface_hub`` downloads and caches (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT, proxies, resumed
downloads, progress bars are its own). A file already in the cache is used without asking the Hub:
published weights do not change, and so a second load makes no request at all. The weights are
timm's layout (torchvision's key names and layouts, safetensors) and go through the same table as
converted torchvision checkpoints (:func:`densenet_jax.weights.torch_keys.from_torchvision`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.errors import CheckpointError
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.model.registry import (HF_HUB_PREFIX, LOCAL_DIR_PREFIX, NOT_ARCHITECTURE, architecture_name, get_config, resolve,
                                         weights_architecture)
from densenet_jax.weights.format import FORMAT, Weights, read_safetensors, safetensors_metadata
from densenet_jax.weights.torch_keys import from_torchvision

_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_ANSWERED: set[str] = set()  # Hub endpoints that answered in this process
WEIGHTS_NAME = "model.safetensors"  # the file timm's repos hold the weights in (timm's HF_SAFE_WEIGHTS_NAME)


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
    arrays, config = hub_weights(cfg.hf_hub_id, name)
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


def repo_weights(repo_id: str) -> Weights:
    """The weights of a Hub repo laid out as timm's, ``config.json`` (architecture, num_classes,
    pretrained_cfg) beside ``model.safetensors`` (torchvision's key names), with that preprocessing.
    Raises CheckpointError naming the repo and file at fault, for a repo that is not a DenseNet too.
    """
    config_path = download(repo_id, "config.json", f"hf-hub:{repo_id}")
    cfg = read_timm_config(config_path, repo_id)
    arrays, config = hub_weights(repo_id, f"hf-hub:{repo_id}")
    return Weights(arrays, config, f"hf-hub:{repo_id}", cfg, timm_label_names(config_path, config.num_classes))


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
    CheckpointError unless it describes a DenseNet."""
    source = source or f"hf-hub:{repo_id}"
    try:
        document = json.loads(Path(path).read_text())
        architecture = document.get("architecture", "")
        values = {**document.get("pretrained_cfg", {}), "architecture": architecture,
                  "hf_hub_id": repo_id, "num_classes": document.get("num_classes", 1000)}
        cfg = PretrainedCfg.from_dict(values)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: config.json is not a timm model config ({e})") from None
    if not architecture.startswith("densenet"):
        raise CheckpointError(f"{source}: holds a {architecture or 'model of no named architecture'}, "
                              "not a DenseNet (config.json's architecture)")
    return cfg


def hub_weights(repo_id: str, name: str) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """Our arrays and config from the weights of Hub repo ``repo_id`` (downloaded when not cached).
    A downloaded file that is not usable weights is removed from the cache before the error, so that
    nothing bad stays there for the next load to trip on."""
    path = download(repo_id, WEIGHTS_NAME, name)
    try:
        return weights_file(path)
    except CheckpointError as e:
        _evict(path)
        raise CheckpointError(f"{name}: {e} (removed from the cache)") from None


def _evict(path: Path) -> None:
    """Remove a cached file: huggingface_hub's snapshot entry and the blob it links to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def weights_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """Our arrays and config from a safetensors file: timm's/torchvision's layout, or ours.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are dropped. CheckpointError naming the
    file for anything else: a Git LFS pointer in place of the weights, a truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    data = path.read_bytes()
    if data.startswith(_LFS_POINTER):
        raise CheckpointError(f"{path}: a Git LFS pointer, not the weights (the repo's file was "
                              "pushed without Git LFS, or fetched with git without git-lfs)")
    try:
        arrays = safetensors.numpy.load(data)
        metadata = safetensors_metadata(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path}: not a complete safetensors file, truncated or corrupt ({e})") from None
    if metadata.get("format") == FORMAT:
        return read_safetensors(path)
    return from_torchvision({k: v for k, v in arrays.items() if v.dtype.kind == "f"}, str(path))


def _hub_answers() -> bool:
    """Whether the Hub's endpoint answers one request. huggingface_hub retries a request that
    cannot connect five times, warning each time (23 s and a dozen lines on a machine with no
    network); one try without retries tells the same at once. Any answer, even an error status,
    means the network is there and huggingface_hub's own request is made. An endpoint that
    answered once is not asked again in this process."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.ENDPOINT in _ANSWERED:
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except httpx2.TransportError:  # no connection, a timeout, a network error
        return False
    _ANSWERED.add(constants.ENDPOINT)
    return True


def download(repo_id: str, filename: str, name: str) -> Path:
    """The cached copy of ``filename`` from Hub repo ``repo_id``, downloaded first when needed.

    The cache is tried first, without a request. Errors are CheckpointError naming ``name``, the repo
    and the file, and for the offline case the file to fetch and how to pass it; huggingface_hub
    keeps an interrupted download under a temporary name and removes it, so the cache only ever
    holds complete files.
    """
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from huggingface_hub import constants, hf_hub_url

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        if not constants.HF_HUB_OFFLINE and not _hub_answers():
            raise LocalEntryNotFoundError("the Hub cannot be reached")
        path = Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               "the Hub cannot be reached (HF_HUB_OFFLINE=1 says so at once, without trying)")
        raise CheckpointError(
            f"{name}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; fetch {hf_hub_url(repo_id, filename)} on a machine that can and pass "
            f"the file (create_model(..., pretrained_cfg_overlay=dict(file=PATH)), or --weights PATH "
            f"with --model), or copy that machine's cache there") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{name}: no Hub repo {repo_id} ({type(e).__name__})") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{name}: Hub repo {repo_id} has no {filename}") from None
    except (OSError, httpx2.HTTPError) as e:  # a connection cut mid-download (after huggingface_hub's
        # resumed retries), its size check, disk errors
        raise CheckpointError(f"{name}: downloading {filename} from {repo_id} failed "
                              f"({str(e).splitlines()[0]}); nothing was kept, run again") from None
    return path

"""What a work directory belongs to: the run's identity, recorded beside its checkpoints.

A run writes ``run.json`` into its work directory when it starts (once its checkpoint, if any, is
restored: a command refused for being another run writes nothing). A later command in the same
folder continues it only when it is the same run: everything that fixes the training state's
shapes or what its steps mean (architecture, initial weights, head-only, batch size, precision,
parallel form, seed, dropout, the data set with its size, classes and image size) must match, or the
command stops in one line naming each difference; nothing in the folder is moved or deleted.

Not recorded, so free to change between invocations: how far and how this invocation runs
(``--max-steps``, ``--checkpoint-every``, ``--keep``, ``--workers``, ``--progress``, ``--strict``
beyond what it does to the data set's size, ``--memory-efficient``, which computes the same thing),
and the number of devices or hosts (the global batch is what counts), except for ``wds/`` shards,
which are split across hosts by shard: their host count is recorded. The optimiser's settings
(``--epochs``, ``--lr``, ``--schedule``, ``--warmup-epochs``, ``--momentum``, ``--weight-decay``)
are recorded and may change on a rerun, with a warning naming each change: extending a finished run
with more epochs, or lowering the learning rate by hand, are deliberate choices people make.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import re
from pathlib import Path

import jax

from densenet_jax.errors import WorkdirError
from densenet_jax.files import atomic_write_bytes
from densenet_jax.train import augment_config

log = logging.getLogger("densenet_jax")

FILE = "run.json"
RESULTS = ("metrics.jsonl", "best.safetensors", "model.safetensors")
NEW_RUN = "its files are untouched; to start a new run, pass another --workdir"
OR_CONTINUE = f"{NEW_RUN}, or rerun with that run's options to continue it"

# How each recorded field is named to the user (the train command's options where there is one).
LABELS = {"model": "--model", "init_from": "--init-from", "head_only": "--head-only",
          "batch_size": "--batch-size", "precision": "--precision", "parallel": "--parallel",
          "seed": "--seed", "drop_rate": "--drop-rate", "dataset": "--dataset",
          "train_examples": "training examples", "eval_examples": "held-out examples",
          "classes": "classes", "image_size": "image size", "hosts": "hosts (wds/ shards are split by host)",
          "epochs": "--epochs", "lr": "--lr", "schedule": "--schedule",
          "warmup_epochs": "--warmup-epochs", "momentum": "--momentum", "weight_decay": "--weight-decay"}
# The timm options: those that shape the training state (optimizer, accumulation, EMA) are identity;
# the others may change on a rerun, as the rest of the optimiser's settings.
STATE_OPTIONS = ("opt", "grad_accum_steps", "model_ema")
TUNABLE_OPTIONS = ("opt_eps", "opt_betas", "filter_bias_and_bn", "clip_grad", "clip_mode", "layer_decay", "sched",
                   "decay_epochs", "decay_rate", "decay_milestones", "warmup_lr", "min_lr", "cooldown_epochs",
                   "patience_epochs", "lr_base", "lr_base_size", "lr_base_scale", "model_ema_decay", "model_ema_warmup",
                   "best_from",
                   "recipe", "recipe_values")
LABELS.update({k: f"--{k.replace('_', '-')}" for k in STATE_OPTIONS + TUNABLE_OPTIONS})
LABELS["recipe_values"] = "values set by --recipe"


def default_workdir(model: str, dataset: str, init_from: str | None = None,
                    data_dir: str | None = None) -> str:
    """``runs/<model>-<dataset>``: the model is the ``init_from`` file's stem when there is one, and
    a ``folder`` data set is named by its folder, so that different runs get different folders."""
    name = Path(init_from).stem if init_from else model
    if dataset == "folder" and data_dir:
        dataset = Path(data_dir).expanduser().name
    if dataset.startswith(("hfds/", "wds/")):  # one folder, named without slashes or braces
        dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_")
    return str(Path("runs") / f"{name}-{dataset}")


def describe(config, architecture, data) -> dict:
    """The record of a run: ``identity`` (must match to continue) and ``optimizer`` (may change).

    ``config``: the TrainConfig; ``architecture``: the built model's DenseNetConfig; ``data``: the
    Dataset. Values are JSON types, so that a record compares equal to itself read back.
    """
    shape = {k: v for k, v in dataclasses.asdict(architecture).items()
             if k not in ("memory_efficient", "drop_rate")}
    identity = {
        "model": None if config.init_from else config.pretrained or config.model,
        "init_from": _file_identity(config.init_from) if config.init_from else None,
        "architecture": shape,
        "head_only": config.head_only, "batch_size": config.batch_size, "precision": config.precision,
        "parallel": config.parallel, "seed": config.seed, "drop_rate": config.drop_rate,
        "dataset": config.dataset, "train_examples": len(data.train), "eval_examples": len(data.eval),
        "classes": list(data.class_names), "image_size": data.image_size,
        **{k: getattr(config, k) for k in STATE_OPTIONS},
    }
    if config.dataset.startswith("wds/"):  # each host streams its own shards: a resume needs as many
        identity["hosts"] = jax.process_count()
    if augmentation := augment_config.record(config):  # absent at the defaults, as in older records
        identity["augmentation"] = augmentation
    optimizer = {k: getattr(config, k) for k in ("epochs", "lr", "schedule", "warmup_epochs",
                                                 "momentum", "weight_decay") + TUNABLE_OPTIONS}
    return json.loads(json.dumps({"identity": identity, "optimizer": optimizer}))


def _file_identity(path: str) -> str:
    """``name (sha256 <first 12 hex digits>)``: the same file wherever it was moved, and a
    different one under the same name told apart."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{Path(path).name} (sha256 {digest.hexdigest()[:12]})"


def check_folder(workdir: Path) -> None:
    """WorkdirError unless ``workdir`` is, or can become, a writable folder: it is not a file and
    does not lie under one (the nearest part of it that exists is a folder), and a file can be made
    in that part (tried, then removed: permissions, a read-only mount, which root cannot write
    either, or a folder such as /proc's that takes no files)."""
    for part in (workdir, *workdir.parents):
        if part.exists():
            if not part.is_dir():
                where = "is a file" if part == workdir else f"lies under {part}, a file"
                raise WorkdirError(f"--workdir {workdir}: {where}; name a folder")
            _check_writable(workdir, part)
            return


def _check_writable(workdir: Path, folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".densenet-jax-probe-", dir=folder)
    except OSError as e:
        where = "" if folder == workdir else f" (in {folder}, where it would be made)"
        raise WorkdirError(f"--workdir {workdir}: cannot write there{where}: {e.strerror}; "
                           "name a folder you can write") from None
    os.close(fd)
    os.unlink(probe)


def check(workdir: Path, record: dict, has_checkpoints: bool) -> list[str]:
    """Check that ``workdir`` belongs to the run ``record`` describes, or to none; return the
    optimiser's settings that changed since the checkpoints there were made (one "--epochs 1 there,
    2 here" each; none without checkpoints), for the caller to name once it knows that it trains.

    Raises WorkdirError when the folder's ``run.json`` names another run that reached a checkpoint
    or wrote results (one that stopped before either leaves nothing to keep), or when the folder holds
    an earlier run's results without a ``run.json`` or a checkpoint (nothing tells what they belong
    to, and a fresh start would overwrite them). A folder of an older version (checkpoints, no
    ``run.json``) passes: its checkpoints' shapes are checked against the model when restored.
    """
    path = workdir / FILE
    recorded = _read(path)
    if recorded is None:
        found = [name for name in RESULTS if (workdir / name).exists()]
        if found and not has_checkpoints:
            raise WorkdirError(f"{workdir}: holds results of an earlier run ({', '.join(found)}) but no "
                               f"{FILE} or checkpoint to tell what they belong to; {NEW_RUN}")
    else:
        differences = _differences(recorded.get("identity", {}), record["identity"])
        trained = has_checkpoints or any((workdir / name).exists() for name in RESULTS)
        if differences and not trained:  # it stopped before its first checkpoint: nothing to keep
            log.info("%s: the run recorded there (%s) never reached a checkpoint; this one takes the folder",
                     workdir, "; ".join(differences))
        elif differences:
            raise WorkdirError(f"{workdir}: belongs to another run ({'; '.join(differences)}); {OR_CONTINUE}")
        if has_checkpoints:
            return _differences(recorded.get("optimizer", {}), record["optimizer"])
    return []


def write(workdir: Path, record: dict) -> None:
    """Record ``record`` as what ``workdir`` belongs to (once its checkpoint, if any, restored)."""
    path = workdir / FILE
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())


def _read(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path}: unreadable ({e}); {NEW_RUN}") from None
    if not isinstance(recorded, dict):
        raise WorkdirError(f"{path}: not a run record; {NEW_RUN}")
    return recorded


def _differences(there: dict, here: dict) -> list[str]:
    """``"<label> <old> there, <new> here"`` for each field that differs. A field that holds
    settings is named setting by setting: the architecture's (only when the model names do not
    already differ), the augmentation's by their options (recorded only away from their defaults:
    one missing, or all of them, is at its default), a recipe's values by their names."""
    out = []
    # The augmentation is recorded only when an option is away from its default: absent here, it is
    # still compared with what is there.
    keys = [*here, *(k for k, v in there.items() if k not in here and isinstance(v, dict))]
    for key in keys:
        old, new = there.get(key), here.get(key)
        if old == new or (key == "architecture" and there.get("model") != here.get("model")):
            continue
        if key == "architecture" and isinstance(old, dict):
            out += _settings(old, new, lambda k: f"architecture {k}", keys=new)
        elif key == "augmentation":
            out += _settings(old or {}, new or {}, lambda k: f"--{k.replace('_', '-')}", missing="default")
        elif isinstance(old, dict) and isinstance(new, dict):  # the values a --recipe set
            out += _settings(old, new, lambda k: f"{LABELS.get(key, key)}: {k}")
        else:
            out.append(f"{LABELS.get(key, key)} {_show(old)} there, {_show(new)} here")
    return out


def _settings(old: dict, new: dict, name, missing: str = "none", keys=None) -> list[str]:
    """``"<name(k)> <old> there, <new> here"`` for each setting ``k`` that differs, in the order of
    ``keys`` (by default every setting of either, sorted); ``missing`` for a setting one lacks."""
    keys = sorted(old.keys() | new.keys()) if keys is None else keys
    return [f"{name(k)} {_show(old.get(k), missing)} there, {_show(new.get(k), missing)} here"
            for k in keys if old.get(k) != new.get(k)]


def _show(value, missing: str = "none") -> str:
    """A value short enough for a one-line message (long lists by count and first items);
    ``missing`` for None."""
    if isinstance(value, list) and len(value) > 4:
        return f"{len(value)} [{', '.join(map(str, value[:3]))}, ...]"
    return missing if value is None else str(value)

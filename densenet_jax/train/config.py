"""What a training run is asked to do, checked when it is described.

:class:`TrainConfig` refuses at construction every value that is out of range or contradicts
another, so that a script fails as ``densenet-jax train`` does: at once, in one line naming the
command's option. What only this machine can tell (the devices a batch is split over, what a weights
file holds, whether a folder is there) is checked by the functions below, or when the run reads it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import typing

import jax.numpy as jnp

from densenet_jax.data.csv_source import CsvSpec, check_spec
from densenet_jax.data.datasets import STREAMED
from densenet_jax.data.datasets import is_image_source as is_images
from densenet_jax.model.registry import get_config
from densenet_jax.train import optim, optimizers, recipes, schedules
from densenet_jax.train.losses import check_pos_weight
from densenet_jax.train.augment_config import check_augmentation

# bf16: bfloat16 compute, fp32 parameters, statistics and loss. fp64 (with jax_enable_x64): for
# reference runs where fp32 rounding would hide whether two set-ups compute the same thing.
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp64": jnp.float64}
SCHEDULES: tuple[str, ...] = typing.get_args(optim.Schedule)
PARALLEL = ("mesh", "pmap")
DATASETS = ("digits", "cifar10", "cifar100", "folder", "csv")
DEFAULT_MODEL = "densenet_40_k12"
FOLDER_IMAGE_SIZE = 224


@dataclasses.dataclass
class TrainConfig:
    """A training run's settings, as ``densenet-jax train`` takes them (each field is the option of
    its name). ValueError at construction, in one line naming the option, for a value out of range,
    an unknown name (model, data set, schedule, precision, parallel form) or options that contradict
    each other (see :func:`check_data_options` for the data set's)."""

    # None: the architecture init_from or pretrained holds, else DEFAULT_MODEL (filled in).
    model: str | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float | None = None  # None: lr_base scaled to the batch when lr_base is given, else 0.1
    schedule: optim.Schedule = "cifar"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # timm's train.py options (optimizers.py, schedules.py, ema.py); recipes.py: --recipe.
    opt: str = "sgd"
    opt_eps: float | None = None
    opt_betas: tuple | None = None
    filter_bias_and_bn: bool = False  # timm's default is True; the paper decays every parameter
    clip_grad: float | None = None
    clip_mode: str = "norm"
    grad_accum_steps: int = 1
    layer_decay: float | None = None
    sched: str | None = None  # a timm schedule; None: --schedule's
    decay_epochs: float = 90.0
    decay_rate: float = 0.1
    decay_milestones: tuple = (90, 180, 270)
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    patience_epochs: int = 10
    lr_base: float | None = None
    lr_base_size: int = 256
    lr_base_scale: str | None = None
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    best_from: str = "model"  # which weights best.safetensors holds: the model's or the EMA's
    recipe: str | None = None
    recipe_values: dict | None = None  # what the recipe set (filled in)
    workdir: str | None = None  # None: runs/<model>-<dataset> (workdir.default_workdir)
    init_from: str | None = None
    pretrained: str | None = None  # a pretrained tag (densenet121.ra_in1k) to fine-tune, from the Hub
    in_chans: int = 3  # input channels; folder data is read as greyscale for 1
    head_only: bool = False
    precision: str = "fp32"
    parallel: str = "mesh"
    seed: int = 0
    drop_rate: float = 0.0
    memory_efficient: bool = False
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch
    keep: int = 3
    workers: int = 0
    strict: bool = False  # folder data: an unreadable image stops the run instead of being skipped
    # Folder data: the crop size (None: FOLDER_IMAGE_SIZE, filled in); the others have their own.
    image_size: int | None = None
    # hfds/ and wds/ data (timm's train.py options; None: each source's default, see data.hfds, data.wds)
    input_key: str | None = None
    target_key: str | None = None
    train_split: str | None = None
    val_split: str | None = None
    train_num_samples: int | None = None
    max_steps: int = 0  # stop after this many steps of this invocation (0: to the end); rerun to go on
    progress: bool = True
    # --dataset csv (data.csv_source.CsvSpec): the CSV files under data_dir, their columns, the
    # policy for uncertain labels, the held-out fraction of patients without a validation CSV.
    train_csv: str | None = None
    val_csv: str | None = None
    path_column: str | None = None
    label_columns: list[str] | None = None  # a str: one column
    patient_column: str | None = None
    uncertain: str = "ignore"
    val_fraction: float | None = None
    # Multi-label data: "auto" (CheXNet's |N|/|P| per label) or numbers, comma-separated (losses.py).
    pos_weight: str | None = None
    # Augmentation and mixing, as timm's train.py names them (train/augment_config.py checks them;
    # the defaults are this project's, which docs/training.md sets beside timm's).
    aa: str | None = None
    color_jitter: float = 0.0
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    train_interpolation: str = "bilinear"
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.0
    bce_loss: bool = False

    def __post_init__(self):
        recipes.apply(self)
        check_types(self)
        check_at_least(("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                       ("--max-steps", self.max_steps, 0), ("--keep", self.keep, 1),
                       ("--checkpoint-every", self.checkpoint_every, 0), ("--in-chans", self.in_chans, 1),
                       ("--weight-decay", self.weight_decay, 0))
        self._check_optimizer()
        self._check_timm_options()
        if not 0 <= self.seed < 2**32:  # what numpy's and JAX's seeds take
            raise ValueError(f"--seed {self.seed}: must be 0 to {2**32 - 1}")
        if not 0 <= self.drop_rate < 1:
            raise ValueError(f"--drop-rate {self.drop_rate}: must be at least 0 and less than 1")
        check_data_options(self.dataset, self.data_dir, self.workers, self.image_size)
        self._check_csv()
        if self.train_num_samples is not None:
            check_at_least(("--train-num-samples", self.train_num_samples, 1))
        if self.workdir == "":
            raise ValueError("--workdir '': name a folder (or leave it out for runs/<model>-<dataset>)")
        self._check_starting_point()
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--parallel", self.parallel, PARALLEL)
        if self.model is None and not (self.init_from or self.pretrained):
            self.model = DEFAULT_MODEL
        if self.image_size is None and is_images(self.dataset):
            self.image_size = FOLDER_IMAGE_SIZE
        check_augmentation(self)

    def _check_optimizer(self) -> None:
        if self.lr is None:
            self.lr = 0.1 if self.lr_base is None else schedules.scaled_lr(
                self.lr_base, self.lr_base_size, self.batch_size * self.grad_accum_steps, self.lr_base_scale,
                self.opt)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr {self.lr}: must be a positive number")
        if not math.isfinite(self.weight_decay):
            raise ValueError(f"--weight-decay {self.weight_decay}: must be a number, at least 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum {self.momentum}: must be at least 0 and less than 1")
        check_choice("--schedule", self.schedule, SCHEDULES)
        if self.warmup_epochs and self.sched is None and self.schedule not in optim.WARMUP_SCHEDULES:
            raise ValueError(f"--warmup-epochs {self.warmup_epochs} has no effect with --schedule "
                             f"{self.schedule}: only {', '.join(optim.WARMUP_SCHEDULES)} warms up")
        if not 0 <= self.warmup_epochs < self.epochs:
            preset = (f" (set by --recipe {self.recipe}; give --warmup-epochs to override it)"
                      if "warmup_epochs" in (self.recipe_values or {}) else "")
            raise ValueError(f"--warmup-epochs {self.warmup_epochs}: must be at least 0 and less than "
                             f"--epochs {self.epochs}{preset}")

    def csv_spec(self) -> CsvSpec:
        """The CSV options as the data source takes them."""
        columns = [self.label_columns] if isinstance(self.label_columns, str) else self.label_columns
        return CsvSpec(self.train_csv, self.val_csv, self.path_column, tuple(columns) if columns else None,
                       self.patient_column, self.uncertain, self.val_fraction)

    def _check_csv(self) -> None:
        check_pos_weight(self.pos_weight)
        if self.dataset == "csv":
            check_spec(self.csv_spec())
            return
        given = [f"--{k.replace('_', '-')}" for k in ("train_csv", "val_csv", "path_column", "label_columns",
                                                       "patient_column", "val_fraction") if getattr(self, k) is not None]
        if given:
            raise ValueError(f"{given[0]} is read by --dataset csv, not {self.dataset}")

    def _check_timm_options(self) -> None:
        check_choice("--opt", self.opt, optimizers.OPTIMIZERS)
        check_choice("--clip-mode", self.clip_mode, optimizers.CLIP_MODES)
        if self.sched is not None:
            check_choice("--sched", self.sched, schedules.TIMM_SCHEDULES)
        if self.lr_base_scale is not None:
            check_choice("--lr-base-scale", self.lr_base_scale, schedules.LR_BASE_SCALES)
        check_choice("--best-from", self.best_from, ("model", "ema"))
        check_at_least(("--grad-accum-steps", self.grad_accum_steps, 1), ("--lr-base-size", self.lr_base_size, 1),
                       ("--cooldown-epochs", self.cooldown_epochs, 0),
                       ("--patience-epochs", self.patience_epochs, 0), ("--warmup-lr", self.warmup_lr, 0),
                       ("--min-lr", self.min_lr, 0))
        if self.decay_epochs <= 0:
            raise ValueError(f"--decay-epochs {self.decay_epochs}: must be more than 0")
        if self.decay_rate <= 0:  # 0 stops training at the first decay; below it, the steps climb the loss
            raise ValueError(f"--decay-rate {self.decay_rate}: must be more than 0")
        milestones = tuple(self.decay_milestones)
        if any(later <= earlier for earlier, later in zip(milestones, milestones[1:])):
            # The passed milestones are counted by bisection (timm's too), which needs them in order.
            raise ValueError(f"--decay-milestones {' '.join(map(str, milestones))}: must be strictly increasing")
        if self.min_lr > self.lr:  # cosine would climb to it; plateau could never decay to it
            raise ValueError(f"--min-lr {self.min_lr}: must be at most --lr {self.lr}")
        for option, value in (("--clip-grad", self.clip_grad), ("--opt-eps", self.opt_eps),
                              ("--layer-decay", self.layer_decay), ("--lr-base", self.lr_base)):
            if value is not None and not value > 0:
                raise ValueError(f"{option} {value}: must be more than 0")
        if not 0 <= self.model_ema_decay < 1:
            raise ValueError(f"--model-ema-decay {self.model_ema_decay}: must be at least 0 and less than 1")
        if self.best_from == "ema" and not self.model_ema:
            raise ValueError("--best-from ema chooses the best epoch by the EMA's accuracy: add --model-ema")
        if self.opt_betas is not None and (len(self.opt_betas) != 2 or not all(0 <= b < 1 for b in self.opt_betas)):
            raise ValueError(f"--opt-betas {' '.join(map(str, self.opt_betas))}: two numbers, each at least 0 "
                             "and less than 1")

    def _check_starting_point(self) -> None:
        """The architecture and the weights it starts from: named once, by one of the options."""
        if self.head_only and not (self.init_from or self.pretrained):
            raise ValueError("--head-only trains only the classifier of loaded weights: add --init-from FILE")
        if self.pretrained and (self.model or self.init_from):
            raise ValueError(f"--pretrained {self.pretrained} names the architecture and its weights: "
                             "leave --model and --init-from out")
        if self.model is not None:
            get_config(self.model)  # ValueError naming the known models


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several hosts: process 0's ``coordinator`` address (HOST:PORT), ``num_processes`` and this
    one's ``process_id``, all three or none; ``timeout``: seconds to wait for every process to join.
    ValueError at construction, naming the command's options, for a partial or out-of-range set."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout: int = 300

    def __post_init__(self):
        check_at_least(("--distributed-timeout", self.timeout, 1))
        given = {"--coordinator": self.coordinator, "--num-processes": self.num_processes,
                 "--process-id": self.process_id}
        missing = [name for name, value in given.items() if value is None]
        if len(missing) == len(given):
            return
        if missing:
            raise ValueError(f"several hosts need --coordinator HOST:PORT (process 0's address), "
                             f"--num-processes and --process-id: {' and '.join(missing)} missing")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id {self.process_id}: must be 0 to {self.num_processes - 1} "
                             f"for --num-processes {self.num_processes}")

    @property
    def several_hosts(self) -> bool:
        """Whether processes are to join (a coordinator is given)."""
        return self.coordinator is not None


# What a field's annotation asks of its value; bool is no number here, though Python counts it one.
_KINDS = {"int": ((numbers.Integral,), "an integer"), "float": ((numbers.Real,), "a number"),
          "bool": ((bool,), "True or False"), "str": ((str, os.PathLike), "a string")}


def check_types(config) -> None:
    """TypeError naming the option whose value is not of its field's type (``epochs=1.5``, ``seed="0"``,
    ``batch_size=True``), before any range check compares it."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kind = str(field.type).split(" | ")[0]
        if kind not in _KINDS or (value is None and "None" in str(field.type)):
            continue
        types, what = _KINDS[kind]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise TypeError(f"--{field.name.replace('_', '-')} {value!r}: must be {what}")


def check_at_least(*bounds: tuple[str, float, float]) -> None:
    """ValueError naming the first ``(option, value, least)`` whose value is below its least."""
    for option, value, least in bounds:
        if value < least:
            raise ValueError(f"{option} {value}: must be at least {least}")


def check_choice(option: str, value: str, choices) -> None:
    """ValueError naming ``option`` and its ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{option} {value!r}: must be one of {', '.join(choices)}")


def check_data_options(dataset: str, data_dir: str | None, workers: int, image_size: int | None) -> None:
    """What training and evaluation ask of a data set, before it is read: a known name, a
    ``data_dir`` for the ones read from one and none beside the bundled digits (it would be
    ignored), ``workers`` at least 0, and ``image_size`` only for a folder, at least 1. ValueError
    in one line naming the option."""
    if not dataset.startswith(STREAMED) or dataset in STREAMED:
        check_choice("--dataset", dataset, DATASETS + tuple(f"{p}..." for p in STREAMED))
    if workers < 0:
        raise ValueError(f"--workers {workers}: must be at least 0")
    if image_size is not None and not is_images(dataset):
        raise ValueError(f"--image-size {image_size} sets a folder's crop; --dataset {dataset} "
                         "has images of its own size")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size {image_size}: must be at least 1")
    if dataset == "digits" and data_dir is not None:
        raise ValueError(f"--data-dir {data_dir!r} is read by --dataset cifar10, cifar100, folder, csv or "
                         "wds/...; digits ships with scikit-learn")
    if dataset not in ("digits",) and not dataset.startswith(STREAMED) and data_dir is None:
        raise ValueError(f"--data-dir is needed for dataset {dataset}")


SOURCE_OPTIONS = ("input_key", "target_key", "train_split", "val_split", "train_num_samples")


def source_options(config: TrainConfig) -> dict:
    """The csv, hfds/ and wds/ options of ``config``, as ``data.load_dataset`` takes them."""
    return {"csv": config.csv_spec(), **{k: getattr(config, k) for k in SOURCE_OPTIONS}}

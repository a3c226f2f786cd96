"""Held-out loss and accuracy: of a training state (each epoch's evaluation in the loop), and of a
weights file on a data set's held-out split (``densenet-jax evaluate``), which needs no optimizer.

Both weigh each example: the padding of the last batch and an unreadable image's stand-in count for
nothing, in the sums and in the count.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from densenet_jax.data import Dataset, eval_batches, load_dataset
from densenet_jax.data import transforms as T
from densenet_jax.data.csv_source import CsvSpec, check_spec, split_tables
from densenet_jax.data.datasets import check_source
from densenet_jax.data.folder import FileSource, find_split, say_hidden
from densenet_jax.errors import DataError
from densenet_jax.factory import load
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.pretrained_cfg import PretrainedCfg, resize_size
from densenet_jax.inference import model_cfg
from densenet_jax.train.checks import compute_dtype
from densenet_jax.train.config import FOLDER_IMAGE_SIZE, check_at_least, check_data_options
from densenet_jax.train.losses import LossConfig, per_example_correct, per_example_loss
from densenet_jax.train.multilabel import gather_outputs, multilabel_figures, outputs_of

BatchSums = Callable[[dict], dict]  # a host batch (image, label, weight) -> its summed loss, correct, count


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A weights file's held-out ``loss`` and ``accuracy`` over the ``count`` images that counted,
    of the split's ``examples`` (the others were unreadable, skipped); ``preprocessing``: for a
    folder, how its images were prepared, in words ("" for the other data sets)."""

    loss: float
    accuracy: float
    count: int
    examples: int
    preprocessing: str
    # Multi-label weights: AUROC and AUPRC per label (None: one class only among the label's known
    # values) and their means over the labels where they are defined; the loss is the unweighted
    # masked BCE, the accuracy exact match (densenet_jax.train.multilabel).
    auroc: dict[str, float | None] | None = None
    mean_auroc: float | None = None
    auprc: dict[str, float | None] | None = None
    mean_auprc: float | None = None


def evaluate_weights(weights: str, dataset: str = "digits", data_dir: str | None = None, *,
                     batch_size: int = 128, precision: str = "fp32", workers: int = 0,
                     strict: bool = False, image_size: int | None = None,
                     csv: CsvSpec | None = None, sources: dict | None = None) -> Evaluation:
    """The held-out loss and accuracy of a densenet_jax ``weights`` file on ``dataset``, in steps
    of ``batch_size`` images computed in ``precision``. A folder's ``val/`` alone is read, prepared
    as :func:`densenet_jax.inference.predict` prepares images for these weights (at ``image_size``
    when given, see :func:`held_out_folder`); so are a CSV data set's held-out rows (``csv``,
    see :func:`held_out_csv`). ``sources``: timm's options for ``hfds/`` and ``wds/`` data
    (``input_key``, ``target_key``, ``train_split``, ``val_split``, ``train_num_samples``), whose
    held-out split is cropped at ``image_size`` or the size the weights record. Multi-label weights
    also get AUROC and AUPRC per label.

    ValueError, naming the command's option, for options out of range or that contradict each
    other (as :func:`densenet_jax.train.config.check_data_options`), and for weights with another
    class count than the data set; DataError for a data set that cannot be read; CheckpointError
    or FileNotFoundError for the weights."""
    check_at_least(("--batch-size", batch_size, 1))
    check_data_options(dataset, data_dir, workers, image_size)
    dtype = compute_dtype(precision)
    model = load(weights)
    if dataset == "folder":
        examples, preprocess, preprocessing = held_out_folder(weights, model, data_dir, strict, image_size)
    elif dataset == "csv":
        examples, preprocess, preprocessing = held_out_csv(weights, model, data_dir, csv or CsvSpec(),
                                                           strict, image_size)
    else:
        cfg = model.pretrained_cfg
        size = image_size or (cfg.input_size[-1] if cfg is not None else FOLDER_IMAGE_SIZE)
        data = load_dataset(dataset, data_dir, strict, size, in_chans=model.config.in_chans, **(sources or {}))
        if model.config.num_classes != data.num_classes:
            raise ValueError(f"{weights}: has {model.config.num_classes} classes, {dataset} has "
                             f"{data.num_classes}")
        examples, preprocess, preprocessing = data.eval, data.preprocess, ""
    if model.multi_label:
        return _multilabel_evaluation(model, dtype, examples, preprocess, batch_size, workers, preprocessing)
    sums = evaluation_sums(ModelEvaluation(model, dtype), examples, preprocess, batch_size, workers)
    return Evaluation(loss=sums["loss"] / sums["count"], accuracy=sums["correct"] / sums["count"],
                      count=round(sums["count"]), examples=len(examples), preprocessing=preprocessing)


def held_out_folder(weights: str, model: DenseNet, data_dir: str, strict: bool = False,
                    image_size: int | None = None) -> tuple[Sequence, T.Compose, str]:
    """``(examples, preprocess, description)`` of ``data_dir``'s ``val/``: its images in the
    model's channels, the preprocessing ``predict`` uses for the weights (their recorded size,
    resize, interpolation, mean/std; torchvision's where they record none), at ``image_size`` when
    given, and words saying which. DataError naming the folder for a missing ``val/``, and the
    weights for classes other than the ones they were trained on."""
    check_source("folder", data_dir, model.config.in_chans)
    root = Path(data_dir)
    val = find_split(root, "val")
    say_hidden(root, [f"val/{h}" for h in val.hidden])
    if model.config.num_classes != len(val.classes):
        raise DataError(f"{weights}: has {model.config.num_classes} classes, {root / 'val'} has "
                        f"{len(val.classes)}")
    trained = model.class_names  # the names the weights record: a file's, a Hub repo's or folder's
    # A folder's labels are its sorted folder names: other names, even as many, are other classes.
    if trained is not None and trained != val.classes:
        raise DataError(_classes_differ(weights, trained, root / "val", val.classes))
    examples = FileSource(val.paths, val.labels, T.IMAGE_MODES[model.config.in_chans], strict)
    return examples, *_weights_preprocessing(model, image_size)


def held_out_csv(weights: str, model: DenseNet, data_dir: str, spec: CsvSpec, strict: bool = False,
                 image_size: int | None = None) -> tuple[Sequence, T.Compose, str]:
    """As :func:`held_out_folder`, for a CSV data set's held-out rows (``spec.val_csv``, or
    ``spec.val_fraction`` of ``spec.train_csv``'s patients, drawn as training drew them), read with
    the weights' labels: their label names pick the columns (unless ``spec.label_columns``), their
    class names order the classes. ValueError or DataError naming the option, file or row."""
    check_source("csv", data_dir, model.config.in_chans)
    check_spec(spec, training=False)
    _, val = split_tables(Path(data_dir), spec, model.class_names, model.multi_label)
    if len(val.names) != model.config.num_classes:
        kind = "labels" if model.multi_label else "classes"
        raise DataError(f"{weights}: has {model.config.num_classes} outputs, {Path(data_dir) / (spec.val_csv or spec.train_csv)} "
                        f"has {len(val.names)} {kind} ({', '.join(val.names[:6])})")
    examples = FileSource(val.paths, val.labels, T.IMAGE_MODES[model.config.in_chans], strict)
    return examples, *_weights_preprocessing(model, image_size)


def _weights_preprocessing(model: DenseNet, image_size: int | None) -> tuple[T.Compose, str]:
    """The transform ``predict`` uses for ``model``'s weights (at ``image_size`` when given) and
    words saying which."""
    cfg = model_cfg(model)
    source = ("the weights' preprocessing" if model.pretrained_cfg
              else "torchvision's preprocessing (the weights record none)")
    if image_size is not None:
        # timm's --img-size: another size, the recorded crop_pct, interpolation and mean/std.
        cfg = dataclasses.replace(cfg, input_size=(cfg.in_chans, image_size, image_size))
        source += f" at --image-size {image_size}"
    return T.eval_transform_from_cfg(**cfg.eval_config()), f"; {source}: {_describe(cfg)}"


def _multilabel_evaluation(model: DenseNet, dtype, examples: Sequence, preprocess, batch_size: int,
                           workers: int, preprocessing: str) -> Evaluation:
    logits, targets = gather_outputs(ModelEvaluation(model, dtype, outputs_of), examples, preprocess,
                                     batch_size, workers)
    names = model.class_names or [str(i) for i in range(model.config.num_classes)]
    f = multilabel_figures(logits, targets, names, LossConfig(multi_label=True))
    return Evaluation(loss=f["eval_loss"], accuracy=f["eval_acc"], count=len(logits), examples=len(examples),
                      preprocessing=preprocessing, auroc=f["eval_auroc_labels"], mean_auroc=f["eval_auroc"],
                      auprc=f["eval_auprc_labels"], mean_auprc=f["eval_auprc"])


def _classes_differ(weights: str, trained: list[str], folder: Path, found: list[str]) -> str:
    """One line naming both class lists (their first few names) and their first differences."""
    def names(classes):
        return ", ".join(classes[:6]) + (f", ... ({len(classes)})" if len(classes) > 6 else "")

    differences = [f"{i}: {a} / {b}" for i, (a, b) in enumerate(zip(trained, found)) if a != b]
    return (f"{weights}: trained on classes [{names(trained)}], {folder} has [{names(found)}] "
            f"(first differences, weights / folder: {'; '.join(differences[:3])})")


def _describe(cfg: PretrainedCfg) -> str:
    """A preprocessing cfg in words: ``resize 36 bilinear, centre crop 32, RGB, mean (...), std (...)``."""
    size = cfg.input_size[1]
    channels = {1: "greyscale", 3: "RGB"}[cfg.in_chans]
    return (f"resize {resize_size(size, cfg.crop_pct)} {cfg.interpolation}, centre crop {size}, {channels}, "
            f"mean ({', '.join(f'{m:.3f}' for m in cfg.mean)}), std ({', '.join(f'{s:.3f}' for s in cfg.std)})")


def held_out_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Sums over a batch of cross-entropy loss, correct predictions and weight (0: not counted)."""
    one_label = LossConfig()
    return {"loss": jnp.sum(per_example_loss(logits, labels, one_label) * weights),
            "correct": jnp.sum(per_example_correct(logits, labels, one_label) * weights),
            "count": jnp.sum(weights)}


class ModelEvaluation:
    """A model's held-out figures per batch, without any training state: its weights replicated on
    every device, each global batch split across them (as the ``mesh`` runner places them), computed
    in ``compute_dtype`` with the loss in at least float32; ``outputs`` makes the figures of a
    batch's (logits, labels, weights) (default: :func:`held_out_sums`). Puts ``model`` in eval mode."""

    def __init__(self, model: DenseNet, compute_dtype=jnp.float32, outputs=held_out_sums):
        model.eval()
        graphdef, state = nnx.split(model)
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        self.sharded = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        # Plain arrays, not Variables: each call flattens the state, Variables one Python call each.
        self.state = jax.device_put(nnx.as_pure(state), replicated)
        loss_dtype = jnp.promote_types(compute_dtype, jnp.float32)

        def sums(state, images, labels, weights):
            logits = nnx.merge(graphdef, state)(images.astype(compute_dtype)).astype(loss_dtype)
            return outputs(logits, labels, weights)
        self._sums = jax.jit(sums, out_shardings=replicated)

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        """This process's share of a global batch in, the batch's figures (over every process) out."""
        placed = [jax.make_array_from_process_local_data(self.sharded, batch[k])
                  for k in ("image", "label", "weight")]
        return {k: np.asarray(v.addressable_data(0)) for k, v in self._sums(self.state, *placed).items()}


def evaluate_state(runner, state, data: Dataset, batch_size: int, workers: int = 0) -> dict:
    """Mean loss and accuracy of a training ``state`` on ``data``'s held-out split, over every
    process, through the ``runner`` that trains it (:mod:`densenet_jax.train.parallel`); for
    multi-label data, :func:`densenet_jax.train.multilabel.multilabel_figures` (AUROC, AUPRC)."""
    if data.multi_label:
        def batch_outputs(batch: dict) -> dict:
            placed = runner.place_batch(batch["image"], batch["label"], batch["weight"])
            return {k: np.asarray(v.addressable_data(0)) for k, v in runner.scores(state, *placed).items()}

        logits, targets = gather_outputs(batch_outputs, data.eval, data.preprocess, batch_size, workers)
        return multilabel_figures(logits, targets, data.class_names, LossConfig(multi_label=True))

    def batch_sums(batch: dict) -> dict:
        placed = runner.place_batch(batch["image"], batch["label"], batch["weight"])
        return runner.fetch(runner.eval(state, *placed))

    sums = evaluation_sums(batch_sums, data.eval, data.preprocess, batch_size, workers)
    return {"eval_loss": sums["loss"] / sums["count"], "eval_acc": sums["correct"] / sums["count"]}


def evaluation_sums(batch_sums: BatchSums, examples: Sequence, preprocess, batch_size: int,
                    workers: int = 0) -> dict:
    """Summed loss, correct predictions and ``count``, the number of ``examples`` that counted
    (an unreadable image's stand-in counts for nothing), over every process's share of
    ``examples``, each prepared by ``preprocess`` and each batch's sums given by ``batch_sums``."""
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in eval_batches(examples, preprocess, global_batch=batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              workers=workers):
        for k, v in batch_sums(batch).items():
            sums[k] += float(v)
    return sums

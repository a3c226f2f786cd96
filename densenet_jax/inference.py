"""Classify image files (``dj.predict``): the preprocessing the weights carry (timm's for the pretrained tags; a
training run's own), else torchvision's; batched, top-k classes with names.

    results = predict(model, ["cat.jpg", "photos/"], top_k=5)
    results[0] == {"file": "cat.jpg", "top": [{"class": 281, "name": "tabby", "probability": 0.61}, ...]}
    results[1] == {"file": "photos/broken.jpg", "skipped": "unreadable image (OSError: ...)"}

Multi-label weights (``model.multi_label``) give every label's probability, a sigmoid each:
``{"file": "chest.png", "probabilities": {"Effusion": 0.81, "Nodule": 0.07, ...}}``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from densenet_jax.data import transforms as T
from densenet_jax.data.images import IMG_EXTENSIONS, UnreadableImage, read_image, warn_skipped
from densenet_jax.data.listing import list_tree
from densenet_jax.errors import DataError
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.pretrained_cfg import PretrainedCfg, torchvision_cfg, xrv_cfg


def class_names(num_classes: int, labels: str | Path | list[str] | None = None) -> list[str]:
    """Names for the model's classes: ``labels`` (a list, or a file with one per line); ImageNet's
    1000 (shipped with the package) for a 1000-class model; otherwise the class numbers."""
    if labels is not None:
        names = labels if isinstance(labels, list) else _read_labels(Path(labels))
        if len(names) != num_classes:
            raise DataError(f"{labels if not isinstance(labels, list) else 'class names'}: "
                            f"{len(names)} names for a model of {num_classes} classes")
        return names
    if num_classes == 1000:
        text = resources.files("densenet_jax.data").joinpath("imagenet_classes.txt").read_text()
        return text.splitlines()
    return [str(i) for i in range(num_classes)]


def _read_labels(path: Path) -> list[str]:
    """The non-empty lines of a labels file; DataError naming the file when it cannot be read."""
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the labels file ({getattr(e, 'strerror', None) or e})") from None


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """The given files, and the image files under the given folders, found as training finds a
    class folder's images (``data.listing.list_tree``): the extensions torchvision's ImageFolder
    takes, at any depth, links followed (a link back up the tree is not followed round), names
    starting with a dot ignored; sorted by folder path, then file name. Broken links and files that
    are not regular files are kept: ``read_image`` says why each cannot be read.

    Raises DataError naming a path that does not exist or a folder that cannot be listed, or saying
    that no images were found."""
    paths = list(paths)
    if not paths:
        raise DataError("no image files or folders given")
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            tree = list_tree(path, IMG_EXTENSIONS)
            files += [path / rel / name for rel, name in
                      sorted((rel, name) for rel, entry in tree.items() for name in entry["files"])]
        elif os.path.lexists(path):  # a broken link or a FIFO too: skipped with its reason when read
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError(f"no images in {', '.join(map(str, paths))}")
    return files


def eval_transform(resize: int = 256, crop: int = 224, in_chans: int = 3) -> T.Compose:
    """torchvision's ImageNet eval preprocessing (:func:`torchvision_cfg`): Resize(256) (bilinear,
    antialiased), CenterCrop(224), ToTensor, Normalize(ImageNet mean/std); HWC float32 out."""
    return T.eval_transform_from_cfg(**torchvision_cfg(resize, crop, in_chans).eval_config())


def model_cfg(model: DenseNet, preprocess: str = "weights", resize: int = 256, crop: int = 224) -> PretrainedCfg:
    """The preprocessing for ``model``: with ``preprocess="weights"`` the one its weights carry
    (``model.pretrained_cfg``: a tag's as timm evaluates it, or the one a training run evaluated
    with), falling back to :func:`torchvision_cfg` at ``resize`` / ``crop`` for weights that carry
    none; ``"torchvision"``: torchvision's, always; ``"xrv"``: torchxrayvision's at 224
    (:func:`xrv_cfg`; a one-channel model). ValueError for another ``preprocess``."""
    if preprocess not in ("weights", "torchvision", "xrv"):
        raise ValueError(f"preprocess must be 'weights', 'torchvision' or 'xrv', got {preprocess!r}")
    cfg = model.pretrained_cfg
    if preprocess == "weights" and cfg is not None:
        return cfg
    if preprocess == "xrv":
        if model.config.in_chans != 1:
            raise ValueError(f"--preprocess xrv gives grey images; the model takes {model.config.in_chans} "
                             "channels (--in-chans 1 adapts its first convolution)")
        return xrv_cfg(num_classes=model.config.num_classes)
    return torchvision_cfg(resize, crop, model.config.in_chans)


def model_transform(model: DenseNet, preprocess: str = "weights", use_test_size: bool = False,
                    resize: int = 256, crop: int = 224) -> T.Compose:
    """:func:`model_cfg`'s preprocessing as a transform (with ``use_test_size``, the weights'
    larger test size where they have one)."""
    return T.eval_transform_from_cfg(**model_cfg(model, preprocess, resize, crop).eval_config(use_test_size))


def predict(model: DenseNet, paths: str | Path | Iterable[str | Path], *, top_k: int = 5, batch_size: int = 32,
            labels: str | Path | list[str] | None = None, resize: int = 256, crop: int = 224,
            strict: bool = False, progress: bool = False, transform: T.Compose | None = None) -> list[dict]:
    """Top-``top_k`` classes of every image in ``paths`` (a file or folder, or several), in file
    order, named by ``labels``, else by the names the weights record (``model.class_names``); a
    progress bar (with ``progress``) when there is more than one image. Images are prepared by
    ``transform``, by default as the weights want (:func:`model_transform`: ``model.pretrained_cfg``,
    or torchvision's ``resize``/``crop`` for weights that carry none).

    For multi-label weights each result also holds ``probabilities``: every label's sigmoid, by
    name, in the labels' order (``top`` then ranks the labels).

    An unreadable image (also a broken link, a FIFO or a device: :func:`read_image`) is skipped with
    a warning naming it and listed with the reason, as ``{"file": ..., "skipped": ...}``
    (``strict``: UnreadableImage, a DataError, instead). ValueError for ``top_k`` or
    ``batch_size`` below 1, as the command refuses ``--top`` and ``--batch-size``.

    Weights with operating points (torchxrayvision's, converted with ``--xrv-weights``) give each
    output's sigmoid rescaled by :func:`op_norm` (0.5 at its threshold), as xrv's model does; the
    outputs xrv leaves unnamed are left out.
    """
    from tqdm import tqdm

    # The CLI's rule for --top and --batch-size, so that the library and the command agree.
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} {value}: must be at least 1")
    files = image_files([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    batch_size = min(batch_size, len(files))
    names = class_names(model.config.num_classes, model.class_names if labels is None else labels)
    top_k = min(top_k, len(names))
    model.eval()
    forward = nnx.cached_partial(nnx.jit(lambda m, x: output_probabilities(m, m(x))), model)
    report = _per_label if _sigmoid_outputs(model) else _top
    transform = transform or model_transform(model, resize=resize, crop=crop)
    results = []
    with tqdm(total=len(files), disable=not progress or len(files) < 2, unit="image") as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            batch, kept, skipped = [], [], {}
            for path in chunk:
                try:
                    batch.append(transform({"image": read_image(path)})["image"])
                    kept.append(path)
                except UnreadableImage as e:
                    if strict:
                        raise
                    warn_skipped(e)
                    skipped[path] = f"unreadable image ({e.reason})"
            top = iter(report(np.asarray(forward(_padded(np.stack(batch), batch_size))), kept, names, top_k)
                       if batch else [])
            results += [{"file": str(p), "skipped": skipped[p]} if p in skipped else next(top) for p in chunk]
            bar.update(len(chunk))
    return results


def op_norm(probabilities: jax.Array, op_threshs) -> jax.Array:
    """torchxrayvision's ``op_norm``: each output's probability rescaled so that its operating
    point maps to 0.5, ``p / (2 t)`` below ``t`` and ``1 - (1 - p) / (2 (1 - t))`` from it up;
    0.5 where the threshold is NaN (an output the weights were not trained on). ``probabilities``
    (N, C) after the sigmoid, ``op_threshs`` C values; float32 out."""
    t = jnp.asarray(op_threshs, jnp.float32)
    scaled = jnp.where(probabilities < t, probabilities / (t * 2), 1.0 - (1.0 - probabilities) / ((1 - t) * 2))
    return jnp.where(jnp.isnan(t), 0.5, scaled)


def output_probabilities(model: DenseNet, logits: jax.Array) -> jax.Array:
    """What ``predict`` reports for ``logits`` (N, C): softmax over the classes; for multi-label
    weights the sigmoid of each output, and for weights with operating points
    (``model.pretrained_cfg.op_threshs``: torchxrayvision's) then :func:`op_norm`, as xrv's
    ``DenseNet.forward`` gives them."""
    if not _sigmoid_outputs(model):
        return jax.nn.softmax(logits, axis=-1)
    threshs = _thresholds(model)
    probabilities = jax.nn.sigmoid(logits)
    return probabilities if threshs is None else op_norm(probabilities, threshs)


def _padded(images: np.ndarray, size: int) -> np.ndarray:
    """The batch padded to ``size`` images, so that every batch runs the same compiled program."""
    return np.concatenate([images, np.zeros((size - len(images), *images.shape[1:]), images.dtype)])


def _top(probabilities: np.ndarray, files: list[Path], names: list[str], k: int) -> list[dict]:
    results = []
    for path, p in zip(files, probabilities):
        order = np.argsort(-p, kind="stable")[:k]
        results.append({"file": str(path), "top": [
            {"class": int(c), "name": names[c], "probability": float(p[c])} for c in order]})
    return results


def _thresholds(model: DenseNet) -> tuple[float, ...] | None:
    return None if model.pretrained_cfg is None else model.pretrained_cfg.op_threshs


def _sigmoid_outputs(model: DenseNet) -> bool:
    """Whether each output is a label of its own (multi-label weights, or torchxrayvision's)."""
    return model.multi_label or _thresholds(model) is not None


def _per_label(probabilities: np.ndarray, files: list[Path], names: list[str], k: int) -> list[dict]:
    """Every named output's probability in the weights' label order (torchxrayvision's weights
    name "" the outputs they were not trained on, which op_norm sets to 0.5: left out), with the
    ``k`` highest as ``top``."""
    results = _top(probabilities, files, names, len(names))
    for result, p in zip(results, probabilities):
        result["top"] = [entry for entry in result["top"] if entry["name"]][:k]
        result["probabilities"] = {name: float(v) for name, v in zip(names, p) if name}
    return results

"""A trained DenseNet out of JAX: ONNX for onnxruntime, a ``jax.export`` StableHLO artifact for any
JAX process, and timm's Hub folder for PyTorch.

Every export is of the model in eval mode (BatchNorm on its running statistics, no dropout) and is
written atomically: a file under a temporary name then renamed, a folder built beside its
destination then renamed, so that a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.files import atomic_write_bytes, check_folder_output, check_output, write_folder
from densenet_jax.model.densenet import DenseNet, smallest_input
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.model.registry import TIMM_NAMES, model_name
from densenet_jax.weights.format import state_arrays
from densenet_jax.weights.torch_keys import to_torchvision

FORMATS = ("onnx", "stablehlo", "timm")
LAYOUTS = ("nhwc", "nchw")
# The oldest ONNX opset the graph jax2onnx writes for a DenseNet is valid in: it gives ReduceMean
# its axes as an input, which ONNX has from opset 18 on (onnxruntime 1.14 and later read it).
# Older runtimes refuse newer opsets outright, so the oldest that works is the widest deployment.
MIN_OPSET = 18
# jax.export's platforms a StableHLO artifact is lowered for: one artifact that a CPU, a GPU and a
# TPU process can all call (lowered on any of them; no device of each kind is needed).
PLATFORMS = ("cpu", "cuda", "tpu")
NEEDS_JAX2ONNX = "ONNX export needs jax2onnx (the [export] extra: pip install jax2onnx onnxruntime)"
TIMM_FILES = ("config.json", "model.safetensors")


def eval_view(model: DenseNet) -> DenseNet:
    """``model`` in eval mode, sharing its arrays, leaving the caller's model in its own mode."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    view.eval()
    return view


def check_image_size(config: DenseNetConfig, image_size: int) -> None:
    """ValueError, in one line, for an image size the model cannot take."""
    minimum = smallest_input(config)
    if image_size < minimum:
        raise ValueError(f"--image-size {image_size} is too small for this DenseNet: at least {minimum}")


def default_image_size(model: DenseNet) -> int:
    """The input size the weights were trained or evaluated at (their recorded preprocessing's
    ``input_size``, as timm's export writes it), else 224 (torchvision's)."""
    cfg = model.pretrained_cfg
    return cfg.input_size[-1] if cfg is not None else 224


def check_opset(opset: int) -> None:
    """ValueError, in one line, for an opset older than the graph needs (:data:`MIN_OPSET`)."""
    try:
        import onnx  # lazy: optional (the [export] extra)
    except ImportError:
        raise ValueError(NEEDS_JAX2ONNX) from None
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"--opset {opset}: the graph needs opset {MIN_OPSET} to {newest} (the newest "
                         "this onnx package knows)")


def onnx_bytes(model: DenseNet, *, image_size: int = 224, layout: str = "nhwc",
               opset: int = MIN_OPSET) -> bytes:
    """The model as a serialised ONNX ModelProto (``opset``, by default the oldest the graph is
    valid in, :data:`MIN_OPSET`) through jax2onnx.

    Input ``images``: float32 (batch, image_size, image_size, in_chans) for layout "nhwc", or
    (batch, in_chans, image_size, image_size) for "nchw"; batch is dynamic (the symbol ``batch``). Output
    ``logits``: float32 (batch, num_classes). The weights are initializers inside the graph.
    """
    try:
        from jax2onnx import to_onnx  # lazy: optional (the [export] extra)
    except ImportError:
        raise ValueError(NEEDS_JAX2ONNX) from None
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    check_image_size(model.config, image_size)
    check_opset(opset)
    view = eval_view(model)
    # onnx_ir warns, for a few shape constants jax2onnx leaves untyped, that it skips their
    # optional value_info; the graph is complete without it (onnx.checker passes, onnxruntime runs).
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        proto = to_onnx(lambda images: view(images), inputs=[("batch", image_size, image_size, model.config.in_chans)],
                        model_name="densenet", opset=opset, inputs_as_nchw=[0] if layout == "nchw" else None,
                        input_names=["images"], output_names=["logits"])
    finally:
        serde_log.setLevel(level)
    return proto.SerializeToString()


def check_platforms(platforms: tuple[str, ...]) -> None:
    """ValueError, in one line, for a platform jax.export does not lower for (or none)."""
    unknown = [p for p in platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
    if unknown or not platforms:
        raise ValueError(f"--platforms {','.join(platforms)}: each of cpu, cuda, rocm, tpu (at least one)")


def stablehlo_bytes(model: DenseNet, *, image_size: int = 224, platforms: tuple[str, ...] = PLATFORMS) -> bytes:
    """The model as a serialised ``jax.export.Exported``: float32 (batch, image_size, image_size,
    in_chans) NHWC images, batch symbolic, to float32 (batch, num_classes) logits, the weights inside as
    constants, lowered for each of ``platforms`` (jax.export's names: cpu, cuda, rocm, tpu). Load
    with ``jax.export.deserialize(data).call(images)`` on any of them; no densenet_jax needed."""
    check_image_size(model.config, image_size)
    check_platforms(platforms)
    view = eval_view(model)
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, model.config.in_chans), jnp.float32)
    exported = jax.export.export(jax.jit(lambda images: view(images)), platforms=platforms)(spec)
    return bytes(exported.serialize())


def timm_architecture(config: DenseNetConfig) -> str:
    """timm's model name for ``config``'s architecture; ValueError for one timm does not have."""
    name = model_name(config)
    if name not in TIMM_NAMES:
        raise ValueError(f"timm has no {name or 'custom DenseNet'} architecture "
                         f"(it has {', '.join(sorted(TIMM_NAMES))}); export it as onnx or stablehlo")
    return name


def weights_preprocessing(model: DenseNet, image_size: int = 224) -> dict:
    """The weights' own preprocessing where they carry one (a pretrained tag's, a training
    run's), with its larger test size and crop where it has one (timm's ``test_input_size``,
    ``test_crop_pct``: the ra tags'); else torchvision's at ``image_size``."""
    cfg = model.pretrained_cfg
    if cfg is None:
        # torchvision's eval preprocessing in timm's terms: bilinear, crop_pct 0.875 (256 for 224),
        # for the model's channels (one: ImageNet's averaged mean and std, as timm's in_chans=1)
        return PretrainedCfg(input_size=(3, image_size, image_size), interpolation="bilinear").with_in_chans(
            model.config.in_chans).eval_config()
    test = {"test_input_size": cfg.test_input_size, "test_crop_pct": cfg.test_crop_pct}
    return {**cfg.eval_config(), **{k: v for k, v in test.items() if v is not None}}


def timm_config(config: DenseNetConfig, preprocessing: dict,
                class_names: list[str] | None = None) -> dict:
    """The ``config.json`` timm reads from a Hub repo or a ``local-dir:`` folder (timm 1.0,
    ``timm.models._hub``): architecture, num_classes, num_features, global_pool, label_names (the
    class names, when known), and pretrained_cfg with ``preprocessing`` (input_size,
    interpolation, crop_pct, crop_mode, mean, std) and where the stem and classifier are."""
    size = preprocessing["input_size"]
    pretrained_cfg = {**{k: list(v) if isinstance(v, tuple) else v for k, v in preprocessing.items()},
                      "num_classes": config.num_classes, "pool_size": [size[1] // 32, size[2] // 32],
                      "first_conv": "features.conv0", "classifier": "classifier",
                      "fixed_input_size": False, "custom_load": False}
    cfg = {"architecture": timm_architecture(config), "num_classes": config.num_classes,
           "num_features": config.num_features, "global_pool": "avg"}
    if config.in_chans != 3:
        cfg["model_args"] = {"in_chans": config.in_chans}
    if class_names is not None:
        if len(class_names) != config.num_classes:
            raise ValueError(f"{len(class_names)} class names for {config.num_classes} classes")
        cfg["label_names"] = list(class_names)
    cfg["pretrained_cfg"] = pretrained_cfg
    return cfg


def timm_files(model: DenseNet, *, image_size: int = 224,
               class_names: list[str] | None = None) -> dict[str, bytes]:
    """``config.json`` and ``model.safetensors`` (torchvision's keys and layouts, which timm's
    DenseNet shares) of timm's Hub folder for ``model``, by file name."""

    check_image_size(model.config, image_size)
    preprocessing = weights_preprocessing(model, image_size)
    cfg = timm_config(model.config, preprocessing, class_names)
    arrays = {k: np.asarray(v) for k, v in state_arrays(model).items()}
    state_dict = to_torchvision(arrays, model.config)
    return {TIMM_FILES[0]: (json.dumps(cfg, indent=2) + "\n").encode(),
            TIMM_FILES[1]: save(state_dict)}


def export(model: DenseNet, fmt: str, out: str | os.PathLike, *, image_size: int | None = None,
           layout: str = "nhwc", class_names: list[str] | None = None, force: bool = False,
           opset: int = MIN_OPSET, platforms: tuple[str, ...] = PLATFORMS) -> Path:
    """Write ``model`` to ``out`` as ``fmt``: "onnx" (a file; ``layout`` nhwc or nchw, ``opset``),
    "stablehlo" (a file, for ``platforms``) or "timm" (a folder with config.json and
    model.safetensors; ``class_names`` go into its config). ``image_size`` defaults to the size the
    weights record (:func:`default_image_size`). Returns the path written.

    Raises ValueError for an unknown format or layout, a layout other than nhwc for a format other
    than onnx, an image size the model cannot take, an architecture timm does not have, or a timm
    folder named like a file (``out.json``);
    CheckpointError for an output that exists (without ``force``) or cannot be written. Nothing is
    written unless the whole export succeeds.
    """
    out = Path(out)
    image_size = default_image_size(model) if image_size is None else image_size
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout != "nhwc" and fmt != "onnx":
        raise ValueError(f"--layout {layout} applies to onnx only; {fmt} takes NHWC images")
    if fmt == "timm" and out.suffix.lower() in (".json", ".safetensors", ".bin", ".pth", ".onnx"):
        raise ValueError(f"{out}: timm's Hub layout is a folder (config.json and model.safetensors); "
                         f"name a folder, not a {out.suffix} file")
    # Everything that can be refused is refused before the export's minute of work.
    check_image_size(model.config, image_size)
    if fmt == "timm":
        timm_architecture(model.config)
        check_folder_output(out, TIMM_FILES, force=force)
    else:
        check_output(out, force=force)
    if fmt == "onnx":
        check_opset(opset)
    if fmt == "stablehlo":
        check_platforms(platforms)
    if fmt == "timm":
        write_folder(out, timm_files(model, image_size=image_size, class_names=class_names), force=force)
    elif fmt == "onnx":
        atomic_write_bytes(out, onnx_bytes(model, image_size=image_size, layout=layout, opset=opset))
    else:
        atomic_write_bytes(out, stablehlo_bytes(model, image_size=image_size, platforms=platforms))
    return out

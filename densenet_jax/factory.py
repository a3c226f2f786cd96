"""The one funnel that builds a model: ``create_model`` (by name, random or pretrained), ``load``
(from a file or a Hub repo) and what both end in, ``build_model`` (config, weights, a new head,
adapted input channels, the backbone), as timm's ``build_model_with_cfg``.

It sits above ``model/`` (the network, with no file code) and ``weights/`` (files and the Hub,
with no model building), which import neither each other's funnel nor this module.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from flax import nnx

from densenet_jax.errors import CheckpointError
from densenet_jax.model.config import DenseNetConfig
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.features import DenseNetFeatures
from densenet_jax.model.registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, TIMM_NAMES, get_config
from densenet_jax.weights.format import CONV0, HEAD, Weights, assign, read_weights, state_arrays
from densenet_jax.weights.hub import folder_weights, pretrained_weights, repo_weights
from densenet_jax.weights.torch_keys import adapt_input_conv

log = logging.getLogger("densenet_jax")


def create_model(name: str, *, pretrained: bool = False, pretrained_cfg_overlay: dict | None = None,
                 rngs: nnx.Rngs | None = None, features_only: bool = False, out_indices=None,
                 **overrides) -> DenseNet | DenseNetFeatures:
    """Build a registered model (see :func:`densenet_jax.list_models`), e.g.
    ``create_model("densenet_bc_100_k12", num_classes=100, rngs=nnx.Rngs(0))``; ``overrides``
    replace fields of its :class:`DenseNetConfig` (``in_chans``, ``memory_efficient``, ...).

    Dropout keywords: ``proj_drop_rate`` is always the dropout after each dense layer (config field
    ``drop_rate``), ``head_drop_rate`` always the dropout before the classifier. ``drop_rate`` reads
    as its source reads it: for timm's names (densenet121/169/201/161, densenetblur121d,
    densenet264d) it is timm's head dropout, as in ``timm.create_model``; for the paper's CIFAR
    models it is the dropout after each dense layer, the paper's (and the config field's) meaning.

    ``features_only=True`` gives the backbone instead (:class:`densenet_jax.DenseNetFeatures`),
    returning timm's ``features_only`` maps ``out_indices`` (default: all; an int n: the last n).
    ``pretrained=True`` loads a pretrained tag's weights from the Hugging Face Hub, as timm names
    them (``"densenet121.tv_in1k"``; a bare name takes timm's default tag; ``"hf-hub:<repo>"`` any
    repo laid out as timm's), with the preprocessing they expect as ``model.pretrained_cfg``;
    ``pretrained_cfg_overlay=dict(file=PATH)`` reads the weights from a local file instead (see
    :func:`densenet_jax.weights.hub.pretrained_weights`).

    Raises ValueError for an unknown name, tag or field, or two spellings of one dropout
    (CheckpointError, a ValueError, for weights that cannot be had or do not fit).
    """
    fields = _config_fields(architecture(name), overrides)
    if pretrained:
        weights = pretrained_weights(name, pretrained_cfg_overlay, fields)
        return build_model(weights.config.replace(**fields), weights, rngs=rngs,
                           features_only=features_only, out_indices=out_indices)
    return build_model(get_config(architecture(name), **fields), rngs=rngs,
                       features_only=features_only, out_indices=out_indices)


def load(path: str | os.PathLike, *, rngs: nnx.Rngs | None = None, features_only: bool = False,
         out_indices=None, **overrides) -> DenseNet | DenseNetFeatures:
    """Rebuild the model saved at ``path``; ``overrides`` replace config fields.

    ``path`` may also be ``"hf-hub:<repo>"``, a Hugging Face Hub repo laid out as timm's
    (``config.json`` beside ``model.safetensors``), or ``"local-dir:<folder>"``, a folder laid out
    so (timm's spellings). With ``num_classes`` different from the file's,
    every weight but the classifier is loaded and the classifier is freshly initialised from
    ``rngs`` (for fine-tuning); ``in_chans`` adapts the first convolution
    (:func:`densenet_jax.weights.torch_keys.adapt_input_conv`). ``features_only=True`` gives its
    backbone (:class:`densenet_jax.DenseNetFeatures`) returning the feature maps ``out_indices``.
    Raises CheckpointError, naming the file and the fault, for anything unusable.
    """
    path = str(path)
    if path.startswith(HF_HUB_PREFIX):
        weights = repo_weights(path[len(HF_HUB_PREFIX):])
    elif path.startswith(LOCAL_DIR_PREFIX):
        weights = folder_weights(path[len(LOCAL_DIR_PREFIX):])
    else:
        weights = read_weights(path)
    return build_model(weights.config.replace(**overrides), weights, rngs=rngs,
                       features_only=features_only, out_indices=out_indices)


def build_model(config: DenseNetConfig, weights: Weights | None = None, *, rngs: nnx.Rngs | None = None,
                features_only: bool = False, out_indices=None) -> DenseNet | DenseNetFeatures:
    """The model ``config`` describes: randomly initialised from ``rngs`` (default seed 0), or
    holding ``weights``. Where ``config`` asks for another head than the weights have, the head is
    new (from ``rngs``); for other input channels, conv0 is adapted as timm adapts it; the weights'
    preprocessing becomes ``model.pretrained_cfg``. ``features_only``: the backbone instead,
    returning the maps ``out_indices``. CheckpointError, naming ``weights.source``, for weights
    that do not fit."""
    model = DenseNet(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
    if weights is not None:
        assign(model, _fitted_arrays(weights, model), source=weights.source)
        if weights.pretrained_cfg is not None:
            model.pretrained_cfg = weights.pretrained_cfg.with_in_chans(config.in_chans)
        if config.num_classes == weights.config.num_classes:  # a new head's classes are unnamed
            model.class_names = weights.class_names
            model.multi_label = weights.multi_label
    if not features_only:
        return model
    backbone = DenseNetFeatures(model, out_indices)
    backbone.pretrained_cfg = model.pretrained_cfg
    return backbone


def _fitted_arrays(weights: Weights, model: DenseNet) -> dict[str, np.ndarray]:
    """``weights.arrays`` with ``model``'s fresh head where the class counts differ, and conv0
    adapted where the input channels do."""
    arrays, had, wants = weights.arrays, weights.config, model.config
    if wants.num_classes != had.num_classes:
        if wants.num_classes:  # 0: the head is dropped, nothing new to say
            held = f"the file's has {had.num_classes} classes" if had.num_classes else "the file has none"
            log.warning("%s: new %d-class classifier, freshly initialised (%s)", weights.source,
                        wants.num_classes, held)
        fresh_head = {k: v for k, v in state_arrays(model).items() if k.startswith(HEAD)}
        arrays = {**{k: v for k, v in arrays.items() if not k.startswith(HEAD)}, **fresh_head}
    if wants.in_chans != had.in_chans:
        arrays = {**arrays, CONV0: _adapted_conv0(arrays[CONV0], wants.in_chans, weights.source)}
    return arrays


def _adapted_conv0(kernel: np.ndarray, in_chans: int, source: str) -> np.ndarray:
    """conv0's HWIO kernel adapted to ``in_chans`` inputs through timm's rule (on OIHW)."""
    kernel = np.asarray(kernel)
    if kernel.shape[2] != 3:
        raise CheckpointError(f"{source}: {CONV0} takes {kernel.shape[2]} channels; only 3-channel "
                              f"weights adapt to in_chans={in_chans}")
    return np.transpose(adapt_input_conv(in_chans, np.transpose(kernel, (3, 2, 0, 1))), (2, 3, 1, 0))


def architecture(name: str) -> str:
    """The architecture a model name, tag or Hub repo names: ``densenet121.tv_in1k`` and
    ``hf-hub:timm/densenet121.tv_in1k`` (``@revision`` or not) name ``densenet121``."""
    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        name = name.rstrip("/").rsplit("/", 1)[-1].partition("@")[0]
    return name.partition(".")[0]


def _config_fields(name: str, overrides: dict) -> dict:
    """``overrides`` with the dropout keywords turned into config fields (see create_model)."""
    fields = dict(overrides)
    aliases = {"proj_drop_rate": "drop_rate"}
    if name in TIMM_NAMES:
        aliases = {"drop_rate": "head_drop_rate", **aliases}
    renamed = {}
    for spelling, field in aliases.items():
        if spelling in fields:
            renamed[field] = fields.pop(spelling)
    clash = renamed.keys() & fields.keys()
    if clash:
        field = sorted(clash)[0]
        raise ValueError(f"{name}: two values for {field} (timm's spelling and the config field's); "
                         "pass one")
    return {**fields, **renamed}

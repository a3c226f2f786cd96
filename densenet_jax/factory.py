"""``create_model``: a registered architecture by name, as a classifier or as a backbone.

Above models.py and backbone.py (neither imports this module), as timm keeps ``create_model``
above its models.
"""

from __future__ import annotations

from flax import nnx

from densenet_jax.backbone import DenseNetFeatures
from densenet_jax.configs import DenseNetConfig
from densenet_jax.models import DenseNet
from densenet_jax.registry import TIMM_NAMES, get_config


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
    :func:`densenet_jax.hub.pretrained_model`).

    Raises ValueError for an unknown name, tag or field, or two spellings of one dropout
    (CheckpointError, a ValueError, for weights that cannot be had or do not fit).
    """
    fields = _config_fields(architecture(name), overrides)
    if pretrained:
        from densenet_jax.hub import pretrained_model
        return pretrained_model(name, pretrained_cfg_overlay=pretrained_cfg_overlay, rngs=rngs,
                                features_only=features_only, out_indices=out_indices, **fields)
    config = get_config(architecture(name), **fields)
    return build(config, rngs=rngs, features_only=features_only, out_indices=out_indices)


def architecture(name: str) -> str:
    """The architecture a model name, tag or Hub repo names: ``densenet121.tv_in1k`` and
    ``hf-hub:timm/densenet121.tv_in1k`` name ``densenet121``."""
    if name.startswith("hf-hub:"):
        name = name.rsplit("/", 1)[-1]
    return name.partition(".")[0]


def build(config: DenseNetConfig, *, rngs: nnx.Rngs | None = None, features_only: bool = False,
          out_indices=None) -> DenseNet | DenseNetFeatures:
    """The model ``config`` describes (randomly initialised from ``rngs``, default seed 0), or its
    backbone with ``features_only``."""
    model = DenseNet(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
    return DenseNetFeatures(model, out_indices) if features_only else model


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

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


def create_model(name: str, *, rngs: nnx.Rngs | None = None, features_only: bool = False,
                 out_indices=None, **overrides) -> DenseNet | DenseNetFeatures:
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
    Raises ValueError for an unknown name or field, or two spellings of one dropout.
    """
    config = get_config(name, **_config_fields(name, overrides))
    return build(config, rngs=rngs, features_only=features_only, out_indices=out_indices)


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

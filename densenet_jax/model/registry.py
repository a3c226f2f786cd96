"""The named architectures: torchvision's and timm's ImageNet DenseNets and the paper's CIFAR/SVHN
models, each a DenseNetConfig. Pretrained weights (tags such as ``densenet121.tv_in1k``) are kept
apart from the architectures they fit."""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Sequence

from densenet_jax.model.config import DenseNetConfig
from densenet_jax.model.pretrained_cfg import PretrainedCfg, Top1

HF_HUB_PREFIX = "hf-hub:"  # timm's prefix for a model named by its Hub repo
LOCAL_DIR_PREFIX = "local-dir:"  # timm's prefix for a folder laid out as a Hub repo

_REGISTRY: dict[str, Callable[[], DenseNetConfig]] = {
    "densenet121": lambda: DenseNetConfig.imagenet(32, (6, 12, 24, 16), 64),
    "densenet169": lambda: DenseNetConfig.imagenet(32, (6, 12, 32, 32), 64),
    "densenet201": lambda: DenseNetConfig.imagenet(32, (6, 12, 48, 32), 64),
    "densenet161": lambda: DenseNetConfig.imagenet(48, (6, 12, 36, 24), 96),
    # timm's: a deep stem, and for densenetblur121d blur pooling in the stem (timm/models/densenet.py).
    "densenetblur121d": lambda: DenseNetConfig.imagenet(32, (6, 12, 24, 16), 64, stem="deep",
                                                        aa_layer="blur"),
    "densenet264d": lambda: DenseNetConfig.imagenet(48, (6, 12, 64, 48), 96, stem="deep"),
}
# The paper's Table 2 (CIFAR/SVHN); any other depth and growth rate of the family is named alike.
_PAPER_TABLE_2 = ("densenet_40_k12", "densenet_100_k12", "densenet_100_k24", "densenet_bc_100_k12",
                  "densenet_bc_250_k24", "densenet_bc_190_k40")
_PAPER_FAMILY = re.compile(r"densenet(_bc)?_([1-9]\d*)_k([1-9]\d*)")
# Fields that do not make another architecture: a name covers every value of them (as timm names
# densenet121 with in_chans=1 or another head "densenet121").
NOT_ARCHITECTURE = ("num_classes", "in_chans", "drop_rate", "head_drop_rate", "memory_efficient")
# ... and the anti-aliasing, which no weight shows.
_UNSEEN_IN_WEIGHTS = (*NOT_ARCHITECTURE, "aa_layer", "aa_stem_only")


def paper_config(name: str) -> DenseNetConfig | None:
    """The paper's CIFAR/SVHN DenseNet that ``name`` spells (Huang et al. 2017, Sections 3-4):
    ``densenet_<L>_k<k>`` (no bottleneck, no compression) or ``densenet_bc_<L>_k<k>`` (bottleneck
    4k, compression 0.5), of depth L and growth rate k; None for a name of another form.

    Raises ValueError naming the model when L gives no three equal dense blocks."""
    match = _PAPER_FAMILY.fullmatch(name)
    if match is None:
        return None
    bottleneck, depth, growth_rate = bool(match[1]), int(match[2]), int(match[3])
    try:
        return DenseNetConfig.cifar(depth, growth_rate, bottleneck=bottleneck,
                                    compression=0.5 if bottleneck else 1.0)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


# The names timm registers (timm 1.0.31, timm/models/densenet.py): create_model reads their dropout
# keywords with timm's meaning.
TIMM_NAMES = frozenset({"densenet121", "densenet169", "densenet201", "densenet161",
                        "densenetblur121d", "densenet264d"})


def list_models(filter: str | Sequence[str] = "", pretrained: bool = False) -> list[str]:
    """Every registered architecture name, in registration order (torchvision's, timm's, then the
    paper's Table 2; :func:`get_config` also takes any depth and growth rate of the paper's family);
    with ``pretrained``, every pretrained tag (``densenet121.tv_in1k``, ...) instead. ``filter``:
    shell-style patterns (``"*121*"``, or several), as timm's ``list_models`` takes them; a name
    is listed when any matches.

    Raises TypeError for a filter that is not a string or strings (``list_models(True)`` was
    meant as ``pretrained=True``)."""
    patterns = [filter] if isinstance(filter, str) else filter
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"list_models: filter {filter!r} is not a pattern; for the tags, pretrained=True")
    if pretrained:
        names = list(TAGS)
    else:
        names = [*_REGISTRY, *_PAPER_TABLE_2]
    patterns = [p for p in patterns if p]
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def get_config(name: str, **overrides) -> DenseNetConfig:
    """The named configuration with fields replaced by ``overrides`` (e.g. num_classes=10): a
    registered name, or any of the paper's family (``densenet_bc_16_k12``, see :func:`paper_config`).

    Raises ValueError for an unknown name or field, or a depth the family does not have.
    """
    factory = _REGISTRY.get(name)
    config = factory() if factory is not None else paper_config(name)
    if config is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}, or any "
                         "densenet_<L>_k<k> / densenet_bc_<L>_k<k> of the paper's family")
    return config.replace(**overrides)


def weights_architecture(config: DenseNetConfig) -> DenseNetConfig:
    """``config`` with what a name leaves open (NOT_ARCHITECTURE) and what no weight shows
    (anti-aliasing) at their defaults: two configs whose weights fit each other give equal results."""
    defaults = DenseNetConfig.__dataclass_fields__
    return config.replace(**{field: defaults[field].default for field in _UNSEEN_IN_WEIGHTS})


def model_name(config: DenseNetConfig) -> str | None:
    """The name of ``config``'s architecture (the fields in NOT_ARCHITECTURE aside): a registered
    one, or the paper family's; None when it has neither."""
    kept = {field: getattr(config, field) for field in NOT_ARCHITECTURE}
    candidates = list_models()
    if config.stem == "cifar" and len(set(config.block_config)) == 1 and len(config.block_config) == 3:
        bottleneck = config.bn_size is not None
        depth = 3 * config.block_config[0] * (2 if bottleneck else 1) + 4
        candidates.append(f"densenet{'_bc' * bottleneck}_{depth}_k{config.growth_rate}")
    for name in candidates:
        if get_config(name, **kept) == config:
            return name
    return None


def architecture_name(config: DenseNetConfig) -> str:
    """The name of ``config``'s architecture (:func:`model_name`), or its growth rate, blocks and
    stem when it has none: what messages call a model."""
    return model_name(config) or (
        f"DenseNet(k={config.growth_rate}, blocks {config.block_config}, {config.stem} stem)")


def _tag(architecture: str, tag: str, top1: tuple[Top1, ...], **fields) -> PretrainedCfg:
    return PretrainedCfg(architecture=architecture, tag=tag, hf_hub_id=f"timm/{architecture}.{tag}",
                         license="apache-2.0", top1=top1, **fields)


def _timm(value: float, size: int = 224, crop_pct: float = 0.875) -> Top1:
    return Top1(value, f"timm validate.py, {size}x{size}, bicubic, crop_pct {crop_pct}")


def _torchvision(value: float) -> Top1:
    return Top1(value, "torchvision, resize 256 bilinear, centre crop 224")


# timm's densenet.py default_cfgs (timm 1.0): every weight set timm publishes for DenseNet, in its
# order (the first tag of a name is its default). Top-1 from timm's results-imagenet.csv and
# torchvision's model documentation. The ra weights were trained by timm (RandAugment recipe).
_RA = dict(test_input_size=(3, 288, 288), test_crop_pct=0.95)
TAGS: dict[str, PretrainedCfg] = {cfg.architecture + "." + cfg.tag: cfg for cfg in (
    _tag("densenet121", "ra_in1k", (_timm(75.574), _timm(76.486, 288, 0.95)), **_RA),
    _tag("densenetblur121d", "ra_in1k", (_timm(76.574), _timm(77.320, 288, 0.95)), **_RA),
    _tag("densenet121", "tv_in1k", (_timm(74.750), _torchvision(74.434))),
    _tag("densenet169", "tv_in1k", (_timm(75.922), _torchvision(75.600))),
    _tag("densenet201", "tv_in1k", (_timm(77.284), _torchvision(76.896))),
    _tag("densenet161", "tv_in1k", (_timm(77.384), _torchvision(77.138))),
)}


def default_tag(architecture: str) -> str | None:
    """timm's default tag for ``architecture`` (its first), or None when none is published."""
    return next((cfg.tag for cfg in TAGS.values() if cfg.architecture == architecture), None)


def split_name(name: str) -> tuple[str, str | None]:
    """``"densenet121.tv_in1k"`` -> ``("densenet121", "tv_in1k")``; a bare name has tag None."""
    architecture, _, tag = name.partition(".")
    return architecture, tag or None


def resolve(name: str) -> PretrainedCfg:
    """The pretrained cfg of ``name`` (``name.tag``, or a bare name for its default tag).

    Raises ValueError naming the tag, and the tags that exist, when there is none.
    """
    architecture, tag = split_name(name)
    tag = tag or default_tag(architecture)
    if f"{architecture}.{tag}" in TAGS:
        return TAGS[f"{architecture}.{tag}"]
    known = [t for t in TAGS if t.startswith(architecture + ".")]
    if known:
        raise ValueError(f"unknown tag {name!r}; {architecture} has {', '.join(known)}")
    raise ValueError(f"no pretrained weights for {name!r}; pretrained tags: {', '.join(TAGS)}")

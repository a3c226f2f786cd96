"""torchvision's and timm's DenseNet state dicts <-> ours: names, layouts, and the architecture
they imply (timm's state dicts use torchvision's names, plus conv1/conv2/norm1/norm2 in deep stems).

Works on numpy arrays only, so that this package never imports torch; ``convert/`` reads and writes
the torch files. The mapping is a table built from the model itself: every one of our weights has
exactly one torchvision key and layout, and every shape is checked.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flax import nnx

from densenet_jax.model.config import DenseNetConfig, kept_channels
from densenet_jax.errors import CheckpointError
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.registry import architecture_name, get_config, list_models, weights_architecture
from densenet_jax.weights.format import HEAD, check_arrays, state_arrays

# Our leaf name -> torchvision's, by the rank of the array (a rank-2 kernel is the Linear layer).
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_IGNORED_SUFFIX = ".num_batches_tracked"  # a BN step counter: no Flax twin, unused with momentum 0.1
_STEM_KEY = "features.conv0.weight"  # every DenseNet has it; what sits before it is a wrapper's prefix
_BARE_STEM_KEY = "conv0.weight"  # the same in a state dict of model.features alone
_EMA_PART = re.compile(r"(^|[._])ema([._]|$)")


@dataclass(frozen=True)
class Entry:
    """One weight: our key and shape, torchvision's key, and how to turn torch's layout into ours."""
    flax_key: str
    shape: tuple[int, ...]
    torch_key: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _identity(a):
    return a


def _conv_to_flax(a):  # OIHW -> HWIO
    return np.transpose(a, (2, 3, 1, 0))


def _conv_to_torch(a):  # HWIO -> OIHW
    return np.transpose(a, (3, 2, 0, 1))


def _linear(a):  # (out, in) <-> (in, out)
    return np.transpose(a)


def weight_table(config: DenseNetConfig) -> list[Entry]:
    """Every weight of the model ``config`` describes, with its torchvision twin."""
    shapes = _abstract_shapes(config)
    table = []
    for key, shape in shapes.items():
        module, leaf = key.rsplit(".", 1)
        if leaf == "kernel":
            to_flax, to_torch = (_conv_to_flax, _conv_to_torch) if len(shape) == 4 else (_linear, _linear)
        else:
            to_flax = to_torch = _identity
        table.append(Entry(key, shape, f"{module}.{_TORCH_LEAF[leaf]}", to_flax, to_torch))
    return table


@functools.lru_cache(maxsize=32)  # tracing a model's construction takes a while; configs are frozen
def _abstract_shapes(config: DenseNetConfig) -> dict[str, tuple[int, ...]]:
    model = nnx.eval_shape(lambda: DenseNet(config, rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in state_arrays(model).items()}


def densenet_prefixes(keys) -> list[str]:
    """Every prefix under which a DenseNet sits among ``keys``: P such that P +
    ``features.conv0.weight`` is a key, P empty or ending in a dot (``module.`` from DataParallel,
    ``_orig_mod.`` from torch.compile, ``model.`` from Lightning, ``model_ema.module.`` from an EMA
    copy in a container, any nesting of these). A ``model.features`` saved alone (keys
    ``conv0.weight``, ``denseblock1...``) counts too, under the prefix its keys have."""
    keys = set(keys)
    found = {key[:-len(_STEM_KEY)] for key in keys if key == _STEM_KEY or key.endswith("." + _STEM_KEY)}
    for key in keys:
        bare = key[:-len(_BARE_STEM_KEY)]
        if ((key == _BARE_STEM_KEY or key.endswith("." + _BARE_STEM_KEY))
                and not (bare.endswith("features.") and bare[:-len("features.")] in found)
                and any(k.startswith(bare + "denseblock1.") for k in keys)):
            found.add(bare)
    return sorted(found, key=lambda p: (len(p), p))


def choose_prefix(keys, source: str, prefix: str | None = None) -> str:
    """The prefix of the one DenseNet among ``keys`` (see :func:`densenet_prefixes`), or ``prefix``
    when given. With several, the one that is not an EMA copy (a prefix with an ``ema`` part, as
    torchvision's ``model_ema``, timm's ``state_dict_ema``) when that leaves one; CheckpointError
    naming what was found otherwise."""
    keys = list(keys)
    found = densenet_prefixes(keys)
    if prefix is not None:
        if prefix not in found:
            raise CheckpointError(f"{source}: no DenseNet under prefix {prefix!r} "
                                  f"(found: {', '.join(map(repr, found)) or 'none'})")
        return prefix
    if not found:
        raise CheckpointError(f"{source}: not a DenseNet checkpoint (no key ends in {_STEM_KEY}; "
                              f"{describe_keys(keys)})")
    plain = [p for p in found if not _EMA_PART.search(p)]
    if len(found) == 1 or len(plain) == 1:
        return (plain if len(plain) == 1 else found)[0]
    raise CheckpointError(f"{source}: holds {len(found)} DenseNets, under prefixes "
                          f"{', '.join(map(repr, found))}; choose one (--prefix)")


def densenet_keys(keys, prefix: str) -> list[str]:
    """The keys of the DenseNet under ``prefix``: those that start with it, less those of another
    DenseNet nested inside it (an EMA copy kept as a submodule, ``ema.features...``)."""
    keys = list(keys)
    nested = [p for p in densenet_prefixes(keys) if p != prefix and p.startswith(prefix)]
    return [k for k in keys if k.startswith(prefix) and not any(k.startswith(p) for p in nested)]


def describe_keys(keys) -> str:
    """What a set of state-dict keys holds, for a message: their number, the prefix they share, one."""
    keys = sorted(keys)
    if not keys:
        return "it holds no tensors"
    parts = [k.split(".")[:-1] for k in keys]
    shared = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        shared.append(column[0])
    under = f", all under {'.'.join(shared) + '.'!r}" if shared else ""
    return f"found {len(keys)} tensor{'s' if len(keys) > 1 else ''}{under}, e.g. {keys[0]}"


def normalize_keys(state_dict: dict[str, np.ndarray], source: str,
                   prefix: str | None = None) -> dict[str, np.ndarray]:
    """The DenseNet's own entries of ``state_dict``, keyed as torchvision keys them: the wrapper
    prefix removed (see :func:`choose_prefix`; entries outside it are left out), torchvision's legacy
    ``norm.1`` key names renamed, BN step counters dropped."""
    chosen = choose_prefix(state_dict.keys(), source, prefix)
    out = {}
    for key in densenet_keys(state_dict, chosen):
        if key.endswith(_IGNORED_SUFFIX):
            continue
        name = _LEGACY_KEY.sub(r"\1\2", key[len(chosen):])
        if name in out:
            raise CheckpointError(f"{source}: key {chosen}{name} appears twice (legacy and current names)")
        out[name] = state_dict[key]
    if _BARE_STEM_KEY in out:  # model.features saved alone: put its keys where the model has them
        out = {f"features.{key}": value for key, value in out.items()}
    return out


def _num_classes(shapes: dict[str, tuple[int, ...]], source: str) -> int:
    """The classes of torchvision's head (one Linear, ``classifier.weight``/``bias``), or 0 when the
    checkpoint has no head (a backbone saved alone, or a head replaced by Identity), timm's
    ``num_classes=0``. Any other ``classifier.*`` key is a custom head, refused by name."""
    head = sorted(k for k in shapes if k.startswith(HEAD))
    if not head:
        return 0
    custom = sorted((k for k in head if k not in ("classifier.weight", "classifier.bias")),
                    key=lambda k: (not k.endswith(".weight"), k))  # name a layer's weight first
    if custom or "classifier.weight" not in shapes:
        key = (custom or head)[0]
        raise CheckpointError(f"{source}: custom head {key} ({len(head)} classifier keys; torchvision's "
                              "is one Linear, classifier.weight and classifier.bias): convert the "
                              "backbone alone (set model.classifier = torch.nn.Identity() and save its "
                              "state_dict)")
    return shapes["classifier.weight"][0]


def infer_config(shapes: dict[str, tuple[int, ...]], source: str, **overrides) -> DenseNetConfig:
    """The DenseNetConfig a torchvision- or timm-style state dict describes, read off its shapes.

    The stem: a 7x7 conv0 is torchvision's; a 3x3 conv0 followed by conv1 and conv2 is one of
    timm's deep stems (told apart by their channels); a lone 3x3 conv0 without norm0 is the CIFAR
    stem. ``in_chans`` is conv0's input channels. BlurPool has no weights, so no key shows it: the
    anti-aliasing (``aa_layer``, ``aa_stem_only``) is that of the one registered model whose
    architecture the keys match (densenetblur121d's keys give its blur pooling), else none;
    ``overrides`` replace any field. Raises CheckpointError naming ``source`` and the key at fault.
    """
    def shape(key):
        if key not in shapes:
            raise CheckpointError(f"{source}: not a DenseNet checkpoint (no key {key})")
        return shapes[key]

    def check(condition, message):
        if not condition:
            raise CheckpointError(f"{source}: {message}")

    conv0 = shape("features.conv0.weight")
    check(len(conv0) == 4 and conv0[1] >= 1 and conv0[2] == conv0[3] and conv0[2] in (3, 7),
          f"features.conv0.weight has shape {conv0}, expected (C, in_chans, 7, 7) or (C, in_chans, 3, 3)")
    blocks = []
    while any(k.startswith(f"features.denseblock{len(blocks) + 1}.") for k in shapes):
        i = len(blocks) + 1
        blocks.append(len({m.group(1) for k in shapes
                           if (m := re.match(rf"features\.denseblock{i}\.denselayer(\d+)\.", k))}))
    check(blocks, "not a DenseNet checkpoint (no features.denseblock1)")
    first = "features.denseblock1.denselayer1"
    conv1 = shape(f"{first}.conv1.weight")
    bottleneck = f"{first}.conv2.weight" in shapes
    growth_rate = shape(f"{first}.conv2.weight")[0] if bottleneck else conv1[0]
    bn_size = None
    if bottleneck:
        check(conv1[0] % growth_rate == 0,
              f"{first}.conv1.weight has {conv1[0]} outputs, not a multiple of the growth rate {growth_rate}")
        bn_size = conv1[0] // growth_rate
    stem, num_init_features = _stem(shapes, conv0, growth_rate, check)
    compression = _compression(shapes, len(blocks), check)
    num_classes = _num_classes(shapes, source)
    try:
        config = DenseNetConfig(growth_rate, tuple(blocks), num_init_features, bn_size, compression,
                                stem, num_classes=num_classes, in_chans=conv0[1])
        return _with_registered_aa(config).replace(**overrides)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _stem(shapes, conv0: tuple[int, ...], growth_rate: int, check) -> tuple[str, int]:
    """The stem type and its output channels (num_init_features), from conv0..conv2's shapes."""
    if conv0[2] == 7:
        return "imagenet", conv0[0]
    if "features.conv1.weight" not in shapes:
        check("features.norm0.weight" not in shapes,
              "a 3x3 features.conv0 with features.norm0 but no features.conv1: neither the CIFAR "
              "stem nor a deep stem")
        return "cifar", conv0[0]
    conv1, conv2 = shapes["features.conv1.weight"], shapes.get("features.conv2.weight")
    check(conv2 is not None, "features.conv1.weight without features.conv2.weight: not a deep stem")
    c1, c2, c0 = conv0[0], conv1[0], conv2[0]
    for stem in ("deep", "deep_tiered", "deep_tiered_narrow"):
        if stem == "deep" or growth_rate >= 4:  # the tiered stems need k // 4 >= 1
            if DenseNetConfig(growth_rate, num_init_features=c0, stem=stem).stem_channels() == [c1, c2, c0]:
                return stem, c0
    check(False, f"a deep stem with channels {[c1, c2, c0]} (features.conv0/1/2) that none of timm's "
                 f"stem types gives for growth rate {growth_rate}")


def _with_registered_aa(config: DenseNetConfig) -> DenseNetConfig:
    """``config`` with the anti-aliasing of the one registered model of its architecture, if any."""
    matches = [candidate for name in list_models()
               if weights_architecture(candidate := get_config(name)) == weights_architecture(config)]
    if len(matches) != 1:
        return config
    return config.replace(aa_layer=matches[0].aa_layer, aa_stem_only=matches[0].aa_stem_only)


def _compression(shapes, num_blocks: int, check) -> float:
    """The one compression theta that gives every transition's channels: floor(in * theta) == out
    for each, so theta is at least the largest out/in; 0.5 when there is no transition."""
    pairs = [shapes[f"features.transition{i}.conv.weight"][:2] for i in range(1, num_blocks)
             if f"features.transition{i}.conv.weight" in shapes]
    if not pairs:
        return 0.5
    compression = max(out / in_ for out, in_ in pairs)
    check(compression <= 1 and all(kept_channels(in_, compression) == out for out, in_ in pairs),
          f"the transitions keep channel fractions no single compression gives ({pairs})")
    return compression


def from_torchvision(state_dict: dict[str, np.ndarray], source: str, prefix: str | None = None,
                     **overrides) -> tuple[dict[str, np.ndarray], DenseNetConfig]:
    """Our arrays and config from a torchvision-style DenseNet state dict (numpy values), under any
    wrapper prefix (``prefix`` picks one when there are several, see :func:`choose_prefix`). A state
    dict without ``classifier.*`` gives a headless config (``num_classes=0``)."""
    state_dict = normalize_keys(state_dict, source, prefix)
    config = infer_config({k: tuple(v.shape) for k, v in state_dict.items()}, source, **overrides)
    table = weight_table(config)
    expected = {e.torch_key for e in table}
    extra = sorted(state_dict.keys() - expected)
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]} for the inferred "
                              f"{architecture_name(config)} ({len(extra)} in all)")
    arrays = {}
    for entry in table:
        if entry.torch_key not in state_dict:
            raise CheckpointError(f"{source}: missing key {entry.torch_key}")
        value = state_dict[entry.torch_key]
        expected = entry.to_torch(np.empty(entry.shape, np.uint8)).shape
        if tuple(value.shape) != expected:
            raise CheckpointError(f"{source}: {entry.torch_key} has shape {tuple(value.shape)}, "
                                  f"expected {expected}")
        arrays[entry.flax_key] = np.ascontiguousarray(entry.to_flax(value))
    return arrays, config


def to_torchvision(arrays: dict[str, np.ndarray], config: DenseNetConfig,
                   source: str = "arrays") -> dict[str, np.ndarray]:
    """torchvision's state dict (numpy values, torch layouts) from our arrays, which must be
    exactly the weights ``config`` describes (``source`` names them in errors)."""
    table = weight_table(config)
    check_arrays(arrays, {e.flax_key: e.shape for e in table}, source)
    return {e.torch_key: np.ascontiguousarray(e.to_torch(np.asarray(arrays[e.flax_key]))) for e in table}


def adapt_input_conv(in_chans: int, conv_weight):
    """A first convolution's kernel (O, 3, kH, kW) adapted to ``in_chans`` input channels, as
    timm's ``timm.models._manipulate.adapt_input_conv`` does: one channel sums the RGB kernels
    (a grey image seen as R = G = B); C channels repeat RGB's kernels in turn and scale them by 3/C
    (so that the response to a uniform image keeps its size). Computed in float32, returned in the
    kernel's dtype. ValueError for a kernel that does not take 3 channels.
    """
    weight = np.asarray(conv_weight)
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"adapt_input_conv: kernel of shape {weight.shape}, expected (O, 3, kH, kW)")
    if in_chans == 3:
        return weight
    w = weight.astype(np.float32)
    if in_chans == 1:
        w = w.sum(axis=1, keepdims=True)
    else:
        w = np.tile(w, (1, math.ceil(in_chans / 3), 1, 1))[:, :in_chans] * np.float32(3 / in_chans)
    return w.astype(weight.dtype)

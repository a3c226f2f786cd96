"""torchxrayvision's DenseNets: what its weight files leave out, recorded in ours.

torchxrayvision (``xrv.models.DenseNet``) is torchvision's DenseNet with one input channel and 18
outputs; its state dict uses torchvision's keys, so the converter reads it as it is. Its pathology
names and operating points (``op_threshs``) live in its code, in ``xrv.models.model_urls``, not in
the files; a model loaded by name also holds the thresholds as a buffer, ``op_threshs``, which its
state dict keeps beside the network. torchxrayvision is imported only to read that table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from densenet_jax.errors import CheckpointError
from densenet_jax.model.pretrained_cfg import PretrainedCfg, xrv_cfg

THRESHOLDS_KEY = "op_threshs"  # the buffer torchxrayvision's DenseNet registers


@dataclasses.dataclass(frozen=True)
class XrvWeights:
    """One of torchxrayvision's published DenseNet weights, as its table describes it: ``labels``
    (one per output; "" for an output those weights were not trained on), ``op_threshs`` (NaN
    where an output has none) and the input ``resolution`` in pixels."""
    name: str
    labels: tuple[str, ...]
    op_threshs: tuple[float, ...]
    resolution: int


def xrv_weights(name: str) -> XrvWeights:
    """``name``'s entry in torchxrayvision's own table (``densenet121-res224-all``, ...).

    Raises CheckpointError when torchxrayvision is not installed, ValueError naming the known
    DenseNet weights for an unknown ``name``."""
    # Imported here: only converting xrv's weights by name needs it (the [test] extra has it).
    try:
        from torchxrayvision.models import model_urls
    except ImportError:
        raise CheckpointError(f"--xrv-weights {name}: its names and thresholds are read from torchxrayvision's "
                              "table, which needs torchxrayvision (pip install torchxrayvision)") from None
    known = sorted(k for k in model_urls if k.startswith("densenet"))
    if name not in known:
        raise ValueError(f"--xrv-weights {name!r}: not one of torchxrayvision's DenseNet weights "
                         f"({', '.join(known)})")
    entry = model_urls[name]
    return XrvWeights(name, tuple(entry["labels"]), tuple(float(t) for t in entry["op_threshs"]),
                      int(entry.get("input_resolution", 224)))


def xrv_record(num_classes: int, source: str, published: XrvWeights | None = None,
               file_threshs: np.ndarray | None = None) -> tuple[PretrainedCfg, list[str] | None]:
    """The preprocessing and class names to record with an xrv DenseNet of ``num_classes`` outputs
    converted from ``source``: xrv's input pipeline; the thresholds of the ``published`` weights
    (:func:`xrv_weights`) or those the file holds (``file_threshs``, its ``op_threshs`` buffer);
    the published weights' names. CheckpointError when the counts disagree with the network's, or
    when the file's thresholds are not the published weights' (another model's file)."""
    name = published.name if published else None
    threshs = published.op_threshs if published else None
    if file_threshs is not None:
        found = tuple(float(t) for t in np.ravel(file_threshs))
        if threshs is not None and not _same(found, threshs):
            raise CheckpointError(f"{source}: its op_threshs are not those of {name} in torchxrayvision's table "
                                  "(weights of another model?)")
        threshs = found
    for what, values in (("op_threshs", threshs), ("labels", published.labels if published else None)):
        if values is not None and len(values) != num_classes:
            raise CheckpointError(f"{source}: {len(values)} {what} for a network of {num_classes} outputs")
    size = published.resolution if published else 224
    cfg = xrv_cfg(size, num_classes, threshs, tag=name)
    return cfg, list(published.labels) if published else None


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or np.float32(x) == np.float32(y)
                                    for x, y in zip(a, b))

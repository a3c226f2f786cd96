"""Grad-CAM heatmaps (Selvaraju et al., ICCV 2017, arXiv 1610.02391): where in an image the
evidence for a class lies, for any DenseNet classifier (ImageNet-style single-label weights or
multi-label ones such as torchxrayvision's).

The layer is the final feature map the classifier pools: ``features.norm5`` followed by its ReLU
(``model.forward_features``). That is timm's ``features[-1]`` (its norm5 is a BatchNorm with the
ReLU inside), the layer pytorch-grad-cam's users hook on timm's DenseNets; torchvision applies
that ReLU outside its ``features`` module, so there the same map is ``F.relu(model.features(x))``.

    cam = grad_cam(model, x, "Effusion")      # (N, H/32, W/32), >= 0
    picture = overlay(model_input, cam[0])   # model_input in [0, 1], (H, W, C)
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from densenet_jax.model.densenet import DenseNet

LAYER = "features.norm5 + ReLU (model.forward_features)"


def label_index(model: DenseNet, label: int | str) -> int:
    """The output index of ``label``: an index, or a name among ``model.class_names``. ValueError
    naming the label and the known names for an unknown one or an index out of range."""
    names = model.class_names or []
    if isinstance(label, str) and not label.isdigit():
        if label not in names:
            known = ", ".join(n for n in names if n) or "none: the weights record no class names; give an index"
            raise ValueError(f"--label {label!r}: not a class of these weights (known: {known})")
        return names.index(label)
    index = int(label)
    if not 0 <= index < model.config.num_classes:
        raise ValueError(f"--label {index}: out of range for a model of {model.config.num_classes} outputs")
    return index


def grad_cam(model: DenseNet, x, label: int | str | None = None) -> jax.Array:
    """Grad-CAM of ``label`` for each image of ``x`` at the layer named in the module docstring.

    x: (N, H, W, C) float, prepared as the model wants (``inference.model_transform``).
    label: an output index, a class name (``model.class_names``), or None for each image's
    highest logit. The model is put in eval mode (running BatchNorm statistics).

    Returns float32 (N, h, w), h and w the feature map's (H/32, W/32 for the ImageNet stems):
    ``relu(sum_k alpha_k A_k)``, A_k the layer's channels and alpha_k the spatial mean of
    d logit / d A_k; values >= 0, not rescaled (logit units; pytorch-grad-cam upsamples and
    min-max scales this map, as :func:`overlay` does). ValueError for an unknown label or a
    model without a classifier.
    """
    return grad_cam_labels(model, x, label)[0]


def grad_cam_labels(model: DenseNet, x, label: int | str | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`grad_cam`'s map, and the output it explains for each image: int32 (N,), ``label``'s
    index or each image's top one."""
    if not model.config.num_classes:
        raise ValueError("Grad-CAM needs a classifier: these weights have none (num_classes 0)")
    model.eval()
    index = None if label is None else label_index(model, label)
    return _grad_cam(model, jnp.asarray(x), -1 if index is None else index)


@nnx.jit
def _grad_cam(model: DenseNet, x: jax.Array, index) -> tuple[jax.Array, jax.Array]:
    features = model.forward_features(x)
    logits = model.forward_head(features)
    labels = jnp.where(index < 0, jnp.argmax(logits, axis=-1), index).astype(jnp.int32)

    def score(a):  # the images are independent: the sum's gradient is each one's own
        return jnp.take_along_axis(model.forward_head(a), labels[:, None], axis=-1).sum()

    alpha = jnp.mean(jax.grad(score)(features), axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(alpha * features, axis=-1)), labels


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` (H, W) or (H, W, 1|3), values in [0, 1]) with ``cam`` (h, w) drawn over it: the
    map resized to H x W (bilinear), scaled to [0, 1] by its min and max, coloured with
    matplotlib's ``jet`` and blended with weight ``alpha``. An 8-bit RGB image."""
    from matplotlib import colormaps  # the [train] extra's; only heatmaps need it

    base = np.asarray(image, np.float32)
    base = base[..., None] if base.ndim == 2 else base
    base = np.repeat(base, 3, axis=-1) if base.shape[-1] == 1 else base
    height, width = base.shape[:2]
    heat = np.asarray(Image.fromarray(np.asarray(cam, np.float32), "F").resize((width, height), Image.BILINEAR))
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colour = colormaps["jet"](heat)[..., :3]
    blended = (1 - alpha) * np.clip(base, 0, 1) + alpha * colour
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG file contents."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

"""``densenet-jax explain``: a Grad-CAM heatmap of one image, as a PNG overlay or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from densenet_jax.data import transforms as T
from densenet_jax.data.images import read_image
from densenet_jax.explain import LAYER, grad_cam_labels, label_index, overlay, png_bytes
from densenet_jax.factory import load
from densenet_jax.files import atomic_write_bytes, check_output
from densenet_jax.inference import class_names, model_cfg

HELP = "a Grad-CAM heatmap of an image for one class, over the image the model sees"


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax explain``'s arguments and options, added to ``p``."""
    p.add_argument("image", help="an image file")
    p.add_argument("--weights", required=True, help="densenet_jax weights (.safetensors)")
    p.add_argument("--label", default=None,
                   help="the class to explain: a name the weights record, or an index (default: the top one)")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="write the image the model sees with the heatmap over it")
    p.add_argument("--json", action="store_true", help="print the raw map (feature-map resolution) as JSON")
    p.add_argument("--preprocess", default="weights", choices=["weights", "torchvision", "xrv"],
                   help="as predict's: the weights' own preprocessing, torchvision's, or torchxrayvision's")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> None:
    """Write the overlay (``--out``) and/or print the map (``--json``) for ``--label``."""
    if args.out is None and not args.json:
        raise ValueError("give --out FILE.png (the overlay), --json (the raw map), or both")
    if args.out is not None:
        check_output(args.out, force=args.force)
    model = load(args.weights)
    if not model.config.num_classes:
        raise ValueError(f"{args.weights}: no classifier (num_classes 0): no class to explain")
    index = None if args.label is None else label_index(model, args.label)
    cfg = model_cfg(model, args.preprocess)
    x = T.eval_transform_from_cfg(**cfg.eval_config())({"image": read_image(args.image)})["image"][None]
    cam, labels = grad_cam_labels(model, x, index)
    cam, index = np.asarray(cam)[0], int(labels[0])
    name = class_names(model.config.num_classes, model.class_names)[index]
    if args.out is not None:
        seen = x[0] * np.asarray(cfg.std, np.float32) + np.asarray(cfg.mean, np.float32)  # back to [0, 1]
        atomic_write_bytes(Path(args.out), png_bytes(overlay(seen, cam)))
    if args.json:
        print(json.dumps({"file": args.image, "label": name, "class": index, "layer": LAYER,
                          "input_size": list(x.shape[1:3]), "cam": cam.tolist()}))
    else:
        print(f"{args.out}: Grad-CAM of {name!r} (output {index}) over {args.image}")

"""``densenet-jax predict``: the top classes of image files, as text or JSON."""

from __future__ import annotations

import argparse
import json

from densenet_jax.errors import CheckpointError, DataError
from densenet_jax.factory import create_model, load
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.registry import HF_HUB_PREFIX, LOCAL_DIR_PREFIX
from densenet_jax.inference import model_transform, predict
from densenet_jax.train.config import check_at_least
from densenet_jax.weights.format import stored_class_names

HELP = "top-5 classes (or the labels of multi-label weights) of image files, prepared as the weights want"


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax predict``'s arguments and options, added to ``p``."""
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--weights", default=None,
                   help="a densenet_jax .safetensors (e.g. converted torchvision); with --model, a "
                        "local copy of that tag's weights (timm's model.safetensors)")
    _pretrained_options(p)
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="class names, one per line (default: those the weights were trained with, "
                        "ImageNet's for 1000 classes, else numbers)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="multi-label weights: the labels shown are those of at least this probability")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--resize", type=int, default=256,
                   help="torchvision preprocessing (or weights that carry none): shorter side before the crop")
    p.add_argument("--crop", type=int, default=224, help="torchvision preprocessing: centre crop size")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _pretrained_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="TAG",
                   help="a pretrained tag (densenet121.tv_in1k), downloaded from the Hugging Face Hub "
                        "on first use, hf-hub:<repo>, or local-dir:<folder> (export --format timm's)")
    p.add_argument("--preprocess", default="weights", choices=["weights", "torchvision", "xrv"],
                   help="weights: the preprocessing stored with the weights (timm's for the tags); "
                        "torchvision: resize --resize bilinear, centre crop --crop; xrv: torchxrayvision's "
                        "(grey, [-1024, 1024], central square resized to 224)")
    p.add_argument("--test-size", action="store_true",
                   help="the weights' larger test size where they have one (288/0.95 for ra tags)")
    p.add_argument("--in-chans", type=int, default=None,
                   help="input channels (1: greyscale); adapts conv0 of 3-channel weights")


def run(args: argparse.Namespace) -> None:
    """Print the top ``--top`` classes of each readable image; DataError when none was readable."""
    check_at_least(("--top", args.top, 1), ("--batch-size", args.batch_size, 1), ("--resize", args.resize, 1),
                   ("--crop", args.crop, 1))
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold}: must be a probability, 0 to 1")
    if args.crop > args.resize:
        raise ValueError(f"--crop {args.crop} is larger than --resize {args.resize}: the centre crop "
                         "is taken from the resized image")
    model = _model(args)
    _check_test_size(args, model)
    labels = args.labels or (stored_class_names(args.weights) if args.weights else None)
    transform = model_transform(model, args.preprocess, args.test_size, args.resize, args.crop)
    if not model.config.num_classes:
        raise CheckpointError(f"{args.weights or args.model}: no classifier (a backbone, num_classes 0): "
                              "nothing to predict until a head is trained (densenet-jax train --init-from)")
    results = predict(model, args.images, top_k=args.top, batch_size=args.batch_size,
                      labels=labels, strict=args.strict, transform=transform,
                      progress=args.progress and not args.json)
    classified = [r for r in results if "skipped" not in r]  # skipped ones were named on stderr
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for result in classified:
            print(result["file"])
            for line in _lines(result, args.threshold):
                print(f"  {line}")
    if not classified:
        raise DataError(f"none of the {len(results)} image(s) could be classified (all unreadable)")


def _lines(result: dict, threshold: float) -> list[str]:
    """An image's classes (top-k), or its labels of at least ``threshold`` (multi-label), most
    probable first."""
    if "probabilities" not in result:
        return [f"{e['probability']:7.2%}  {e['name']} ({e['class']})" for e in result["top"]]
    above = sorted(((p, name) for name, p in result["probabilities"].items() if p >= threshold), reverse=True)
    return [f"{p:7.2%}  {name}" for p, name in above] or [f"no label at or above {threshold:.2f}"]


def _check_test_size(args: argparse.Namespace, model: DenseNet) -> None:
    """``--test-size`` only where the preprocessing comes from weights that have a test size."""
    cfg = model.pretrained_cfg
    if args.test_size and (args.preprocess != "weights" or cfg is None or cfg.test_input_size is None):
        source = f"--preprocess {args.preprocess}" if args.preprocess != "weights" else (args.model or args.weights)
        raise ValueError(f"--test-size: {source} has no larger test size (the ra tags have one)")


def _model(args: argparse.Namespace) -> DenseNet:
    """The model predict runs: ``--weights FILE``, ``--model TAG`` (or ``hf-hub:<repo>``), or a tag
    with a local copy of its weights (both)."""
    overrides = {} if args.in_chans is None else {"in_chans": args.in_chans}
    if args.model is None and args.weights is None:
        raise ValueError("give --model TAG (a pretrained tag) or --weights FILE")
    if args.model is None:
        return load(args.weights, **overrides)
    if args.model.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) and args.weights:
        raise ValueError("--weights goes with a pretrained tag, not with hf-hub:<repo> or local-dir:<folder>")
    overlay = {"file": args.weights} if args.weights else None
    return create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **overrides)

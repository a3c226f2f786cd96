"""``densenet-jax evaluate``: the held-out loss and accuracy of a weights file, in one line."""

from __future__ import annotations

import argparse

from densenet_jax.cli.options import dataset_options
from densenet_jax.train.config import PRECISIONS
from densenet_jax.train.evaluate import evaluate_weights

HELP = "held-out loss and accuracy of a weights file"


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax evaluate``'s arguments and options, added to ``p``."""
    p.add_argument("--weights", required=True, help="a densenet_jax .safetensors")
    dataset_options(p, folder="a folder with val/ (train/ is not read)",
                    image_size_help="folder: the centre crop instead of the one the weights record "
                                    "(their resize ratio, interpolation and mean/std kept; without a "
                                    "record, torchvision's: resize to 8/7 of it, bilinear; default 224)")
    p.add_argument("--batch-size", type=int, default=128, help="images per evaluation step")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: compute in bfloat16; fp64: in float64")


def run(args: argparse.Namespace) -> None:
    """Print the held-out loss and accuracy of ``--weights``, the images counted and, for a folder,
    how they were prepared (see :func:`densenet_jax.train.evaluate.evaluate_weights`)."""
    result = evaluate_weights(args.weights, args.dataset, args.data_dir, batch_size=args.batch_size,
                              precision=args.precision, workers=args.workers, strict=args.strict,
                              image_size=args.image_size)
    skipped = result.examples - result.count
    unreadable = f", {skipped} unreadable skipped" if skipped > 0 else ""
    print(f"{args.weights} on {args.dataset} (held-out, {result.count} images{unreadable}"
          f"{result.preprocessing}): loss {result.loss:.4f}, accuracy {result.accuracy:.4f}")

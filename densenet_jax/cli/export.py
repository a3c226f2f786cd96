"""``densenet-jax export``: a weights file as ONNX, StableHLO or timm's Hub folder."""

from __future__ import annotations

import argparse

from densenet_jax.export import MIN_OPSET, PLATFORMS, export
from densenet_jax.factory import load
from densenet_jax.weights.format import stored_class_names

HELP = "a weights file as ONNX, a StableHLO artifact or timm's Hub folder"


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax export``'s arguments and options, added to ``p``."""
    p.add_argument("output", metavar="OUT", help="the file (onnx, stablehlo) or folder (timm) to write")
    p.add_argument("--weights", required=True, help="a densenet_jax .safetensors")
    p.add_argument("--format", required=True, metavar="{onnx,stablehlo,timm}",
                   help="onnx: for onnxruntime; stablehlo: jax.export, for any JAX process; timm: "
                        "config.json and model.safetensors that timm loads as pretrained weights")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height and width (onnx, stablehlo), timm's input_size (timm) for weights "
                        "that record none (default: the size the weights record, as trained or "
                        "published; 224 for weights that record none)")
    p.add_argument("--layout", default="nhwc", metavar="{nhwc,nchw}", help="onnx: the input's layout")
    p.add_argument("--opset", type=int, default=MIN_OPSET,
                   help=f"onnx: the opset (default {MIN_OPSET}, the oldest the graph needs: onnxruntime "
                        "1.14 and later read it)")
    p.add_argument("--platforms", default=",".join(PLATFORMS), type=lambda s: tuple(s.split(",")),
                   help="stablehlo: the platforms the artifact runs on, comma-separated "
                        f"(default {','.join(PLATFORMS)}: one file for all)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")


def run(args: argparse.Namespace) -> None:
    """Write ``--weights`` in ``--format`` to OUT, with the class names the weights were trained
    with, and print where."""
    path = export(load(args.weights), args.format, args.output, image_size=args.image_size,
                  layout=args.layout, class_names=stored_class_names(args.weights), force=args.force,
                  opset=args.opset, platforms=args.platforms)
    print(f"{args.weights} -> {path} ({args.format})")

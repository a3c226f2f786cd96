"""``densenet-jax convert``: a torch checkpoint to densenet_jax weights, or back (``--to torch``)."""

from __future__ import annotations

import argparse

from densenet_jax.weights import torch_files

HELP = "a torchvision or timm checkpoint (.pth, .pt, .safetensors) to densenet_jax weights, or back"


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax convert``'s arguments and options, added to ``p``."""
    p.add_argument("input", help="a torch state dict or training checkpoint, or a safetensors file "
                   "(with --to torch: densenet_jax weights)")
    p.add_argument("output", help="the file to write")
    p.add_argument("--to", default="densenet_jax", choices=["densenet_jax", "torch"],
                   help="densenet_jax: .safetensors for densenet_jax.load; torch: a torchvision .pth "
                        "(needs torch)")
    p.add_argument("--prefix", default=None,
                   help="the DenseNet to take from a file that holds several, by the key prefix "
                        "named in the message (e.g. model_ema.module.)")
    p.add_argument("--preprocess", default=None, choices=["xrv"],
                   help="record the preprocessing the weights expect: xrv, torchxrayvision's (grey, "
                        "[-1024, 1024], central square resized to 224)")
    p.add_argument("--xrv-weights", default=None, metavar="NAME",
                   help="torchxrayvision's weights the file holds (densenet121-res224-all, ...): records "
                        "their pathology names and op_threshs from torchxrayvision's table, and --preprocess xrv")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")


def run(args: argparse.Namespace) -> None:
    """Convert ``input`` to ``output`` and print what was written."""
    if args.to == "torch":
        for flag, value in (("--prefix", args.prefix), ("--preprocess", args.preprocess),
                            ("--xrv-weights", args.xrv_weights)):
            if value is not None:
                raise ValueError(f"{flag} goes with a torch checkpoint to convert, not with --to torch")
        print(torch_files.to_torch(args.input, args.output, force=args.force))
    else:
        print(torch_files.to_densenet_jax(args.input, args.output, prefix=args.prefix, force=args.force,
                                          preprocess=args.preprocess, xrv_weights=args.xrv_weights))

"""Convert a torchvision (or timm) DenseNet checkpoint to densenet_jax safetensors.

    python convert/torch_to_flax.py densenet121-a639ec97.pth densenet121.safetensors

The architecture (growth rate, blocks, stem, bottleneck, compression, classes) is read off the
checkpoint's shapes; every tensor is checked against the model it implies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch_io import read_state_dict, run_cli

from densenet_jax.configs import count_params
from densenet_jax.errors import CheckpointError
from densenet_jax.interop import from_torchvision, registered_name
from densenet_jax.weights import write_safetensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a .pth/.pt state dict (or a dict holding one) or .safetensors")
    parser.add_argument("output", type=Path, help="the densenet_jax .safetensors to write")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        raise CheckpointError(f"{args.output}: already exists (pass --force to overwrite)")
    arrays, config = from_torchvision(read_state_dict(args.input), str(args.input))
    write_safetensors(arrays, config, args.output)
    name = registered_name(config) or f"DenseNet {config}"
    print(f"{args.input} -> {args.output}: {name}, {config.num_classes} classes, "
          f"{count_params(config):,} parameters")


if __name__ == "__main__":
    run_cli("torch_to_flax", main)

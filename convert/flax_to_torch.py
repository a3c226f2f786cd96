"""Convert densenet_jax safetensors back to a torchvision state dict (.pth).

    python convert/flax_to_torch.py densenet121.safetensors densenet121.pth

The result loads with ``torchvision.models.densenet121().load_state_dict(sd, strict=True)`` for the
four torchvision models; every weight is copied bit for bit.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
from torch_io import run_cli

from densenet_jax.errors import CheckpointError
from densenet_jax.interop import to_torchvision
from densenet_jax.weights import atomic_write_bytes, read_safetensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a densenet_jax .safetensors")
    parser.add_argument("output", type=Path, help="the .pth state dict to write")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = parser.parse_args()
    if args.output.exists() and not args.force:
        raise CheckpointError(f"{args.output}: already exists (pass --force to overwrite)")
    if not args.output.parent.is_dir():
        raise CheckpointError(f"{args.output}: folder {args.output.parent} does not exist")
    arrays, config = read_safetensors(args.input)
    state_dict = {}
    for key, value in to_torchvision(arrays, config, str(args.input)).items():
        state_dict[key] = torch.from_numpy(value)
        if key.endswith(".running_var"):  # torch's BN has a step counter; ours has none
            state_dict[key[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    atomic_write_bytes(args.output, buffer.getvalue())
    print(f"{args.input} -> {args.output}: {len(state_dict)} tensors")


if __name__ == "__main__":
    run_cli("flax_to_torch", main)

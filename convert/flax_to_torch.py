"""Convert densenet_jax safetensors back to a torchvision state dict (.pth), from a checkout:

    python convert/flax_to_torch.py densenet121.safetensors densenet121.pth

The same as ``densenet-jax convert --to torch IN OUT`` (needs torch). The result loads with
``torchvision.models.densenet121().load_state_dict(sd, strict=True)``; every weight is copied bit for bit.
"""

import sys

from densenet_jax.cli import main

if __name__ == "__main__":
    main(["convert", "--to", "torch", *sys.argv[1:]])

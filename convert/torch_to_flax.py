"""Convert a torchvision (or timm) DenseNet checkpoint to densenet_jax safetensors, from a checkout:

    python convert/torch_to_flax.py densenet121-a639ec97.pth densenet121.safetensors

The same as ``densenet-jax convert IN OUT`` (densenet_jax.weights.torch_files does the work), kept for the
scripts and habits that run it.
"""

import sys

from densenet_jax.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])

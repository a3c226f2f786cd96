"""Convert a torchvision DenseNet-121 to Flax and show that both give the same logits.

No weights can be downloaded here, so the torchvision model is randomly initialised (with random
BatchNorm statistics, which fresh models lack); the conversion is the same for trained weights.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from flax import nnx

import densenet_jax as dj

ROOT = Path(__file__).resolve().parent.parent


def main():
    torch.manual_seed(0)
    reference = torchvision.models.densenet121(weights=None).eval()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    with tempfile.TemporaryDirectory() as tmp:
        pth, converted = Path(tmp) / "densenet121.pth", Path(tmp) / "densenet121.safetensors"
        torch.save(reference.state_dict(), pth)
        subprocess.run([sys.executable, str(ROOT / "convert" / "torch_to_flax.py"), str(pth),
                        str(converted)], check=True)
        model = dj.load(converted)
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))  # one program; model(x) alone runs op by op
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"densenet121 logits, Flax vs torchvision: max relative difference {error:.2e}")
    sys.exit(0 if error <= 1e-5 else 1)


if __name__ == "__main__":
    main()

"""Backbone features for a downstream task: a linear classifier on pooled DenseNet features.

    python examples/features.py densenet121.safetensors ~/data/flowers

Each image of train/ and val/ goes through the backbone once (torchvision's eval preprocessing);
the last stage's feature map (after norm5 and ReLU, as timm's features_only), averaged over
space, feeds a logistic regression. Use ``out_indices`` for earlier, finer maps (e.g. a detection
or segmentation head): stage 0 is the stem, stage i dense block i.
"""

import argparse

import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.linear_model import LogisticRegression

import densenet_jax as dj
from densenet_jax.data import load_dataset


def embed(backbone, source, preprocess, batch_size=32):
    """Pooled last-stage features and labels of every example in ``source``."""
    forward = nnx.jit(lambda m, x: jnp.mean(m(x)[-1], axis=(1, 2)))
    features, labels = [], []
    for start in range(0, len(source), batch_size):
        examples = [preprocess(source[i]) for i in range(start, min(start + batch_size, len(source)))]
        examples = [e for e in examples if not e.get("skipped")]  # a stand-in repeats another image
        if examples:
            features.append(np.asarray(forward(backbone, np.stack([e["image"] for e in examples]))))
            labels += [int(e["label"]) for e in examples]
    return np.concatenate(features), np.array(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="a densenet_jax .safetensors")
    parser.add_argument("data_dir", help="a folder with train/ and val/")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()

    backbone = dj.load(args.weights, features_only=True)
    backbone.eval()
    print("stages:", [(s.module, s.num_chs, s.reduction) for s in backbone.feature_info])
    data = load_dataset("folder", args.data_dir, image_size=args.image_size)
    x_train, y_train = embed(backbone, data.train, data.preprocess)
    x_val, y_val = embed(backbone, data.eval, data.preprocess)
    probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    print(f"features {x_train.shape[1]}-d; linear probe held-out accuracy {probe.score(x_val, y_val):.3f}")


if __name__ == "__main__":
    main()

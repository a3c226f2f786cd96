"""Input pipelines: the bundled digits, CIFAR-10/100 folders, and ImageNet-style image folders."""

from densenet_jax.data.dataset import Dataset
from densenet_jax.data.datasets import load_dataset
from densenet_jax.data.pipeline import eval_batches, train_batches

__all__ = ["Dataset", "load_dataset", "eval_batches", "train_batches"]

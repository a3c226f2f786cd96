"""DenseNet in JAX and Flax NNX, number for number with torchvision and timm."""

from densenet_jax.errors import CheckpointError, DataError, DivergedError, Interrupted
from densenet_jax.model.config import DenseNetConfig, count_params
from densenet_jax.model.registry import get_config, list_models
from densenet_jax.model.densenet import (DenseBlock, DenseLayer, DenseNet, DenseNet121, DenseNet161,
                                 DenseNet169, DenseNet201, Transition)
from densenet_jax.model.features import DenseNetFeatures, FeatureInfo, feature_info
from densenet_jax.factory import create_model, load
from densenet_jax.weights.format import save

__all__ = [
    "CheckpointError", "DataError", "DivergedError", "Interrupted", "load", "save",
    "DenseNetConfig", "count_params", "get_config", "list_models",
    "DenseBlock", "DenseLayer", "DenseNet", "DenseNet121", "DenseNet161", "DenseNet169",
    "DenseNet201", "Transition", "create_model",
    "DenseNetFeatures", "FeatureInfo", "feature_info", "predict",
]


def __getattr__(name: str):
    # predict reads images with Pillow through the data pipeline (the [train] extra), which a plain
    # ``import densenet_jax`` must not need.
    if name == "predict":
        from densenet_jax.inference import predict
        return predict
    raise AttributeError(f"module 'densenet_jax' has no attribute {name!r}")

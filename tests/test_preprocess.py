"""Preprocessing follows the weights: timm's eval transform for each distinct pretrained cfg, on
real photographs, and the cfg a training run stores describes the preprocessing it evaluated with."""

from pathlib import Path

import numpy as np
import pytest
import sklearn
from PIL import Image
from timm.data import create_transform, resolve_data_config

from densenet_jax.data import transforms as T
from densenet_jax.data.datasets import digits
from densenet_jax.data.folder import image_folder
from densenet_jax.data.images import read_image
from densenet_jax.model.pretrained_cfg import PretrainedCfg, resize_size
from densenet_jax.model.registry import TAGS
from fixtures import write_image_folder

PHOTOS = [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")]
# Each distinct eval configuration: the tv tags and ra tags at 224 (bicubic, crop_pct 0.875), the
# ra tags' test size (288, 0.95), a fine-tune's at 100 px (bilinear, resize 114 = 100 * 8 // 7), and
# one-channel weights (in_chans=1).
CONFIGS = {
    "tag_224": (TAGS["densenet121.tv_in1k"], False),
    "ra_test_288": (TAGS["densenet121.ra_in1k"], True),
    "fine_tune_100": (PretrainedCfg(input_size=(3, 100, 100), interpolation="bilinear", crop_pct=100 / 114), False),
    "grey_224": (TAGS["densenet121.tv_in1k"].with_in_chans(1), False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_eval_transform_equals_timm_on_real_photos(name):
    cfg, use_test_size = CONFIGS[name]
    ours = T.eval_transform_from_cfg(**cfg.eval_config(use_test_size))
    timm_cfg = {k: v for k, v in cfg.__dict__.items() if k != "top1"}
    reference = create_transform(**resolve_data_config(pretrained_cfg=timm_cfg, use_test_size=use_test_size,
                                                       args={"in_chans": cfg.in_chans}))
    mode = "L" if cfg.in_chans == 1 else "RGB"
    for photo in PHOTOS:
        x = ours({"image": read_image(photo)})["image"]
        expected = reference(Image.open(photo).convert(mode)).numpy().transpose(1, 2, 0)
        size = cfg.eval_config(use_test_size)["input_size"]
        assert x.shape == expected.shape == (size[1], size[2], cfg.in_chans) and x.dtype == np.float32
        assert np.abs(x - expected).max() <= 1e-6


# (size, crop_pct) where timm's floor and rounding part (224 / 0.9 = 248.9, 32 / 0.9 = 35.6,
# 299 / 0.95 = 314.7), where they agree (0.875, the ra tags' 288 / 0.95), and a fine-tune's 8/7.
RESIZES = [(224, 0.9), (32, 0.9), (299, 0.95), (224, 0.875), (288, 0.95), (100, 100 / 114)]


@pytest.mark.parametrize("size, crop_pct", RESIZES)
def test_resize_size_is_timms(size, crop_pct):
    reference = create_transform(input_size=(3, size, size), crop_pct=crop_pct, interpolation="bilinear")
    assert resize_size(size, crop_pct) == reference.transforms[0].size


def test_train_runs_store_the_preprocessing_they_evaluate_with(tmp_path):
    """A run's stored cfg rebuilds its data set's own eval preprocessing exactly: the digits' 8x8 and
    channel statistics (not ImageNet's 256/224, which gave 10% on digits), a folder's 8/7 resize."""
    data = digits()
    cfg = T.preprocessing_cfg(data)
    assert cfg.input_size == (3, 8, 8) and cfg.crop_pct == 1.0
    example = data.eval[0]
    rebuilt = T.eval_transform_from_cfg(**cfg.eval_config())({"image": Image.fromarray(example["image"])})
    np.testing.assert_array_equal(rebuilt["image"], data.preprocess(example)["image"])

    folder = image_folder(write_image_folder(tmp_path / "images"), image_size=48)
    cfg = T.preprocessing_cfg(folder)
    assert cfg.input_size == (3, 48, 48) and cfg.interpolation == "bilinear"
    for example in folder.eval:
        rebuilt = T.eval_transform_from_cfg(**cfg.eval_config())(example)
        np.testing.assert_array_equal(rebuilt["image"], folder.preprocess(example)["image"])

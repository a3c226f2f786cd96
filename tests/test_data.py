"""The input pipelines: formats, splits, preprocessing, determinism and host sharding."""

import logging
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision.transforms as TT
from PIL import Image

from densenet_jax import DataError
from densenet_jax.data import eval_batches, load_dataset, train_batches
from densenet_jax.data import transforms as T
from densenet_jax.data.pipeline import _Padded
from densenet_jax.model.pretrained_cfg import IMAGENET_MEAN, IMAGENET_STD
from fixtures import write_cifar10, write_cifar100, write_image_folder


def test_digits_split_is_fixed():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a.train) == 1437 and len(a.eval) == 360 and a.num_classes == 10
    np.testing.assert_array_equal(a.eval.images, b.eval.images)
    train_pixels = {x.tobytes() for x in a.train.images}
    assert sum(x.tobytes() in train_pixels for x in a.eval.images) < 10  # (digits has a few duplicates)


def test_training_order_is_deterministic_resumable_and_shardable():
    data = load_dataset("digits")

    def run(**kw):
        return list(train_batches(data.train, data.augment, seed=1, epoch=2, global_batch=64, **kw))

    full = run()
    assert len(full) == 1437 // 64 and full[0]["image"].shape == (64, 8, 8, 3)
    np.testing.assert_array_equal(run()[5]["image"], full[5]["image"])
    np.testing.assert_array_equal(run(start_step=5)[0]["image"], full[5]["image"])
    other = list(train_batches(data.train, data.augment, seed=1, epoch=3, global_batch=64))
    assert not np.array_equal(other[0]["label"], full[0]["label"])  # a new order each epoch
    hosts = [run(process_index=i, process_count=2) for i in range(2)]
    for step in (0, 7):
        merged = np.concatenate([h[step]["image"] for h in hosts])
        key = lambda images: sorted(x.tobytes() for x in images)
        assert key(merged) == key(full[step]["image"])  # the same examples, augmented the same


def test_eval_batches_pad_with_zero_weight():
    data = load_dataset("digits")
    batches = list(eval_batches(data.eval, data.preprocess, global_batch=128))
    assert [len(b["label"]) for b in batches] == [128, 128, 128]
    assert sum(b["weight"].sum() for b in batches) == 360
    assert batches[-1]["weight"][104:].sum() == 0
    padded = _Padded(data.eval, 128)  # iterating ends after the padding (the wrap-around once did not)
    assert [float(ex["weight"]) for ex in padded] == [1.0] * 360 + [0.0] * 24


def test_cifar10_and_100_folders(tmp_path):
    c10 = load_dataset("cifar10", write_cifar10(tmp_path / "cifar-10-batches-py"))
    assert len(c10.train) == 100 and len(c10.eval) == 20 and c10.class_names[3] == "class3"
    batch = next(train_batches(c10.train, c10.augment, seed=0, epoch=0, global_batch=10))
    assert batch["image"].shape == (10, 32, 32, 3) and batch["image"].dtype == np.float32
    c100 = load_dataset("cifar100", write_cifar100(tmp_path / "cifar-100-python"))
    assert c100.num_classes == 100 and len(c100.train) == 40


def test_cifar_reader_never_runs_pickled_code(tmp_path):
    root = write_cifar10(tmp_path / "c")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (marker.touch, ())

    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR"):
        load_dataset("cifar10", root)
    assert not marker.exists()


def test_cifar_augmentation_is_pad_crop_flip():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    rng = np.random.default_rng(0)
    crops = [T.PadCrop(4)({"image": image}, rng)["image"] for _ in range(50)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert any((c[:4] == 0).all() for c in crops)  # zero padding shows at some offsets
    flipped = [T.RandomFlip()({"image": image}, rng)["image"] for _ in range(50)]
    assert any(np.array_equal(f, image[:, ::-1]) for f in flipped)
    assert any(np.array_equal(f, image) for f in flipped)


def test_normalize_gives_torchvisions_numbers_exactly():
    """ToTensor + Normalize's float32 operations in the same order: the same bits, for RGB and
    one-channel images, PIL or arrays, and the negative-stride arrays a flip gives."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    for image, mean, std in [(rgb, IMAGENET_MEAN, IMAGENET_STD), (rgb[:, ::-1], (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)),
                             (Image.fromarray(rgb), IMAGENET_MEAN, IMAGENET_STD), (Image.fromarray(grey), (0.449,), (0.226,)),
                             (grey, (0.5,), (0.25,))]:
        ours = T.Normalize(mean, std)({"image": image})["image"]
        theirs = TT.Normalize(mean, std)(TT.ToTensor()(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image))
        assert ours.dtype == np.float32 and ours.shape == theirs.shape[1:] + theirs.shape[:1]
        np.testing.assert_array_equal(ours, theirs.permute(1, 2, 0).numpy())


def test_folder_eval_preprocessing_equals_torchvision(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    data = load_dataset("folder", root)
    assert data.class_names == ["cat", "dog", "fox"] and len(data.train) == 12
    reference = TT.Compose([TT.Resize(256), TT.CenterCrop(224), TT.ToTensor(),
                            TT.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for i in (0, 5, 11):
        path = data.eval.paths[i]
        ours = data.preprocess(data.eval[i])["image"]
        expected = reference(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
        assert ours.shape == (224, 224, 3)
        np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_folder_training_crops(tmp_path):
    data = load_dataset("folder", write_image_folder(tmp_path / "imgs"))
    batch = next(train_batches(data.train, data.augment, seed=0, epoch=0, global_batch=4))
    assert batch["image"].shape == (4, 224, 224, 3)
    crop = T.RandomResizedCrop(224)
    image = Image.new("RGB", (300, 100))
    rng = np.random.default_rng(0)
    sizes = {crop({"image": image}, rng)["image"].size for _ in range(20)}
    assert sizes == {(224, 224)}


@pytest.mark.parametrize("setup, message", [
    (lambda root: (root / "val").rename(root / "valid"), "missing split folder"),
    (lambda root: [p.rename(p.with_suffix(".gif")) for p in (root / "train" / "dog").iterdir()],
     "holds no images (files ending in .jpg .jpeg .png"),
    (lambda root: (root / "val" / "fox").rename(root / "val" / "wolf"),
     "class folders differ from train/ (only in train/: fox; only in val/: wolf)"),
])
def test_folder_errors_are_clear(tmp_path, setup, message):
    root = write_image_folder(tmp_path / "imgs")
    setup(root)
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset("folder", root)


def test_a_single_class_folder_is_said(tmp_path, caplog):
    root = write_image_folder(tmp_path / "imgs")
    for split in ("train", "val"):
        for name in ("dog", "fox"):
            for f in (root / split / name).iterdir():
                f.unlink()
            (root / split / name).rmdir()
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        assert load_dataset("folder", root).num_classes == 1
    assert "train: one class folder (cat): a model trained on it predicts that class" in caplog.text


def test_unknown_or_missing_data():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("cifar10")

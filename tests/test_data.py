"""The input pipelines: formats, splits, preprocessing, determinism and host sharding."""

import logging
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as TT
from PIL import Image

from densenet_jax import DataError, cli
from densenet_jax.data import eval_batches, load_dataset, train_batches
from densenet_jax.data import transforms as T
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


def test_folder_eval_preprocessing_equals_torchvision(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    data = load_dataset("folder", root)
    assert data.class_names == ["cat", "dog", "fox"] and len(data.train) == 12
    reference = TT.Compose([TT.Resize(256), TT.CenterCrop(224), TT.ToTensor(),
                            TT.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
    for i in (0, 5, 11):
        path, label = data.eval.files[i]
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
    (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()], "holds no images"),
    (lambda root: (root / "val" / "fox").rename(root / "val" / "wolf"), "class folders differ"),
])
def test_folder_errors_are_clear(tmp_path, setup, message):
    root = write_image_folder(tmp_path / "imgs")
    setup(root)
    with pytest.raises(DataError, match=message):
        load_dataset("folder", root)


def test_unknown_or_missing_data():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("cifar10")


def break_images(root):
    """A truncated JPEG, a text file named .png, an empty .jpg: what a scraped folder holds."""
    first = root / "train" / "cat" / "0.jpg"
    first.write_bytes(first.read_bytes()[:200])
    (root / "train" / "dog" / "notes.png").write_text("not an image")
    (root / "val" / "fox" / "empty.jpg").write_bytes(b"")


def test_unreadable_images_are_skipped_and_named(tmp_path, caplog):
    root = write_image_folder(tmp_path / "imgs")
    break_images(root)
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        data = load_dataset("folder", root)
    assert len(data.train) == 3 * 4 - 1 and len(data.eval) == 3 * 4  # 4 per class, one broken
    text = caplog.text
    assert "skipping 2 unreadable image(s) of 13" in text and "cat/0.jpg" in text and "dog/notes.png" in text
    assert "skipping 1 unreadable image(s) of 13" in text and "fox/empty.jpg" in text
    assert all(data.train[i]["image"].size for i in range(len(data.train)))  # every kept one decodes


def test_strict_stops_at_the_first_unreadable_image(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs")
    break_images(root)
    with pytest.raises(DataError, match=r"train/cat/0.jpg: unreadable image .*\(and 1 more\)"):
        load_dataset("folder", root, strict=True)
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, before any compilation
        cli.main(["train", "--dataset", "folder", "--data-dir", str(root), "--strict",
                  "--workdir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1 and "cat/0.jpg: unreadable image" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_class_of_only_unreadable_images_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    (root / "val" / "dog" / "0.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DataError, match="val/dog: no readable images"):
        load_dataset("folder", root)


class _Unchecked:
    """torchvision's CIFAR readers on a generated folder: its MD5 checks would refuse the files."""

    def __init__(self, monkeypatch):
        import torchvision.datasets.cifar as cifar
        monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
        monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
        self.cifar = cifar


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_equals_torchvision(tmp_path, monkeypatch, name):
    """Pixels (HWC, RGB order), labels and class names as torchvision.datasets reads them."""
    tv = _Unchecked(monkeypatch).cifar
    if name == "cifar10":
        folder, reader = write_cifar10(tmp_path / "cifar-10-batches-py", seed=4), tv.CIFAR10
    else:
        folder, reader = write_cifar100(tmp_path / "cifar-100-python", seed=4), tv.CIFAR100
    ours = load_dataset(name, folder)
    for split, train in ((ours.train, True), (ours.eval, False)):
        reference = reader(str(tmp_path), train=train, download=False)
        np.testing.assert_array_equal(split.images, reference.data)
        np.testing.assert_array_equal(split.labels, reference.targets)
    assert ours.class_names == reference.classes


def test_every_image_reaches_the_pipeline_with_its_label(tmp_path):
    """Each CIFAR image is one colour that encodes its label (and its channel: R, G, B differ): after
    shuffling, pad-crop-flip, normalisation and batching, every image's centre still names its label."""
    root = write_cifar10(tmp_path / "c10")
    for path in sorted(root.glob("*_batch*")):
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        labels = np.asarray(batch[b"labels"], np.uint8)
        planes = [np.repeat((20 * labels + c)[:, None], 1024, axis=1) for c in range(3)]  # CHW rows
        batch[b"data"] = np.concatenate(planes, axis=1).astype(np.uint8)
        with open(path, "wb") as f:
            pickle.dump(batch, f)
    data = load_dataset("cifar10", root)
    mean, std = data.augment.transforms[-1].mean, data.augment.transforms[-1].std
    seen = 0
    for batch in train_batches(data.train, data.augment, seed=0, epoch=1, global_batch=25):
        pixels = np.rint((batch["image"][:, 16, 16] * std + mean) * 255)
        np.testing.assert_array_equal(pixels, 20 * batch["label"][:, None] + np.arange(3))
        seen += len(batch["label"])
    assert seen == 100
    for batch in eval_batches(data.eval, data.preprocess, global_batch=8):
        pixels = np.rint((batch["image"][:, 16, 16] * std + mean) * 255)
        np.testing.assert_array_equal(pixels, 20 * batch["label"][:, None] + np.arange(3))


def test_random_crops_equal_torchvision_at_the_same_parameters(monkeypatch):
    """PadCrop is torchvision's RandomCrop(32, padding=4) and RandomResizedCrop torchvision's at the
    place and size each drew (read back from the crop: by search, and from the box it cut)."""
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    padded = TF.pad(torch.from_numpy(image).permute(2, 0, 1), 4)
    for _ in range(10):
        crop = T.PadCrop(4)({"image": image}, rng)["image"]
        matches = [(top, left) for top in range(9) for left in range(9)
                   if np.array_equal(TF.crop(padded, top, left, 32, 32).permute(1, 2, 0).numpy(), crop)]
        assert len(matches) == 1

    boxes = []
    photo = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    crop_at = Image.Image.crop

    def recording(self, box=None):
        boxes.append(box)
        return crop_at(self, box)

    monkeypatch.setattr(Image.Image, "crop", recording)
    crops = [np.asarray(T.RandomResizedCrop(48)({"image": photo}, rng)["image"]) for _ in range(5)]
    monkeypatch.setattr(Image.Image, "crop", crop_at)
    assert len(boxes) == len(crops)
    for crop, (left, top, right, bottom) in zip(crops, boxes):
        reference = TF.resized_crop(photo, top, left, bottom - top, right - left, [48, 48],
                                    TT.InterpolationMode.BILINEAR, antialias=True)
        np.testing.assert_array_equal(crop, np.asarray(reference), err_msg=str((left, top, right, bottom)))

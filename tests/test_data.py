"""The input pipelines: formats, splits, preprocessing, determinism and host sharding."""

import logging
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision.transforms as TT
from PIL import Image

from densenet_jax import DataError
from densenet_jax.data import eval_batches, load_dataset, train_batches
from densenet_jax.data import transforms as T
from densenet_jax.data.pipeline import _Padded
from densenet_jax.model.pretrained_cfg import IMAGENET_MEAN, IMAGENET_STD
from draws import Recorder, replay
from fixtures import write_cifar10, write_cifar100, write_image_folder


def test_digits_split_is_fixed():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a.train) == 1437 and len(a.eval) == 360 and a.num_classes == 10
    np.testing.assert_array_equal(a.eval.images, b.eval.images)
    train_pixels = {x.tobytes() for x in a.train.images}
    assert sum(x.tobytes() in train_pixels for x in a.eval.images) < 10  # (digits has a few duplicates)


def test_digits_are_scikit_learns_read_without_importing_it(tmp_path):
    """The bundled digits are load_digits' images scaled to 0-255 and its labels, loaded in a
    fresh process that never imports scikit-learn (its import alone takes seconds)."""
    from sklearn.datasets import load_digits

    code = ("import sys, numpy as np\nfrom densenet_jax.data import load_dataset\nd = load_dataset('digits')\n"
            "np.savez(sys.argv[1], train=d.train.images, train_labels=d.train.labels, eval=d.eval.images, "
            "eval_labels=d.eval.labels)\nprint('sklearn' in sys.modules)")
    path = tmp_path / "digits.npz"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.split() == ["False"], out
    loaded, reference = np.load(path), load_digits()
    images = np.concatenate([loaded["train"], loaded["eval"]])
    labels = np.concatenate([loaded["train_labels"], loaded["eval_labels"]])
    order = np.random.default_rng(0).permutation(len(reference.images))
    held_out, train = order[:360], order[360:]
    expected = np.round(reference.images[np.concatenate([train, held_out])] * (255 / 16))
    np.testing.assert_array_equal(images, np.repeat(expected[..., None], 3, axis=-1))
    np.testing.assert_array_equal(labels, reference.target[np.concatenate([train, held_out])])


def test_digits_without_a_usable_scikit_learn_are_one_line(tmp_path, monkeypatch):
    """No scikit-learn (absent, or refused by an import hook), its digits file missing, not gzip,
    or not 65 values a row: a DataError naming the fix or the file, never a traceback."""
    import gzip
    import importlib.machinery
    import importlib.util

    package = tmp_path / "sklearn"
    data = package / "datasets" / "data" / "digits.csv.gz"
    data.parent.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    real = importlib.util.find_spec

    def finding(found):
        def find_spec(name, *args):
            if name != "sklearn":
                return real(name, *args)
            if isinstance(found, Exception):
                raise found
            return found
        return find_spec

    fake = importlib.machinery.ModuleSpec("sklearn", None, origin=str(package / "__init__.py"))
    not_installed = "--dataset digits: scikit-learn, which ships the digits, is not installed (the [train] " \
                    "extra: pip install scikit-learn)"
    cases = [(None, None, not_installed), (ModuleNotFoundError("blocked"), None, not_installed),
             (fake, None, f"{data}: not found;"), (fake, b"garbage", f"{data}: unreadable as the digits table"),
             (fake, gzip.compress(b"1,2,3\n4,5,6\n"), f"{data}: 2 rows of 3 values; the digits have 64 pixels")]
    for found, content, message in cases:
        if content is not None:
            data.write_bytes(content)
        monkeypatch.setattr(importlib.util, "find_spec", finding(found))
        with pytest.raises(DataError) as refused:
            load_dataset("digits")
        assert str(refused.value).startswith(message) and "\n" not in str(refused.value), str(refused.value)


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
        # The same examples, augmented the same, in the same places: a dropout mask or a mixup
        # partner goes by an example's place in the global batch.
        for field in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([h[step][field] for h in hosts]), full[step][field])


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


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A uint8 image whose every pixel differs from its neighbours: any offset, flip or
    resampling difference shows."""
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_pad_crop_and_flip_equal_torchvisions_on_the_same_draws():
    """CIFAR's augmentation is RandomCrop(32, padding=4) then RandomHorizontalFlip, pixel for pixel,
    torchvision's run on the offsets and coin ours drew; the flip on PIL images too (folders)."""
    image = noise(32, 32)
    reference = TT.Compose([TT.RandomCrop(32, padding=4), TT.RandomHorizontalFlip()])
    ours = T.Compose([T.PadCrop(4), T.RandomFlip()])
    for seed in range(40):
        rng = Recorder(seed)
        out = ours({"image": image}, rng)["image"]
        with replay(rng.draws):
            expected = reference(Image.fromarray(image))
        np.testing.assert_array_equal(out, np.asarray(expected), err_msg=f"draws {rng.draws}")
    pil = Image.fromarray(noise(20, 30))
    for seed in range(8):
        rng = Recorder(seed)
        out = T.RandomFlip()({"image": pil}, rng)["image"]
        with replay(rng.draws):
            expected = TT.RandomHorizontalFlip()(pil)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_pad_crop_and_flip_draw_as_torchvision_does():
    """Over 4,000 draws, the offsets (each of 0..8, jointly) and the flips are distributed as
    torchvision's own draws: a chi-square test of the two samples' counts must not reject at
    p = 1e-4 (fixed seeds: the outcome never changes; a correct draw fails one test with
    probability 1e-4); a range one short or a flip probability of 0.4 fails it."""
    n, image = 4000, noise(2, 2)
    rng = Recorder(0)
    flipped = [not np.array_equal(T.RandomFlip()({"image": image}, rng)["image"], image) for _ in range(n)]
    for _ in range(n):
        T.PadCrop(4)({"image": image}, rng)
    offsets = np.array([d[3] for d in rng.draws[n:]]).reshape(n, 2)
    ours = offsets[:, 0] * 9 + offsets[:, 1], np.array(flipped)
    torch.manual_seed(0)
    crop = [TT.RandomCrop.get_params(torch.zeros(1, 10, 10), (2, 2)) for _ in range(n)]
    theirs = (np.array([i * 9 + j for i, j, _, _ in crop]),
              np.array([bool(torch.rand(1) < 0.5) for _ in range(n)]))
    for a, b, bins in zip(ours, theirs, (81, 2)):
        table = np.stack([np.bincount(np.asarray(a, int), minlength=bins), np.bincount(np.asarray(b, int), minlength=bins)])
        assert scipy.stats.chi2_contingency(table).pvalue > 1e-4, table


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


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_folder_augmentation_equals_torchvisions_on_the_same_draws(tmp_path, mode):
    """A folder's training transform is RandomResizedCrop, RandomHorizontalFlip, ToTensor and
    Normalize, bit for bit, torchvision's run on the numbers ours drew (the crop's tries that fail
    included), on RGB and one-channel (in_chans=1, averaged mean and std) images."""
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    data = load_dataset("folder", root, image_size=24, in_chans=1 if mode == "L" else 3)
    channels = 1 if mode == "L" else 3
    # timm's in_chans=1: the average of ImageNet's three means and stds.
    mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if mode == "RGB" else
                 ((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)))
    reference = TT.Compose([TT.RandomResizedCrop(24), TT.RandomHorizontalFlip(), TT.ToTensor(),
                            TT.Normalize(mean, std)])
    for i in range(len(data.train)):
        for seed in range(3):
            rng = Recorder(seed)
            out = data.augment(data.train[i], rng)["image"]
            with replay(rng.draws):
                expected = reference(Image.open(data.train.paths[i]).convert(mode))
            assert out.shape == (24, 24, channels)
            np.testing.assert_array_equal(out, expected.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("size, scale", [((120, 80), (0.08, 1.0)), ((300, 101), (0.9, 1.0)),
                                         ((101, 300), (0.9, 1.0)), ((100, 90), (1.5, 2.0))])
def test_random_resized_crop_equals_torchvisions_on_the_same_draws(size, scale):
    """Box and bilinear resampling, pixel for pixel: draws that succeed at once, after failed tries,
    and the centre-crop fallback of a wide, a tall and a near-square image (every try failing)."""
    image = Image.fromarray(noise(size[1], size[0]))
    crop, reference = T.RandomResizedCrop(16, scale=scale), TT.RandomResizedCrop(16, scale=scale)
    for seed in range(30):
        rng = Recorder(seed)
        out = crop({"image": image}, rng)["image"]
        with replay(rng.draws):
            expected = reference(image)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected), err_msg=f"draws {rng.draws}")


def test_random_resized_crop_draws_as_torchvision_does():
    """Over 3,000 crops of a 120x80 image, the boxes ours draws (turned into boxes by torchvision's
    own get_params) are distributed as torchvision's draws: top, left, height, width, area and aspect
    ratio each pass a two-sample Kolmogorov-Smirnov test at p = 1e-4 (fixed seeds: the outcome never
    changes; six tests of a correct draw fail with probability 6e-4). A linear instead of a
    log-uniform aspect ratio fails it."""
    n, image = 3000, Image.fromarray(noise(80, 120))
    crop, rng, ours = T.RandomResizedCrop(4), Recorder(0), []
    for _ in range(n):
        start = len(rng.draws)
        crop({"image": image}, rng)
        with replay(rng.draws[start:]):
            ours.append(TT.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]))
    torch.manual_seed(0)
    theirs = [TT.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    ours, theirs = np.array(ours, float), np.array(theirs, float)
    for a, b, what in [(ours.T, theirs.T, "top left height width"),
                       ([ours[:, 2] * ours[:, 3], ours[:, 3] / ours[:, 2]],
                        [theirs[:, 2] * theirs[:, 3], theirs[:, 3] / theirs[:, 2]], "area aspect")]:
        for x, y, name in zip(a, b, what.split()):
            assert scipy.stats.ks_2samp(x, y).pvalue > 1e-4, name


@pytest.mark.parametrize("width, height", [(57, 91), (91, 57), (64, 64), (33, 40)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_and_centre_crop_equal_torchvisions(width, height, interpolation):
    """Resize (shorter side, antialiased) and CenterCrop, pixel for pixel, on images whose
    rounding of the crop offset and of the longer side matter."""
    image = Image.fromarray(noise(height, width))
    mode = T.INTERPOLATIONS[interpolation]
    reference = TT.Compose([TT.Resize(37, TT.InterpolationMode(interpolation)), TT.CenterCrop(32)])
    out = T.ResizeCenterCrop(37, 32, mode)({"image": image})["image"]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference(image)))


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

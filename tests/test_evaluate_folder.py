"""``densenet-jax evaluate --dataset folder``: prepared as the weights record (as ``predict`` prepares
them), refused for other classes, from ``val/`` alone, counting only the images that counted."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torchvision.transforms as TT
from flax import nnx
from PIL import Image

import densenet_jax as dj
from densenet_jax import DataError, cli
from densenet_jax.data import load_dataset
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.train.evaluate import evaluate_weights
from densenet_jax.weights.format import state_arrays, write_safetensors
from fixtures import write_image_folder

CLASSES = ["Zebra", "cat", "dog"]
# What a `train --image-size 32` run records on a folder: resize 36, crop 32, bilinear; a mean and
# std of its own, so that ImageNet's would show.
MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)
TRAINED_AT_32 = PretrainedCfg(input_size=(3, 32, 32), interpolation="bilinear", crop_pct=32 / 36,
                              num_classes=3, mean=MEAN, std=STD)


def weights_file(path, *, class_names=None, pretrained_cfg=None):
    """A 3-class densenet_bc_16_k12 weights file with the given metadata."""
    model = dj.create_model("densenet_bc_16_k12", num_classes=3, rngs=nnx.Rngs(5))
    write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config, path,
                      class_names=class_names, pretrained_cfg=pretrained_cfg)
    return path


def expected(weights, files, labels, resize, crop, mean, std) -> tuple[float, float]:
    """Loss and accuracy of the weights on ``files`` prepared by torchvision's transforms."""
    prepare = TT.Compose([TT.Resize(resize), TT.CenterCrop(crop), TT.ToTensor(), TT.Normalize(mean, std)])
    images = np.stack([prepare(Image.open(f).convert("RGB")).numpy().transpose(1, 2, 0) for f in files])
    model = dj.load(weights)
    model.eval()
    logits = np.asarray(model(jnp.asarray(images)), np.float64)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(labels)).mean()
    return float(loss), float(np.mean(logits.argmax(-1) == np.asarray(labels)))


def evaluate(capsys, *argv, expect: int = 0) -> str:
    """The line ``densenet-jax evaluate`` prints (stdout), or for ``expect`` its one error line."""
    if expect:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["evaluate", *map(str, argv)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == expect and len(err) == 1, err
        return err[0]
    cli.main(["evaluate", *map(str, argv)])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return out[0]


def loss_accuracy(line: str) -> tuple[float, float]:
    loss, accuracy = line.rsplit("loss ", 1)[1].split(", accuracy ")
    return float(loss), float(accuracy)


def val_files(root):
    """val/'s images and labels, class by class (CLASSES sorted), by file name."""
    files = [(p, c) for c, name in enumerate(CLASSES) for p in sorted((root / "val" / name).iterdir())]
    return [p for p, _ in files], [c for _, c in files]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder, classes CLASSES, 2 images each in train/ and val/."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", classes=CLASSES, per_class=2)


def test_evaluate_prepares_images_as_the_weights_record(tmp_path, capsys, images):
    """Issue 1: weights trained at 32 are evaluated at 32 with their mean/std (not at 224), as
    predict prepares them; --image-size overrides the size only; the line says what was used."""
    weights = weights_file(tmp_path / "w.safetensors", class_names=CLASSES, pretrained_cfg=TRAINED_AT_32)
    files, labels = val_files(images)
    line = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", images, "--batch-size", 4)
    reference = expected(weights, files, labels, 36, 32, MEAN, STD)
    assert loss_accuracy(line) == pytest.approx(reference, abs=5e-5)
    assert "(held-out, 6 images; the weights' preprocessing: resize 36 bilinear, centre crop 32, RGB, " \
           "mean (0.300, 0.500, 0.700), std (0.200, 0.250, 0.300)): loss " in line

    # The recorded crop_pct 32/36 kept at 40: resize floor(40 * 36 / 32) = 45.
    line = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", images,
                    "--image-size", 40)
    assert "the weights' preprocessing at --image-size 40: resize 45 bilinear, centre crop 40, RGB" in line
    assert loss_accuracy(line) == pytest.approx(expected(weights, files, labels, 45, 40, MEAN, STD), abs=5e-5)

    # Weights that record nothing: torchvision's preprocessing (resize 8/7 of the crop, ImageNet's).
    bare = weights_file(tmp_path / "bare.safetensors")
    line = evaluate(capsys, "--weights", bare, "--dataset", "folder", "--data-dir", images, "--image-size", 35)
    assert "torchvision's preprocessing (the weights record none) at --image-size 35: resize 40 bilinear, " \
           "centre crop 35, RGB, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in line
    imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert loss_accuracy(line) == pytest.approx(expected(bare, files, labels, 40, 35, *imagenet), abs=5e-5)


def test_evaluate_reads_val_alone(tmp_path, capsys, images):
    """Issue 3: evaluate needs val/ only (training still needs both)."""
    root = tmp_path / "val_only"
    shutil.copytree(images / "val", root / "val")
    weights = weights_file(tmp_path / "w.safetensors", class_names=CLASSES, pretrained_cfg=TRAINED_AT_32)
    line = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", root)
    assert "(held-out, 6 images; " in line
    files, labels = val_files(root)
    assert loss_accuracy(line) == pytest.approx(expected(weights, files, labels, 36, 32, MEAN, STD), abs=5e-5)
    with pytest.raises(DataError, match="train: missing split folder"):
        load_dataset("folder", root)
    error = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", tmp_path, expect=1)
    assert error == f"densenet-jax: error: {tmp_path / 'val'}: missing split folder"
    for options, said in ((["--dataset", "folder"], "--data-dir is needed for dataset folder"),
                          (["--dataset", "folder", "--data-dir", tmp_path / "nowhere"], "nowhere: no such folder")):
        assert evaluate(capsys, "--weights", weights, *options, expect=1).endswith(said)


def test_evaluate_refuses_other_class_names(tmp_path, capsys):
    """Issue 2: weights trained on other classes, as many of them, are refused naming both lists."""
    other = write_image_folder(tmp_path / "xyz", classes=("x", "y", "z"), per_class=1)
    weights = weights_file(tmp_path / "w.safetensors", class_names=CLASSES, pretrained_cfg=TRAINED_AT_32)
    error = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", other, expect=1)
    assert error.startswith(f"densenet-jax: error: {weights}: trained on classes [Zebra, cat, dog], "
                            f"{other / 'val'} has [x, y, z]")
    assert "0: Zebra / x; 1: cat / y; 2: dog / z" in error
    one_differs = write_image_folder(tmp_path / "cow", classes=("Zebra", "cat", "cow"), per_class=1)
    error = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", one_differs, expect=1)
    assert "(first differences, weights / folder: 2: dog / cow)" in error
    four = write_image_folder(tmp_path / "four", classes=("Zebra", "cat", "dog", "emu"), per_class=1)
    error = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", four, expect=1)
    assert error.endswith(f"{weights}: has 3 classes, {four / 'val'} has 4")


def test_evaluate_counts_only_the_images_that_counted(tmp_path, capsys, images):
    """Issue 4: an unreadable image is neither in the count nor in the accuracy; the line says so."""
    root = tmp_path / "images"
    shutil.copytree(images, root)
    files, labels = val_files(root)
    files[3].write_bytes(b"not an image")
    weights = weights_file(tmp_path / "w.safetensors", class_names=CLASSES, pretrained_cfg=TRAINED_AT_32)
    line = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", root)
    assert "(held-out, 5 images, 1 unreadable skipped; " in line
    readable = [i for i in range(len(files)) if i != 3]
    reference = expected(weights, [files[i] for i in readable], [labels[i] for i in readable], 36, 32, MEAN, STD)
    assert loss_accuracy(line) == pytest.approx(reference, abs=5e-5)


def test_evaluate_weights_is_what_the_command_prints(tmp_path, capsys, images):
    """The library call behind the command: the same figures, no optimizer, the same refusals."""
    weights = weights_file(tmp_path / "w.safetensors", class_names=CLASSES, pretrained_cfg=TRAINED_AT_32)
    result = evaluate_weights(str(weights), "folder", str(images), batch_size=4)
    line = evaluate(capsys, "--weights", weights, "--dataset", "folder", "--data-dir", images, "--batch-size", 4)
    assert (result.count, result.examples) == (6, 6) and result.preprocessing in line
    assert loss_accuracy(line) == pytest.approx((result.loss, result.accuracy), abs=5e-5)
    for options, said in ((dict(batch_size=0), "--batch-size 0: must be at least 1"),
                          (dict(image_size=0), "--image-size 0: must be at least 1"),
                          (dict(precision="fp16"), "--precision 'fp16': must be one of fp32, bf16, fp64")):
        with pytest.raises(ValueError) as error:
            evaluate_weights(str(weights), "folder", str(images), **options)
        assert str(error.value) == said

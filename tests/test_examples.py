"""The scripts in examples/ run as a user would run them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as TT
from PIL import Image

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.weights.torch_keys import from_torchvision
from densenet_jax.inference import class_names
from densenet_jax.model.pretrained_cfg import IMAGENET_MEAN, IMAGENET_STD
from densenet_jax.weights.format import write_safetensors
from fixtures import write_cifar10, write_image_folder
from test_predict import PHOTOS, torchvision_tensor
from torch_twins import cifar_bc_model, state_dict_numpy, torchvision_model

ROOT = Path(__file__).resolve().parent.parent


def test_parity_example_converts_and_matches():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "parity.py")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max relative difference" in result.stdout


def run_example(name, *args):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def converted(torch_model, path: Path) -> Path:
    """``torch_model``'s weights converted as convert/torch_to_flax.py does."""
    write_safetensors(*from_torchvision(state_dict_numpy(torch_model), "torch"), path)
    return path


def test_classify_example_names_torchvision_top1(tmp_path):
    torch_model = torchvision_model("densenet121", seed=3).eval()
    photo = PHOTOS[0]
    out = run_example("classify.py", converted(torch_model, tmp_path / "w.safetensors"), photo)
    lines = out.splitlines()
    assert lines[0] == str(photo) and len(lines) == 6
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(torchvision_tensor(photo).transpose(2, 0, 1)[None]))
    assert lines[1].split("%", 1)[1].strip() == class_names(1000)[int(logits.argmax())]


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A converted CIFAR DenseNet-BC (L=40, k=12, 10 classes) and a 3-class image folder."""
    tmp = tmp_path_factory.mktemp("examples")
    return converted(cifar_bc_model(40, 12).eval(), tmp / "bc40.safetensors"), write_image_folder(tmp / "imgs")


def test_fine_tune_example_trains_a_new_head(tmp_path, capsys, small_weights):
    weights, folder = small_weights
    out = run_example("fine_tune.py", weights, folder, "--epochs", "1", "--batch-size", "6",
                      "--image-size", "32", "--workdir", tmp_path / "run")
    assert "3 classes (cat, dog, fox): held-out accuracy" in out
    # The weights remember their class names: predict shows them without --labels.
    image = next((folder / "val" / "dog").iterdir())
    cli.main(["predict", "--weights", str(tmp_path / "run" / "best.safetensors"), str(image),
              "--resize", "36", "--crop", "32", "--json"])
    top = json.loads(capsys.readouterr().out)[0]["top"]
    model = dj.load(tmp_path / "run" / "best.safetensors")
    assert model.class_names == ["cat", "dog", "fox"]  # the folders' order, as ImageFolder's
    preprocess = TT.Compose([TT.Resize(36), TT.CenterCrop(32), TT.ToTensor(), TT.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = preprocess(Image.open(image).convert("RGB")).numpy().transpose(1, 2, 0)[None]
    model.eval()
    p = torch.softmax(torch.from_numpy(np.asarray(model(x)))[0], -1).numpy()
    order = np.argsort(-p)  # the model's own probabilities, most likely first
    assert [(e["name"], e["class"]) for e in top] == [(model.class_names[i], int(i)) for i in order]
    assert all(abs(e["probability"] - p[e["class"]]) <= 1e-5 for e in top)


def test_features_example_fits_a_probe(small_weights):
    weights, folder = small_weights
    out = run_example("features.py", weights, folder, "--image-size", "32")
    assert "features.norm5" in out and "linear probe held-out accuracy" in out


def test_cifar_recipe_example_smoke(tmp_path):
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    out = run_example("cifar_recipe.py", data, "--model", "densenet_bc_16_k12", "--smoke",
                      "--workdir", tmp_path / "run")
    assert "densenet_bc_16_k12 on cifar10: step 1, test error" in out

"""``densenet-jax predict``: torchvision's preprocessing on real photographs, and the same top-5 as
torchvision's model on converted weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch
import torchvision.transforms as TT
from PIL import Image

from densenet_jax import cli
from densenet_jax.data.images import read_image
from densenet_jax.weights.torch_keys import from_torchvision
from densenet_jax.inference import class_names, eval_transform
from densenet_jax.weights.format import write_safetensors
from torch_twins import state_dict_numpy, torchvision_model

# Real photographs that ship inside scikit-learn (427x640 JPEGs).
PHOTOS = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
TORCHVISION_EVAL = TT.Compose([TT.Resize(256), TT.CenterCrop(224), TT.ToTensor(),
                               TT.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def torchvision_tensor(path: Path) -> np.ndarray:
    """torchvision's eval tensor of the image at ``path``, as NHWC numpy."""
    return TORCHVISION_EVAL(Image.open(path).convert("RGB")).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_preprocessing_equals_torchvision_on_real_photos(photo):
    ours = eval_transform()({"image": read_image(photo)})["image"]
    reference = torchvision_tensor(photo)
    assert ours.shape == reference.shape == (224, 224, 3) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= 1e-6


def test_imagenet_class_names_ship_with_the_package():
    names = class_names(1000)
    assert len(names) == 1000 and names[0] == "tench" and names[281] == "tabby" and names[999] == "toilet tissue"
    assert class_names(3) == ["0", "1", "2"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """torchvision's densenet121 (random weights, randomised BN) and its converted weights file."""
    torch_model = torchvision_model("densenet121", seed=7).eval()
    path = tmp_path_factory.mktemp("weights") / "densenet121.safetensors"
    write_safetensors(*from_torchvision(state_dict_numpy(torch_model), "torch"), path)
    return torch_model, path


def test_predict_gives_torchvision_top5(tmp_path, capsys, converted):
    torch_model, weights = converted
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS:
        (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    cli.main(["predict", "--weights", str(weights), str(folder), "--json", "--batch-size", "4"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert "broken.jpg: unreadable image, skipped" in captured.err
    assert [Path(r["file"]).name for r in results] == ["broken.jpg", *(p.name for p in PHOTOS)]
    assert results[0]["skipped"].startswith("unreadable image (")  # listed with the reason
    results = results[1:]
    batch = np.stack([torchvision_tensor(p) for p in PHOTOS]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        probabilities = torch.softmax(torch_model(torch.from_numpy(batch)), -1).numpy()
    names = class_names(1000)
    for result, p in zip(results, probabilities):
        top = np.argsort(-p)[:5]
        assert {e["class"] for e in result["top"]} == set(top.tolist())
        for entry in result["top"]:
            assert entry["name"] == names[entry["class"]]
            assert abs(entry["probability"] - p[entry["class"]]) <= 1e-5


def test_predict_text_output_and_errors(tmp_path, capsys, converted):
    _, weights = converted
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(1000)))
    cli.main(["predict", "--weights", str(weights), str(PHOTOS[0]), "--labels", str(labels), "--top", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(PHOTOS[0]) and len(lines) == 3 and "% " in lines[1] and "thing " in lines[1]
    labels.write_text("a\nb\n")
    for argv, message in (([str(tmp_path / "none.jpg")], "none.jpg: no such file or folder"),
                          ([str(PHOTOS[0]), "--labels", str(labels)], "labels.txt: 2 names for a model of 1000"),
                          ([str(PHOTOS[0]), "--labels", str(tmp_path / "missing.txt")],
                           f"{tmp_path / 'missing.txt'}: cannot read the labels file (No such file or directory)"),
                          ([str(PHOTOS[0]), "--crop", "300"], "--crop 300 is larger than --resize 256"),
                          ([str(PHOTOS[0]), "--test-size"], f"--test-size: {weights} has no larger test size"),
                          ([str(PHOTOS[0]), "--test-size", "--preprocess", "torchvision"],
                           "--test-size: --preprocess torchvision has no larger test size")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["predict", "--weights", str(weights), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 1 and len(err) == 1 and message in err[0]


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"], ids=["UTF-8 locale", "C locale"])
def test_names_in_any_encoding_are_printed_as_their_bytes(encoding, tmp_path, monkeypatch):
    """A Latin-1 folder, file and class name (as Python decodes one that is not UTF-8: surrogate
    escapes) is printed as its bytes, on the strict stream a UTF-8 locale gives and on an ASCII
    one (the C locale without Python's UTF-8 mode)."""
    import io
    import os
    import sys

    import densenet_jax as dj
    latin1 = os.fsdecode(b"caf\xe9")
    folder = tmp_path / latin1
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"{latin1}.png")
    model = dj.create_model("densenet_bc_16_k12", num_classes=3)
    model.class_names = [latin1, f"{latin1}-2", "plain"]
    dj.save(model, tmp_path / "weights.safetensors")
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding=encoding, errors="strict"))
    cli.main(["predict", "--weights", str(tmp_path / "weights.safetensors"), str(folder), "--top", "3",
              "--resize", "32", "--crop", "32"])
    sys.stdout.flush()
    lines = out.getvalue().splitlines()
    assert lines[0] == os.fsencode(folder / f"{latin1}.png"), lines
    assert sorted(line.split(b")")[0].split()[-2] for line in lines[1:]) == [b"caf\xe9", b"caf\xe9-2", b"plain"]

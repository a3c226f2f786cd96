"""``densenet-jax predict DIR`` finds the files training finds (links followed, a loop not followed
round) and says why a broken link or a FIFO cannot be read, as for any unreadable image, without
waiting on the FIFO."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.data.folder import find_images
from densenet_jax.inference import image_files
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.weights.format import state_arrays, write_safetensors

BROKEN = "unreadable image (broken link to nowhere.jpg: No such file or directory)"
FIFO = "unreadable image (not a regular file: a FIFO)"


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(path)


@pytest.fixture
def tree(tmp_path):
    """``split/cls``: an image, one in a sub-folder, a linked folder elsewhere (two images), a link
    back up the tree, a broken link, a FIFO named like an image, and a hidden folder."""
    photos = tmp_path / "split" / "cls"
    image(photos / "a.png")
    image(photos / "sub" / "b.png")
    image(tmp_path / "elsewhere" / "c.png")
    image(tmp_path / "elsewhere" / "d.png")
    image(photos / ".hidden" / "e.png")
    os.symlink("../../elsewhere", photos / "linked")
    os.symlink("..", photos / "sub" / "loop")
    os.symlink("nowhere.jpg", photos / "gone.jpg")
    os.mkfifo(photos / "pipe.jpg")
    return photos


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 3-class densenet_bc_16_k12 that records 32x32 preprocessing (small images, fast)."""
    model = dj.create_model("densenet_bc_16_k12", num_classes=3, rngs=nnx.Rngs(0))
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config, path,
                      class_names=["x", "y", "z"],
                      pretrained_cfg=PretrainedCfg(input_size=(3, 32, 32), interpolation="bilinear",
                                                   crop_pct=32 / 36, num_classes=3))
    return path


def predict_json(capsys, *argv) -> tuple[list[dict], str]:
    cli.main(["predict", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_predict_finds_what_training_finds(tree):
    split = tree.parent
    assert sorted(map(str, image_files([split]))) == sorted(find_images(split).paths)
    assert [str(p.relative_to(tree)) for p in image_files([tree])] == [
        "a.png", "gone.jpg", "pipe.jpg", "linked/c.png", "linked/d.png", "sub/b.png"]


@pytest.mark.timeout(300)  # a FIFO opened for reading waits for a writer: fail, never hang
def test_predict_skips_broken_links_and_fifos_with_the_reason(tree, weights, capsys):
    results, err = predict_json(capsys, "--weights", weights, tree)
    by_name = {str(os.path.relpath(r["file"], tree)): r for r in results}
    assert list(by_name) == ["a.png", "gone.jpg", "pipe.jpg", "linked/c.png", "linked/d.png", "sub/b.png"]
    assert by_name["gone.jpg"] == {"file": str(tree / "gone.jpg"), "skipped": BROKEN}
    assert by_name["pipe.jpg"] == {"file": str(tree / "pipe.jpg"), "skipped": FIFO}
    assert all(len(by_name[n]["top"]) == 3 for n in ("a.png", "linked/c.png", "linked/d.png", "sub/b.png"))
    assert f"{tree / 'gone.jpg'}: unreadable image, skipped (broken link to nowhere.jpg" in err
    assert f"{tree / 'pipe.jpg'}: unreadable image, skipped (not a regular file: a FIFO)" in err

    # Named one by one: listed with the reason too, not "no such file or folder".
    results, _ = predict_json(capsys, "--weights", weights, tree / "pipe.jpg", tree / "gone.jpg", tree / "a.png")
    assert [r.get("skipped") for r in results] == [FIFO, BROKEN, None] and "top" in results[2]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--weights", str(weights), str(tree / "pipe.jpg"), "--strict"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and lines == [
        f"densenet-jax: error: {tree / 'pipe.jpg'}: unreadable image (not a regular file: a FIFO)"]


def test_python_predict_names_the_classes_the_weights_record(tree, weights, tmp_path):
    """dj.load keeps the class names a weights file records, dj.predict names the classes with them
    (as the command does), dj.save writes them back, and a new head's classes are unnamed."""
    model = dj.load(weights)
    assert model.class_names == ["x", "y", "z"]
    (result,) = dj.predict(model, tree / "a.png", top_k=3)  # one path, not a list of them
    cli_top = json.loads(json.dumps(result["top"]))
    assert sorted(entry["name"] for entry in result["top"]) == ["x", "y", "z"]
    assert [entry["name"] for entry in cli_top] == [["x", "y", "z"][entry["class"]] for entry in cli_top]
    dj.save(model, tmp_path / "again.safetensors")
    assert dj.load(tmp_path / "again.safetensors").class_names == ["x", "y", "z"]
    assert dj.load(weights, num_classes=5).class_names is None
    with pytest.raises(dj.DataError, match="^no image files or folders given$"):
        dj.predict(model, [])

"""Image folders read as torchvision reads them: discovery (against ImageFolder itself), every Pillow
mode, one rule for unreadable images in every reader, a listing cache, and --workers."""

import json
import logging
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torchvision.transforms as TT
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import pil_loader

from densenet_jax import DataError, cli
from densenet_jax.data import eval_batches, load_dataset, listing, train_batches
from densenet_jax.data.folder import find_images
from densenet_jax.data.images import IMG_EXTENSIONS, UnreadableImage, read_image
from fixtures import tiny_weights_file, write_image_folder
from train_cli import train


@pytest.fixture(autouse=True)
def listing_cache(tmp_path, monkeypatch):
    """Each test its own listing cache, never the user's. No racy window: a folder's ctime cannot
    be set back as ``backdate`` sets its mtime (test_caches.py tests the window)."""
    folder = tmp_path / "listings"
    monkeypatch.setenv(listing.CACHE_ENV, str(folder))
    monkeypatch.setattr(listing, "_RACY_NS", 0)
    return folder


def touch(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tricky_tree(split):
    """Classes whose sort order is easy to get wrong, images at every depth, every extension in
    odd cases, files and folders that are no images, and links."""
    for name in ["a/Z.JPG", "a/b.Jpeg", "a/c.png", "a/d.PPM", "a/e.pgm", "a/f.bmp", "a/g.tif",
                 "a/h.TIFF", "a/i.webp", "a/j.gif", "a/k.txt", "a/noext", "a/sub/b.jpg",
                 "a/sub-a/c.jpg", "a/sub/x/d.png", "a/sub.jpg/e.jpg", "a b/1.png", "B/1.jpg",
                 "10/x.jpg", "9/x.jpg", "ünï/x.jpg", "stray.jpg"]:
        touch(split / name)
    os.symlink(split / "a" / "sub", split / "link")  # a linked class folder
    os.symlink(split / "B", split / "a" / "linked")  # a linked folder inside a class
    os.symlink(split / "nowhere.jpg", split / "B" / "dangling.jpg")  # listed; reading it fails later


def test_discovery_equals_torchvision_imagefolder(tmp_path):
    split = tmp_path / "train"
    tricky_tree(split)
    reference = ImageFolder(str(split))
    ours = find_images(split)
    assert ours.classes == reference.classes == ["10", "9", "B", "a", "a b", "link", "ünï"]
    assert list(zip(ours.paths, ours.labels.tolist())) == reference.samples
    assert len(ours.paths) == 23 and ours.hidden == []  # a: 9 + 4 below + 2 linked; B: 2; link: 2; 4 more


def test_hidden_files_and_folders_are_ignored_and_said_once(tmp_path, caplog):
    root = tmp_path / "data"
    for split in ("train", "val"):
        tricky_tree(root / split)
        for name in [".ipynb_checkpoints/x-checkpoint.jpg", "a/.hidden.jpg",
                     "a/.ipynb_checkpoints/y.jpg", "B/._1.jpg"]:
            touch(root / split / name)
    reference = ImageFolder(str(root / "train"))  # torchvision takes them all
    assert ".ipynb_checkpoints" in reference.classes
    visible = [(p, reference.classes[label]) for p, label in reference.samples
               if not any(part.startswith(".") for part in os.path.relpath(p, root).split(os.sep))]
    ours = find_images(root / "train")
    assert ours.classes == [c for c in reference.classes if not c.startswith(".")]
    assert [(p, ours.classes[label]) for p, label in zip(ours.paths, ours.labels)] == visible
    assert ours.hidden == [".ipynb_checkpoints", "B/._1.jpg", "a/.hidden.jpg", "a/.ipynb_checkpoints",
                           "a/linked/._1.jpg"]  # (a/linked is B)
    with caplog.at_level(logging.INFO, logger="densenet_jax"):
        load_dataset("folder", root)
    notes = [r.getMessage() for r in caplog.records if "hidden" in r.getMessage()]
    assert len(notes) == 1 and "ignoring 10 hidden" in notes[0] and "train/.ipynb_checkpoints" in notes[0]


def test_setup_opens_no_image(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs")

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened during set-up")

    monkeypatch.setattr(Image, "open", refuse)
    data = load_dataset("folder", root)
    assert len(data.train) == len(data.eval) == 12


def backdate(root, seconds=60):
    """Folders' times in the past, as a data set's are: a just-changed folder is listed again."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def count_listings(monkeypatch):
    calls = []
    real = os.scandir
    monkeypatch.setattr(listing.os, "scandir", lambda path: calls.append(path) or real(path))
    return calls


def test_listing_is_cached_and_checked(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs")
    backdate(root)
    first = find_images(root / "train")
    calls = count_listings(monkeypatch)
    again = find_images(root / "train")
    assert calls == [] and again.paths == first.paths  # a resume: one stat per folder, no listing
    (root / "train" / "dog" / "9.png").write_bytes(b"")  # the folder's time changes
    (root / "train" / "cat" / "0.jpg").unlink()
    changed = find_images(root / "train")
    assert sorted(map(os.path.basename, calls)) == ["cat", "dog"]  # only the changed folders
    assert set(changed.paths) == set(first.paths) - {str(root / "train/cat/0.jpg")} | {str(root / "train/dog/9.png")}


def test_a_damaged_or_foreign_cache_is_rebuilt_not_trusted(tmp_path, listing_cache):
    root = write_image_folder(tmp_path / "imgs")
    backdate(root)
    expected = find_images(root / "train").paths
    (cache,) = listing_cache.iterdir()
    valid = json.loads(cache.read_text())
    for damage in (b"{not json", cache.read_bytes()[:100], b"[]",
                   json.dumps({**valid, "root": str(tmp_path / "elsewhere")}).encode(),
                   json.dumps({**valid, "folders": {"": {"mtime_ns": "x"}}}).encode()):
        cache.write_bytes(damage)
        assert find_images(root / "train").paths == expected
        assert json.loads(cache.read_text()) ["folders"].keys() == valid["folders"].keys()


def test_cache_writes_are_atomic(tmp_path, listing_cache, monkeypatch):
    root = write_image_folder(tmp_path / "imgs")

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)  # the write dies just before its rename
    assert len(find_images(root / "train").paths) == 12  # the cache only saves time
    assert list(listing_cache.iterdir()) == []  # nothing half-written left behind


# Every Pillow mode family: (mode, pixels, suffix). 8-bit ones must read as torchvision reads them.
EIGHT_BIT = {
    "1": (np.array([[0, 1, 1], [1, 0, 1]], bool), ".png"),
    "L": (np.array([[0, 17, 255]], np.uint8), ".png"),
    "LA": (np.array([[[10, 0], [200, 255]]], np.uint8), ".png"),
    "RGBA": (np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], np.uint8), ".png"),
    "CMYK": (np.array([[[10, 20, 30, 40], [200, 100, 50, 0]]], np.uint8), ".tif"),
}


@pytest.mark.parametrize("mode", [*EIGHT_BIT, "P"])
def test_8bit_modes_read_as_torchvision_reads_them(tmp_path, mode):
    path = tmp_path / f"x{EIGHT_BIT.get(mode, (0, '.png'))[1]}"
    if mode == "P":  # a palette with a transparent entry
        image = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
        image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
        image.info["transparency"] = 1
        image.save(path, transparency=1)
    else:
        Image.fromarray(EIGHT_BIT[mode][0], mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode and (mode != "P" or "transparency" in im.info)
    ours = read_image(path)
    assert ours.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(pil_loader(str(path))))
    np.testing.assert_array_equal(np.asarray(read_image(path, "L")),
                                  np.asarray(Image.open(path).convert("RGB").convert("L")))
    if mode == "P":  # the palette's colours, alpha dropped
        np.testing.assert_array_equal(np.asarray(ours)[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])


@pytest.mark.parametrize("mode, pixels, suffix, expected", [
    ("I;16", np.array([[1000, 0, 65535, 128, 129]], np.uint16), ".png", [4, 0, 255, 0, 1]),
    ("I", np.array([[1000, -5, 70000, 65535]], np.int32), ".tif", [4, 0, 255, 255]),
    ("F", np.array([[0.5, 1.5, -1.0, np.nan, 0.2]], np.float32), ".tif", [128, 255, 0, 0, 51]),
])
def test_wide_modes_are_scaled_not_clipped(tmp_path, mode, pixels, suffix, expected):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(pixels).save(path)  # uint16 -> I;16, int32 -> I, float32 -> F
    with Image.open(path) as im:
        assert im.mode == mode
    rgb = np.asarray(read_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(expected), 3)
    np.testing.assert_array_equal(rgb, np.repeat(np.array(expected, np.uint8)[None, :, None], 3, -1))
    np.testing.assert_array_equal(np.asarray(read_image(path, "L")), [expected])


def test_a_sixteen_bit_image_is_not_white(tmp_path):
    """The issue's case: every pixel 1000 of 65535 read as 255 where it is 4."""
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "x.png")
    assert set(np.asarray(read_image(tmp_path / "x.png")).ravel()) == {4}


def bomb_png(path, width=20000, height=10000):
    """A PNG whose header declares more pixels than Pillow will decode: a few dozen bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("damage", ["bomb", "truncated", "text", "empty", "missing"])
def test_one_rule_names_every_unreadable_file(tmp_path, damage):
    path = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(path)
    if damage == "bomb":
        bomb_png(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif damage == "text":
        path.write_text("not an image")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(UnreadableImage, match=f"^{path}: unreadable image \\(") as error:
        read_image(path)
    assert error.value.path == str(path) and "\n" not in str(error.value)


def break_two(root):
    (root / "train" / "cat" / "1.jpg").write_bytes(b"")
    bomb_png(root / "val" / "dog" / "2.png")


def test_bad_images_are_replaced_counted_and_reproducible(tmp_path, caplog):
    root = write_image_folder(tmp_path / "imgs")
    break_two(root)
    data = load_dataset("folder", root, image_size=16)
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        batches = list(train_batches(data.train, data.augment, seed=0, epoch=0, global_batch=4))
        evaluated = list(eval_batches(data.eval, data.preprocess, global_batch=8))
    assert [len(b["label"]) for b in batches] == [4, 4, 4]  # every batch kept its size
    assert sum(int(b["skipped"].sum()) for b in batches) == 1  # what the loop counts
    assert "cat/1.jpg: unreadable image, skipped (" in caplog.text and "next readable image" in caplog.text
    again = list(train_batches(data.train, data.augment, seed=0, epoch=0, global_batch=4))
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    weights = np.concatenate([b["weight"] for b in evaluated])
    # val: cat 0-3, dog 0-3, fox 0-3; dog/2.png (index 6) stands in for nothing, padding for nothing
    assert weights.tolist() == [1] * 6 + [0] + [1] * 5 + [0] * 4
    assert "dog/2.png: unreadable image, skipped (DecompressionBombError" in caplog.text
    # Iterating a split reads each index once and ends (the wrap-around once made it endless).
    labels = [int(example["label"]) for example in data.train]
    assert len(labels) == len(data.train) == 12 and labels[1] == labels[2] == 0
    with pytest.raises(IndexError, match="index 12 out of range for 12 images"):
        data.train[12]
    assert [int(e["label"]) for e in data.train[-3:]] == labels[-3:] and data.train[5:2] == []


def test_strict_stops_in_one_line_when_the_image_is_read(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", classes=[f"c{i}" for i in range(10)], per_class=1)
    bomb_png(root / "val" / "c3" / "0.png")
    data = load_dataset("folder", root, strict=True, image_size=16)
    with pytest.raises(UnreadableImage, match="c3/0.png: unreadable image .*DecompressionBombError"):
        list(eval_batches(data.eval, data.preprocess, global_batch=4))
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--weights", str(weights), "--dataset", "folder", "--data-dir", str(root),
                  "--image-size", "16", "--strict", "--batch-size", "4"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1
    assert "c3/0.png: unreadable image (DecompressionBombError" in lines[0]


def test_predict_lists_skipped_files_and_fails_on_nothing(tmp_path, capsys):
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    folder = tmp_path / "photos"
    folder.mkdir()
    bomb_png(folder / "bomb.png")
    (folder / "empty.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--weights", str(weights), str(folder), "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [(os.path.basename(r["file"]), r["skipped"].split(" (")[0]) for r in results] == [
        ("bomb.png", "unreadable image"), ("empty.jpg", "unreadable image")]
    assert "DecompressionBombError" in results[0]["skipped"]
    errors = [l for l in captured.err.splitlines() if not l.startswith("warning:")]
    assert exit_info.value.code == 1 and len(errors) == 1 and "none of the 2 image(s)" in errors[0]
    assert "bomb.png: unreadable image, skipped (DecompressionBombError" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--weights", str(weights), str(folder), "--strict", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1 and "bomb.png: unreadable image (Decomp" in lines[0]
    Image.new("RGB", (50, 40), (200, 10, 10)).save(folder / "good.jpg")
    cli.main(["predict", "--weights", str(weights), str(folder), "--json", "--top", "2"])
    results = json.loads(capsys.readouterr().out)
    assert [sorted(r) for r in results] == [["file", "skipped"], ["file", "skipped"], ["file", "top"]]
    assert len(results[2]["top"]) == 2


@pytest.mark.timeout(120)  # a FIFO read as a file waits for a writer forever
def test_a_fifo_or_a_broken_link_in_a_class_folder_is_skipped_not_waited_on(tmp_path, caplog):
    root = write_image_folder(tmp_path / "imgs")
    os.mkfifo(root / "train" / "cat" / "0.jpg.pipe.jpg")
    (root / "train" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    data = load_dataset("folder", root, image_size=16)
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        batches = list(train_batches(data.train, data.augment, seed=0, epoch=0, global_batch=7))
    assert sum(int(b["skipped"].sum()) for b in batches) == 2
    assert "0.jpg.pipe.jpg: unreadable image, skipped (not a regular file: a FIFO)" in caplog.text
    assert f"gone.png: unreadable image, skipped (broken link to {tmp_path / 'nowhere.png'}: No such file" in caplog.text


def test_unreadable_images_are_warned_once_whatever_the_workers(tmp_path, caplog, capfd):
    """Two epochs and two evaluations, each in two fresh worker processes: one warning per bad
    file, from this process (the workers' own would repeat in each worker and epoch)."""
    root = write_image_folder(tmp_path / "imgs")
    break_two(root)
    data = load_dataset("folder", root, image_size=16)
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        for epoch in (0, 1):
            batches = list(train_batches(data.train, data.augment, seed=0, epoch=epoch, global_batch=4, workers=2))
            list(eval_batches(data.eval, data.preprocess, global_batch=8, workers=2))
    said = caplog.text + capfd.readouterr().err
    assert said.count("cat/1.jpg: unreadable image") == 1 and said.count("dog/2.png: unreadable image") == 1, said
    assert sum(int(b["skipped"].sum()) for b in batches) == 1 and "unreadable" not in batches[0]


def test_workers_give_the_same_batches(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    data = load_dataset("folder", root, image_size=16)

    def batches(workers):
        return list(train_batches(data.train, data.augment, seed=4, epoch=1, global_batch=4, workers=workers))

    for a, b in zip(batches(0), batches(2), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_train_cli_with_workers(tmp_path):
    """The issue's command, on a tiny model (--init-from) so that compiling stays cheap."""
    root = write_image_folder(tmp_path / "imgs")
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    output = train(tmp_path / "run", "--dataset", "folder", "--data-dir", str(root), "--workers", "2",
                   "--init-from", str(weights), "--image-size", "16", "--batch-size", "4", "--epochs", "1")
    assert "flags were parsed" not in output and "Traceback" not in output
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"])
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("name, place, status", [("sigint", "data", 130), ("sigint", "data-starting", 130),
                                                 ("sigterm", "data-request", 143)])
def test_a_stop_sent_to_the_whole_process_group_with_workers_checkpoints(tmp_path, name, place, status):
    """A terminal's Ctrl-C (SIGINT) or a scheduler's SIGTERM reaches the data workers too: the run
    still checkpoints the last completed step and exits as a stopped command, in one line. SIGINT
    just after the workers started (they ignore it); SIGTERM as the second batch is asked for (it
    ends the workers, and the batch never comes). SIGINT while the workers start, too: this process
    ignores it only until they exist."""
    root = write_image_folder(tmp_path / "imgs")
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    output = train(tmp_path / "run", "--dataset", "folder", "--data-dir", str(root), "--workers", "2",
                   "--init-from", str(weights), "--image-size", "16", "--batch-size", "4", "--epochs", "2",
                   fault=(f"{name}-group@{place}", {"data": 1, "data-starting": 1, "data-request": 2}[place]),
                   expect=status)
    step = {"data": 0, "data-starting": 0, "data-request": 1}[place]
    assert f"stopped by {name.upper()} at step {step}, checkpoint saved" in output, output[-2000:]
    assert "Traceback" not in output and "terminated unexpectedly" not in output, output[-2000:]
    assert output.rstrip().endswith("run the same command again to resume"), output[-2000:]  # nothing after it
    assert (tmp_path / "run" / "checkpoints" / str(step)).is_dir()


def test_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION
    assert set(IMG_EXTENSIONS) == set(TORCHVISION)


def test_a_folder_of_only_unreadable_images_is_an_error_when_read(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    for path in (root / "train").rglob("*.jpg"):
        path.write_bytes(b"")
    data = load_dataset("folder", root)
    with pytest.raises(DataError, match=f"{root / 'train'}: none of its 3 images is readable"):
        data.train[0]


def test_one_channel_reading(tmp_path):
    """in_chans=1: files read as "L" and normalised by the average ImageNet mean and std, as timm's
    in_chans=1 preprocessing: mean (0.485 + 0.456 + 0.406) / 3, std (0.229 + 0.224 + 0.225) / 3;
    torchvision's Resize, CenterCrop, ToTensor and Normalize on the same random-pixel images."""
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    data = load_dataset("folder", root, image_size=16, in_chans=1)
    batch = next(train_batches(data.train, data.augment, seed=0, epoch=0, global_batch=3))
    assert batch["image"].shape == (3, 16, 16, 1)
    reference = TT.Compose([TT.Resize(18), TT.CenterCrop(16), TT.ToTensor(),
                            TT.Normalize((sum((0.485, 0.456, 0.406)) / 3,), (sum((0.229, 0.224, 0.225)) / 3,))])
    for i, path in enumerate(data.eval.paths):
        evaluated = data.preprocess(data.eval[i])["image"]
        assert evaluated.shape == (16, 16, 1)
        np.testing.assert_array_equal(evaluated, reference(Image.open(path).convert("L")).numpy().transpose(1, 2, 0))

"""Mistakes a new user made while trying the README (a review of this round's work): each is
refused in one line, and none of them deletes or claims anything of the user's."""

import json

import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.errors import CheckpointError, WorkdirError
from densenet_jax.files import atomic_write_bytes, write_folder
from densenet_jax.train.workdir import FILE, check
from densenet_jax.train import TrainConfig
from densenet_jax.train.loop import Run
from fixtures import tiny_weights_file


def test_export_force_never_deletes_a_folder_of_other_files(tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    files = {"config.json": b"{}", "model.safetensors": b"x"}
    with pytest.raises(CheckpointError, match=r"victim: holds keep.txt and 1 more, not only config.json"):
        write_folder(victim, files, force=True)
    assert (victim / "keep.txt").read_text() == "precious" and (victim / "sub").is_dir()
    earlier = tmp_path / "earlier"  # an earlier export is what --force replaces
    write_folder(earlier, {"config.json": b"old"})
    write_folder(earlier, files, force=True)
    assert sorted(p.name for p in earlier.iterdir()) == sorted(files)


def test_a_folder_in_the_way_of_a_file_output_is_one_line(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match=r"out: is a folder; name a file to write"):
        atomic_write_bytes(tmp_path / "out", b"x")
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    (tmp_path / "v4").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--weights", str(weights), "--format", "stablehlo", "--image-size", "16",
                  "--force", str(tmp_path / "v4")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and lines == [f"densenet-jax: error: {tmp_path / 'v4'}: is a folder; "
                                                   "name a file to write"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.safetensors", "v4"]  # no temporary left


@pytest.mark.parametrize("command", [["predict", "--batch-size", "0"], ["predict", "--top", "0"],
                                     ["predict", "--crop", "0"], ["evaluate", "--batch-size", "0"]])
def test_counts_below_one_are_one_line(tmp_path, capsys, command):
    weights = tiny_weights_file(tmp_path / "tiny.safetensors")
    extra = [str(tmp_path)] if command[0] == "predict" else []
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--weights", str(weights), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and lines == [f"densenet-jax: error: {command[1]} 0: must be at least 1"]


def test_images_too_small_are_refused_before_the_work_directory_is_touched(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"images of 8x8 are too small for densenet121: at least 29x29"):
        Run(TrainConfig(model="densenet121", dataset="digits", workdir=str(workdir))).fit()
    assert not workdir.exists()


@pytest.mark.parametrize("where, message", [("afile", "is a file"), ("afile/sub/run", "lies under")])
def test_a_workdir_that_cannot_be_a_folder_is_one_line(tmp_path, where, message):
    """A --workdir that is a file, or lies under one, is refused before any work, naming it."""
    (tmp_path / "afile").write_text("mine")
    workdir = tmp_path / where
    with pytest.raises(WorkdirError, match=f"^--workdir {workdir}: {message}"):
        Run(TrainConfig(model="densenet_bc_16_k12", workdir=str(workdir)))
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_run_that_never_checkpointed_does_not_claim_its_folder(tmp_path):
    record = {"identity": {"batch_size": 8}, "optimizer": {}}
    (tmp_path / FILE).write_text(json.dumps({"identity": {"batch_size": 16}, "optimizer": {}}))
    check(tmp_path, record, has_checkpoints=False)  # nothing trained there: the new run takes it
    with pytest.raises(WorkdirError, match=r"belongs to another run \(--batch-size 16 there, 8 here\)"):
        check(tmp_path, record, has_checkpoints=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(WorkdirError, match="belongs to another run"):
        check(tmp_path, record, has_checkpoints=False)


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1, err
    return err[0]


def test_a_new_users_small_mistakes_are_named_for_what_they_are(tmp_path, capsys):
    """--data-dir naming a file is a file, not a missing folder; a text file named .pth is not
    called a torch pickle; dj.predict refuses top_k 0 as the command refuses --top 0."""
    (tmp_path / "data.txt").write_text("not a folder")
    line = one_line_error(["train", "--dataset", "folder", "--data-dir", tmp_path / "data.txt"], capsys)
    assert f"--data-dir {tmp_path / 'data.txt'}: is a file, not a folder" in line, line
    (tmp_path / "notes.pth").write_text("hi\n")
    line = one_line_error(["convert", tmp_path / "notes.pth", tmp_path / "out.safetensors"], capsys)
    assert "not a loadable torch checkpoint or safetensors file" in line and "pickle;" not in line, line
    model = dj.create_model("densenet_bc_16_k12", num_classes=3)
    with pytest.raises(ValueError, match="top_k 0: must be at least 1"):
        dj.predict(model, tmp_path, top_k=0)
    assert "--top 0" in one_line_error(["predict", "--weights", "w.safetensors", "--top", "0", "x.png"], capsys)

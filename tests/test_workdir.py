"""A work directory belongs to one run: another configuration is refused (never called damaged,
never moved), a finished run is left as it is, and each model and data set gets its own folder."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.errors import WorkdirError
from densenet_jax.model.registry import get_config
from densenet_jax.data import load_dataset
from densenet_jax.train.workdir import check, default_workdir, describe, write
from densenet_jax.train import TrainConfig
from densenet_jax.train.loop import Run
from densenet_jax.weights.format import read_safetensors
from fixtures import write_cifar10


def assert_same_arrays(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its modification time and bytes."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_left_as_it_is(tmp_path, tiny_weights, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = ["train", "--init-from", str(tiny_weights), "--epochs", "1", "--batch-size", "64",
               "--schedule", "constant", "--seed", "3", "--no-progress"]  # conftest's tiny_run
    cli.main(command)
    workdir = tmp_path / "runs" / "tiny-digits"  # the default: runs/<model>-<dataset>
    assert {"best.safetensors", "metrics.jsonl", "model.safetensors", "run.json"} <= {
        p.name for p in workdir.iterdir()}
    before = snapshot(workdir)
    epoch1 = read_safetensors(workdir / "model.safetensors")[0]
    assert_same_arrays(read_safetensors(workdir / "best.safetensors")[0], epoch1)  # the best is the last
    capsys.readouterr()

    cli.main(command)  # the same command again: complete, exit status 0, nothing rewritten
    said = capsys.readouterr().err
    assert "complete at step 22 (22 asked for)" in said and "work directory: runs/tiny-digits; complete at step 22\n" in said
    assert "resuming" not in said and snapshot(workdir) == before

    with pytest.raises(SystemExit) as stopped:  # another batch size: another run
        cli.main([*command, "--batch-size", "32"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another run (--batch-size 64 there, 32 here)" in err[0], err
    assert "pass another --workdir" in err[0]
    assert snapshot(workdir) == before

    # The optimiser's settings may change: more epochs go on, here at a rate that spoils them.
    cli.main([*command, "--epochs", "2", "--lr", "2"])
    out, err = capsys.readouterr()
    assert "changed settings (--epochs 1 there, 2 here" in err and "at step 22" in err
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [22, 44] and rows[1]["eval_acc"] < rows[0]["eval_acc"]
    assert f"(best {rows[0]['eval_acc']:.4f} at epoch 1)" in out, out  # the summary names the best file's epoch
    assert_same_arrays(read_safetensors(workdir / "best.safetensors")[0], epoch1)  # the best epoch's weights

    # Fewer epochs than the run has done: nothing to do, and nothing rewritten (run.json still
    # records the 2 epochs that trained, or the next --epochs 2 would be called a change).
    # Its --epochs differs from the record's, yet nothing continues: no "continuing with changed settings".
    before = snapshot(workdir)
    cli.main(command)
    said = capsys.readouterr().err
    assert "at step 44, past the 22 steps asked for; nothing to do" in said and snapshot(workdir) == before
    assert "changed settings" not in said


def test_fewer_epochs_than_an_unfinished_run_has_done_leave_it_as_it_is(tmp_path, tiny_run, caplog):
    """An unfinished run (stopped in its second epoch, or at its end before the evaluation) rerun
    with --epochs 1 is past the steps asked for but not complete: nothing is written (no final
    weights from the middle of an epoch, no evaluation), nothing removed (the partial epoch's
    record), and it says so; its own --epochs then resumes it as if never asked."""
    for stop_at in (30, 44):  # 22 steps an epoch: inside epoch 2, and at its end
        workdir = tmp_path / str(stop_at)
        Run(tiny_run(workdir, epochs=3, max_steps=stop_at)).fit()
        if stop_at == 44:
            (workdir / "metrics.jsonl").write_text((workdir / "metrics.jsonl").read_text().splitlines()[0] + "\n")
        before = snapshot(workdir)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="densenet_jax"):
            Run(tiny_run(workdir, epochs=1)).fit()
        assert snapshot(workdir) == before and not (workdir / "model.safetensors").exists()
        said = caplog.text
        assert f"at step {stop_at}, past the 22 steps asked for; nothing to do, nothing written" in said, said
        assert "complete at step" not in said and "changed settings" not in said
    with caplog.at_level(logging.INFO, logger="densenet_jax"):
        Run(tiny_run(workdir, epochs=3, max_steps=1)).fit()
    assert "no record of the steps" not in caplog.text and "evaluating epoch 2" in caplog.text


def test_another_configuration_is_refused_and_never_called_damaged(tmp_path, tiny_run):
    workdir = tmp_path / "run"
    config = tiny_run(workdir, max_steps=1)
    Run(config).fit()
    wider = tmp_path / "wider.safetensors"
    dj.save(dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), growth_rate=8,
                            num_classes=10, rngs=nnx.Rngs(0)), wider)
    other = dataclasses.replace(config, init_from=str(wider))
    before = snapshot(workdir)
    with pytest.raises(WorkdirError, match=r"--init-from tiny.safetensors \(sha256 \w+\) there, "
                                           r"wider.safetensors \(sha256 \w+\) here; "
                                           r"architecture growth_rate 6 there, 8 here\)"):
        Run(other).fit()
    # Another data set of as many classes gives the same shapes: only the record tells.
    cifar = write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(WorkdirError, match=r"--dataset digits there, cifar10 here; "
                                           r"training examples 1437 there, 100 here; "):
        Run(dataclasses.replace(config, dataset="cifar10", data_dir=str(cifar))).fit()
    assert snapshot(workdir) == before

    # A folder of an older version has no run.json: the checkpoint's array shapes tell, before any
    # restore could call it damaged.
    (workdir / "run.json").unlink()
    before = snapshot(workdir)
    with pytest.raises(WorkdirError, match=r"checkpoints/1: written by another configuration "
                                           r"\(\S+ float32\([\d, ]+\) there, float32\([\d, ]+\) here; "
                                           r"\d+ arrays differ\)"):
        Run(other).fit()
    assert snapshot(workdir) == before
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]  # none "damaged"

    assert Run(dataclasses.replace(config, max_steps=0)).fit()["step"] == 22  # its own run goes on


def test_results_nothing_accounts_for_are_not_overwritten(tmp_path, tiny_run):
    workdir = tmp_path / "old"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"epoch": 1, "eval_acc": 0.99}\n')
    (workdir / "best.safetensors").write_bytes(b"weights")
    config = tiny_run(workdir)
    before = snapshot(workdir)
    with pytest.raises(WorkdirError, match=r"old: holds results of an earlier run \(metrics.jsonl, "
                                           r"best.safetensors\) but no run.json or checkpoint"):
        Run(config).fit()
    (workdir / "run.json").write_text("{not json")
    with pytest.raises(WorkdirError, match=r"run.json: unreadable"):
        Run(config).fit()
    assert sorted(p.name for p in workdir.iterdir()) == ["best.safetensors", "metrics.jsonl", "run.json"]
    assert {k: v for k, v in snapshot(workdir).items() if k != "run.json"} == before


def test_the_default_workdir_names_model_and_data_set():
    assert default_workdir("densenet121", "cifar10") == "runs/densenet121-cifar10"
    assert default_workdir("densenet_40_k12", "digits") == "runs/densenet_40_k12-digits"
    assert default_workdir("densenet_40_k12", "folder", init_from="w/densenet121.tv_in1k.safetensors",
                           data_dir="~/data/flowers/") == "runs/densenet121.tv_in1k-flowers"


def test_each_difference_is_named_once(tmp_path):
    data = load_dataset("digits")

    def record(model, **options):
        return describe(TrainConfig(model=model, **options), get_config(model, num_classes=10), data)

    write(tmp_path, record("densenet_40_k12"))
    # Another model: named by --model, not field by field; several differences in one line.
    with pytest.raises(WorkdirError, match=r"another run \(--model densenet_40_k12 there, "
                                           r"densenet_bc_100_k12 here; --precision fp32 there, bf16 "
                                           r"here; --seed 0 there, 1 here\)"):
        check(tmp_path, record("densenet_bc_100_k12", precision="bf16", seed=1), has_checkpoints=True)
    # What only steers an invocation is not recorded.
    check(tmp_path, record("densenet_40_k12", max_steps=5, workers=2, keep=1, checkpoint_every=7,
                           memory_efficient=True, progress=False, workdir="elsewhere"), has_checkpoints=True)
    # Settings held together are named one by one: only the augmentation options that differ.
    write(tmp_path, record("densenet_40_k12", color_jitter=0.4, reprob=0.25))
    with pytest.raises(WorkdirError, match=r"another run \(--color-jitter 0.4 there, 0.3 here\); "):
        check(tmp_path, record("densenet_40_k12", color_jitter=0.3, reprob=0.25), has_checkpoints=True)
    # A run at their defaults records none, and is still not the run that set them.
    with pytest.raises(WorkdirError, match=r"another run \(--color-jitter 0.4 there, default here; "
                                           r"--reprob 0.25 there, default here\); "):
        check(tmp_path, record("densenet_40_k12"), has_checkpoints=True)


# Paths no run can use, root included (root ignores permissions, not these): a file, a path under
# a file, a new run in a folder that takes no files (/proc), and an existing folder where no file
# can be made (sysfs refuses it even to root).
UNUSABLE = {"a file": ("file", "is a file"), "under a file": ("file/run", "lies under"),
            "new run where nothing can be made": ("/proc/densenet-jax-run", "cannot write there (in /proc"),
            "existing folder where nothing can be made": ("/sys/kernel", "cannot write there: ")}


@pytest.mark.parametrize("case", UNUSABLE)
def test_a_workdir_that_cannot_be_used_is_one_line_naming_it(case, tmp_path, tiny_weights, capsys):
    where, fragment = UNUSABLE[case]
    (tmp_path / "file").write_text("the user's")
    workdir = tmp_path / where
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--init-from", str(tiny_weights), "--dataset", "digits", "--workdir", str(workdir),
                  "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1, err
    assert f"--workdir {workdir}: " in err[0] and fragment in err[0], err[0]
    assert (tmp_path / "file").read_text() == "the user's" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]

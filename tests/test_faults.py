"""Training survives faults: killed, interrupted, damaged on disk, diverged (faults.py injects them)."""

import re
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import faults
from densenet_jax.errors import DiskFullError, Interrupted
from densenet_jax.files import disk_of
from densenet_jax.train.checkpoint import Checkpoints
from densenet_jax.train.loop import Run
from densenet_jax.train.report import read_metrics
from densenet_jax.train.signals import StopSignals
from train_cli import RUN, assert_same_weights, train


def complete_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def resumed_from(out: str) -> int:
    found = re.search(r"resuming from .* at step (\d+)", out)
    return int(found.group(1)) if found else 0


def stored_state(workdir: Path, step: int):
    checkpoints = Checkpoints(workdir / "checkpoints")
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        return checkpoints.manager.restore(step, args=args)["state"]
    finally:
        checkpoints.close()


def damage(step_dir: Path) -> None:
    """Overwrite the middle of the checkpoint's largest file with random bytes."""
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = np.random.default_rng(0).bytes(len(data[middle:middle + 4096]))
    largest.write_bytes(bytes(data))


def test_killed_interrupted_and_damaged_runs_end_as_the_uninterrupted_one(tmp_path, uninterrupted):
    run = tmp_path / "run"
    # SIGKILL while the 4th step computes (checkpoints 2 and 3 were started before it).
    train(run, *RUN, fault=("step", 4), expect=-signal.SIGKILL)
    before = complete_steps(run)
    assert before and before[-1] <= 3

    # SIGKILL just after a checkpoint save began, then inside one before its commit: each rerun
    # resumes from the newest complete checkpoint, and the half-written one never counts.
    for point in ("save", "commit"):
        before = complete_steps(run)
        train(run, *RUN, fault=(point, 1), expect=-signal.SIGKILL)
        assert complete_steps(run) == before, point
        if point == "commit":
            assert any("tmp" in p.name for p in (run / "checkpoints").iterdir())  # killed mid-save

    # SIGTERM (a scheduler's stop) checkpoints the step it was in and exits as a stopped command
    # (SIGINT: in this process at every place below, and to a process group in test_folder.py).
    before = complete_steps(run)[-1]
    err = train(run, *RUN, fault=("sigterm", 1), expect=143)
    assert resumed_from(err) == before
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+), checkpoint saved", err).group(1))
    assert stopped == before + 1 and complete_steps(run)[-1] == stopped
    assert "Traceback" not in err

    # The newest checkpoint damaged on disk: found, moved aside, the previous one used.
    *_, previous, newest = complete_steps(run)
    damage(run / "checkpoints" / str(newest))
    out = train(run, *RUN)
    assert f"checkpoints/{newest}:" in out and "moving it to damaged" in out
    assert resumed_from(out) == previous
    assert (run / "checkpoints" / f"damaged-{newest}").is_dir()
    assert_same_weights(run, uninterrupted)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    err = train(run, "--epochs", "2", "--checkpoint-every", "1", fault=("nan", 3), expect=1)
    line = [l for l in err.splitlines() if "error" in l]
    assert len(line) == 1 and "gradient norm nan at step 3" in line[0], err
    assert "last good checkpoint is step 2" in line[0]
    assert complete_steps(run) == [1, 2]
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(stored_state(run, 2)))
    assert not (run / "model.safetensors").exists()


@pytest.fixture(scope="module")
def every_step(tmp_path_factory, tiny_run):
    """The uninterrupted tiny run's workdir, a checkpoint at each of its 22 steps."""
    workdir = tmp_path_factory.mktemp("every-step")
    Run(tiny_run(workdir, checkpoint_every=1, keep=30)).fit()
    return workdir


# (place, its nth occurrence, the last completed step there): a signal while the 2nd batch is
# awaited stops after step 1; one during the 1st device wait or metric fetch (steps 1-10 read
# together at step 10) stops at 10, where no checkpoint was due; evaluation comes at the epoch's
# end (22); the 1st checkpoint write is step 4's with --checkpoint-every 4. "-lost": the signal
# also ended the data workers (a SIGTERM to the process group), so the batch asked for never comes.
PLACES = [("data", 2, 1), ("dispatch", 2, 2), ("device", 1, 10), ("fetch", 1, 10), ("eval", 1, 22),
          ("save", 1, 4), ("data-lost", 2, 1), ("eval-lost", 1, 22)]


@pytest.mark.parametrize("place, n, step", PLACES, ids=[p[0] for p in PLACES])
def test_a_stop_anywhere_checkpoints_the_last_completed_step(place, n, step, tmp_path, tiny_run,
                                                             every_step, monkeypatch):
    faults.inject(f"sigint@{place}", n, patch=monkeypatch.setattr)
    run = Run(tiny_run(tmp_path, checkpoint_every=4 if place == "save" else 0))
    with pytest.raises(Interrupted, match=rf"stopped by SIGINT at step {step}, checkpoint saved"):
        run.fit()
    assert complete_steps(tmp_path)[-1] == step
    # That checkpoint is the state after exactly that many steps.
    got, expected = stored_state(tmp_path, step), stored_state(every_step, step)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_stop_during_the_first_compilation_says_what_it_waits_for(tmp_path, tiny_run, monkeypatch,
                                                                    caplog):
    faults.inject("sigint@compile", 1, patch=monkeypatch.setattr)
    with pytest.raises(Interrupted, match="at step 1, checkpoint saved"):
        Run(tiny_run(tmp_path)).fit()
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SIGINT")]
    assert "after the first step, once compiled" in said and "Ctrl-C again stops now" in said, said


class Killed(BaseException):
    """A kill in the middle of a function: nothing after it in the process runs (but the
    ``finally`` that lets the checkpoint already being written finish, as Orbax's own thread would)."""


def killed(*_args, **_kwargs):
    raise Killed


@pytest.mark.parametrize("stop", ["sigterm@eval-lost", "kill"])
def test_a_resume_at_an_epochs_end_records_its_missing_evaluation(stop, tmp_path, tiny_run, every_step,
                                                                  monkeypatch):
    """A stop or a kill during the evaluation that ends an epoch (a kill once --checkpoint-every
    saved the epoch's last step) leaves the epoch without its row; the resume evaluates it: the
    row an uninterrupted run writes, its curves and its best.safetensors."""
    if stop == "kill":
        monkeypatch.setattr(Run, "evaluate", killed)
    else:
        faults.inject(stop, 1, patch=monkeypatch.setattr)
    with pytest.raises((Interrupted, Killed)):
        Run(tiny_run(tmp_path, checkpoint_every=22 if stop == "kill" else 0)).fit()
    assert complete_steps(tmp_path) == [22] and not (tmp_path / "metrics.jsonl").exists()
    monkeypatch.undo()
    Run(tiny_run(tmp_path)).fit()
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    (expected,) = read_metrics(every_step / "metrics.jsonl")
    for key in ("epoch", "step", "train_loss", "train_acc", "eval_loss", "eval_acc"):
        assert row[key] == pytest.approx(expected[key], rel=1e-6), key
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "best.safetensors").is_file()


# As TensorStore reports a full disk under Orbax (what a 300 KiB tmpfs work directory gave).
DISK_FULL = ValueError("RESOURCE_EXHAUSTED: Error writing \"params/0\" in OCDBT database: Failed to write "
                       "262117 bytes to file 13: No space left on device [os_error_code='28']")


def test_a_full_disk_is_one_line_and_the_resume_after_freeing_space_ends_as_uninterrupted(
        tmp_path, tiny_run, every_step, monkeypatch):
    def full(*_args, **_kwargs):
        raise DISK_FULL
    monkeypatch.setattr(Checkpoints, "save", faults.on_nth(2, Checkpoints.save, full, before=True))
    with pytest.raises(DiskFullError) as refused:
        Run(tiny_run(tmp_path, checkpoint_every=10)).fit()
    assert str(refused.value) == (f"{tmp_path}: the disk holding it is full ({disk_of(tmp_path)}); kept the "
                                  "checkpoint of step 10 and the results up to it; free space there and run "
                                  "the same command again to resume")
    monkeypatch.undo()  # space freed
    Run(tiny_run(tmp_path, checkpoint_every=10)).fit()
    for a, b in zip(jax.tree.leaves(stored_state(tmp_path, 22)), jax.tree.leaves(stored_state(every_step, 22)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_second_signal_stops_at_once():
    with StopSignals() as signals:
        faults.send(signal.SIGTERM)()
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            faults.send(signal.SIGINT)()

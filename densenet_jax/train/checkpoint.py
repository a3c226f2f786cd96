"""Orbax checkpoints of the whole training state: asynchronous, atomic, checksummed, the last K kept.

A step folder appears only once completely written (Orbax writes a temporary folder and renames
it), so a process killed mid-save leaves the previous checkpoints as they were. A checkpoint damaged
later on disk is caught by a CRC-32 of every array stored beside it; resuming then moves it aside
and falls back to the one before. A checkpoint whose recorded array names, shapes or dtypes differ
from the model's was written by another configuration, not damaged: that stops the run
(WorkdirError) and nothing is moved.
"""

from __future__ import annotations

import logging
import shutil
import zlib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from densenet_jax.errors import CheckpointError, WorkdirError
from densenet_jax.train.workdir import OR_CONTINUE
from densenet_jax.train.step import TrainState

log = logging.getLogger("densenet_jax")


def checksums(host_state: TrainState) -> dict[str, int]:
    """CRC-32 of each array's bytes, by its path in the state."""
    leaves = jax.tree_util.tree_leaves_with_path(host_state)
    return {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(leaf).view(np.uint8))
            for path, leaf in leaves}


def layout(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype name) of each array, by its dotted path (``params.classifier.kernel``), the
    naming Orbax's metadata uses; works on arrays and on Orbax's ArrayMetadata alike."""
    def name(path):
        return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return {name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def has_checkpoints(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete checkpoint (a step folder), without creating it."""
    directory = Path(directory)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


class Checkpoints:
    """``directory/<step>/`` holding the state and its checksums."""

    def __init__(self, directory: str | Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                               create=True, cleanup_tmp_directories=True)
        self.directory = Path(directory).absolute()
        # Handlers named up front, so that a checkpoint's metadata can be read without restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest checkpoint's step (saves in flight included), or None."""
        return self.manager.latest_step()

    def save(self, step: int, host_state: TrainState) -> None:
        """Start writing ``host_state`` (numpy arrays) in the background."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                  checksums=ocp.args.JsonSave(checksums(host_state)))
        self.manager.save(step, args=args, force=True)

    def restore(self, template: TrainState, step: int) -> TrainState:
        """The state saved at ``step``, shaped like ``template``; CheckpointError if it is damaged."""
        where = self.directory / str(step)
        self._check_layout(template, step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template), checksums=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax and TensorStore raise many types for unreadable files
            raise CheckpointError(f"{where}: unreadable ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        state, expected = restored["state"], restored["checksums"]
        for key, crc in checksums(state).items():
            if expected.get(key) != crc:
                raise CheckpointError(f"{where}: {key} does not match its checksum")
        return state

    def _check_layout(self, template: TrainState, step: int) -> None:
        """WorkdirError when the checkpoint at ``step`` holds other arrays than ``template``;
        CheckpointError when its metadata cannot be read (damage)."""
        where = self.directory / str(step)
        try:
            stored = layout(self.manager.item_metadata(step)["state"])
        except Exception as e:  # Orbax raises many types for unreadable metadata
            raise CheckpointError(f"{where}: unreadable metadata ({type(e).__name__})") from None
        expected = layout(template)
        if stored == expected:
            return
        differ = [f"{k} {_shown(stored.get(k))} there, {_shown(expected.get(k))} here"
                  for k in sorted(stored.keys() | expected.keys()) if stored.get(k) != expected.get(k)]
        raise WorkdirError(f"{where}: written by another configuration ({differ[0]}; {len(differ)} "
                           f"arrays differ); {OR_CONTINUE}")

    def restore_latest_good(self, template: TrainState) -> tuple[TrainState, int] | None:
        """The newest checkpoint that reads back intact, and its step; damaged newer ones are moved
        to ``damaged-<step>`` with a warning. None when there is no checkpoint at all. A checkpoint of
        another configuration raises WorkdirError at once: it is not damage, so nothing is moved."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return self.restore(template, step), step
            except CheckpointError as e:
                log.warning("warning: %s; moving it to damaged-%d and trying the previous checkpoint", e, step)
                self._move_aside(step)
        if steps:
            raise CheckpointError(f"{self.directory}: every checkpoint is damaged ({len(steps)} tried); "
                                  "pass another --workdir to start a new run")
        return None

    def _move_aside(self, step: int) -> None:
        target = self.directory / f"damaged-{step}"
        shutil.rmtree(target, ignore_errors=True)
        try:
            (self.directory / str(step)).rename(target)
        except FileNotFoundError:  # another process sharing the folder moved it first
            pass
        self.manager.reload()

    def close(self) -> None:
        """Wait for writes in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _shown(entry) -> str:
    """``float32(27, 10)``, or ``absent``."""
    return "absent" if entry is None else f"{entry[1]}{entry[0]}"

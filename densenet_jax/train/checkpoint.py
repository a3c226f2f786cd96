"""Orbax checkpoints of the whole training state: asynchronous, atomic, the last K kept."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from densenet_jax.train.step import TrainState


class Checkpoints:
    """``workdir/checkpoints/<step>/``; a step folder appears only once completely written."""

    def __init__(self, directory: str | Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                               create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, host_state: TrainState) -> None:
        """Start writing ``host_state`` (numpy arrays) in the background."""
        self.manager.save(step, args=ocp.args.StandardSave(host_state), force=True)

    def restore(self, template: TrainState, step: int | None = None) -> TrainState:
        """The state saved at ``step`` (default: the latest), shaped like ``template``."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.StandardRestore(template))

    def close(self) -> None:
        """Wait for writes in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

"""The exceptions a caller may want to tell apart; each message is one line naming what is at fault."""

import signal


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, damaged, or does not fit the model; the message
    names the file and the key or shape at fault."""


class WorkdirError(ValueError):
    """A work directory belongs to another run (its recorded configuration or its checkpoints'
    shapes differ), or holds results nothing says the origin of; the message names what differs
    and how to start a new run. Nothing in the folder was changed."""


class DiskFullError(ValueError):
    """The disk holding a run's work directory filled up while it wrote; the message names the
    disk, what was kept and how to resume (free space, run the same command again)."""


class DataError(ValueError):
    """A data set is missing, empty or unreadable; the message names the folder or file."""


class DivergedError(RuntimeError):
    """The training loss or gradients became NaN or Inf; nothing from that step on was checkpointed."""

    def __init__(self, step: int, loss: float, grad_norm: float, last_good: int | None = None):
        self.step, self.last_good = step, last_good
        kept = f"the last good checkpoint is step {last_good}" if last_good else "no checkpoint was written"
        super().__init__(f"training loss {loss}, gradient norm {grad_norm} at step {step}; stopped, "
                         f"{kept} (lower --lr, or check the data)")


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training at a step boundary, after its checkpoint was written."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, checkpoint saved; "
                         "run the same command again to resume")

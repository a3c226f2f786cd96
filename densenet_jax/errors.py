"""The one exception type for bad checkpoints, so callers can catch exactly that."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model; the message names the
    file and the key or shape at fault, on one line."""

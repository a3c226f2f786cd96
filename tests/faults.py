"""Run ``densenet-jax train`` with one fault injected at an exact point (the fault tests' launcher).

    python faults.py POINT N train ARGS...

POINT is where, on its Nth occurrence in this process:
  step    SIGKILL right after the train step is dispatched, while it computes
  save    SIGKILL right after a checkpoint save has started writing in the background
  commit  SIGKILL inside a checkpoint save, its files written, before Orbax renames them into place
  sigint, sigterm
          that signal, right after the train step is dispatched
  nan     the training batch holds a NaN
"""

import os
import signal
import sys

import numpy as np
import orbax.checkpoint._src.path.atomicity as atomicity

from densenet_jax import cli
from densenet_jax.train import parallel
from densenet_jax.train.checkpoint import Checkpoints


def on_nth(n: int, original, fault, before: bool = False):
    """``original`` wrapped so that its nth call also runs ``fault`` (before or after it)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == n:
            return fault(*args, **kwargs)
        result = original(*args, **kwargs)
        if calls[0] == n:
            fault(*args, **kwargs)
        return result
    return wrapped


def send(signum):
    def fault(*_args, **_kwargs):
        sys.stderr.flush()
        os.kill(os.getpid(), signum)
    return fault


def with_nan(self, images, *rest):
    images = np.array(images)
    images.flat[0] = np.nan
    return MESH_PLACE_BATCH(self, images, *rest)


MESH_PLACE_BATCH = parallel.Mesh.place_batch


def inject(point: str, n: int) -> None:
    if point in ("step", "sigint", "sigterm"):
        signum = {"step": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[point]
        parallel.Runner.train = on_nth(n, parallel.Runner.train, send(signum))
    elif point == "save":
        Checkpoints.save = on_nth(n, Checkpoints.save, send(signal.SIGKILL))
    elif point == "commit":
        cls = atomicity.AtomicRenameTemporaryPath
        finalize = cls.finalize

        async def killing_finalize(self):  # async: Orbax awaits it on its background thread
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            await finalize(self)
        calls = [0]
        cls.finalize = killing_finalize
    elif point == "nan":
        parallel.Mesh.place_batch = on_nth(n, MESH_PLACE_BATCH, with_nan, before=True)
    else:
        raise SystemExit(f"unknown fault point {point}")


if __name__ == "__main__":
    inject(sys.argv[1], int(sys.argv[2]))
    cli.main(sys.argv[3:])

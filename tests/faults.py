"""Run ``densenet-jax train`` with one fault injected at an exact point (the fault tests' launcher).

    python faults.py POINT N train ARGS...

POINT is where, on its Nth occurrence in this process:
  step    SIGKILL right after the train step is dispatched, while it computes
  save    SIGKILL right after a checkpoint save has started writing in the background
  commit  SIGKILL inside a checkpoint save, its files written, before Orbax renames them into place
  sigint, sigterm
          that signal, right after the train step is dispatched
  sigint@PLACE, sigterm@PLACE
          that signal at one of the places the training loop can be (in-process tests pass
          monkeypatch.setattr as ``patch``, so that the fault is undone after them):
            data      while it waits for the next batch (once it has come)
            data-request  as it asks the data pipeline for the next batch
            data-starting  half a second after the nth training pipeline was made (its data
                      workers start then)
            data-lost, eval-lost  as it asks for the next training (evaluation) batch, which then
                      never comes: the pipeline fails as when the signal ended its workers
            compile   just before a train step is dispatched (the 1st: while it compiles)
            dispatch  right after a train step is dispatched (the same as plain sigint)
            device    while it waits for the device, when it starts reading a step's metrics
            fetch     right after one step's metrics were read, others still unread
            eval      right after an evaluation batch is dispatched
            save      right after a checkpoint save has started writing in the background
  nan     the training batch holds a NaN

A ``-group`` after the signal's name (``sigint-group@data``) sends it to the whole process group,
data workers included, as a terminal's Ctrl-C or a scheduler's SIGTERM does (the launcher must
start the run in a session of its own).
"""

import os
import signal
import sys
import threading

import numpy as np
import orbax.checkpoint._src.path.atomicity as atomicity

from densenet_jax import cli
from densenet_jax.train import evaluate, loop, parallel
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


def send(signum, group: bool = False):
    def fault(*_args, **_kwargs):
        sys.stderr.flush()
        if group:
            os.killpg(os.getpgrp(), signum)
        else:
            os.kill(os.getpid(), signum)
    return fault


def with_nan(self, images, *rest):
    images = np.array(images)
    images.flat[0] = np.nan
    return MESH_PLACE_BATCH(self, images, *rest)


MESH_PLACE_BATCH = parallel.Mesh.place_batch


def before_it(fault, original):
    """``original`` with ``fault`` run just before it."""
    def both(*args, **kwargs):
        fault()
        return original(*args, **kwargs)
    return both


def waiting_for_data(n: int, fault, when: str = "come", module=loop, pipeline: str = "train_batches"):
    """``<module>.<pipeline>`` whose iterators, together, run ``fault`` inside their nth ``next``: once
    the batch has ``come``, as it is ``request``ed, or ``lost``: then the batch never comes, the
    pipeline failing as when its worker processes were ended (RuntimeError)."""
    calls, original = [0], getattr(module, pipeline)

    def batches(*args, **kwargs):
        it = original(*args, **kwargs)
        while True:
            calls[0] += 1
            if when != "come" and calls[0] == n:
                fault()
                if when == "lost":
                    raise RuntimeError("Worker process was terminated unexpectedly (faults.py)")
            batch = next(it, None)
            if batch is None:
                return
            if when == "come" and calls[0] == n:
                fault()
            yield batch
    return batches


def signal_at(place: str, signum: int, n: int, patch, group: bool = False) -> None:
    """``signum`` sent at the nth time the loop is at ``place`` (see the module's docstring)."""
    fault = send(signum, group)
    if place in ("data", "data-request", "data-lost"):
        when = {"data": "come", "data-request": "request", "data-lost": "lost"}[place]
        patch(loop, "train_batches", waiting_for_data(n, fault, when))
    elif place == "data-starting":  # half a second into the nth pipeline: its workers are starting
        patch(loop, "train_batches", on_nth(n, loop.train_batches, lambda *_a, **_k: threading.Timer(0.5, fault).start()))
    elif place == "eval-lost":
        patch(evaluate, "eval_batches", waiting_for_data(n, fault, "lost", evaluate, "eval_batches"))
    elif place == "compile":
        train = parallel.Runner.train
        patch(parallel.Runner, "train", on_nth(n, train, before_it(fault, train), before=True))
    elif place == "dispatch":
        patch(parallel.Runner, "train", on_nth(n, parallel.Runner.train, fault))
    elif place in ("device", "fetch"):  # a staticmethod: stays one when wrapped
        fetch = parallel.Runner.fetch
        wrapped = on_nth(n, fetch, before_it(fault, fetch), before=True) if place == "device" else \
            on_nth(n, fetch, fault)
        patch(parallel.Runner, "fetch", staticmethod(wrapped))
    elif place == "eval":
        patch(parallel.Runner, "eval", on_nth(n, parallel.Runner.eval, fault))
    elif place == "save":
        patch(Checkpoints, "save", on_nth(n, Checkpoints.save, fault))
    else:
        raise SystemExit(f"unknown place {place}")


def inject(point: str, n: int, patch=setattr) -> None:
    """Arrange the fault ``point`` (see the module's docstring) at its nth occurrence."""
    name, _, place = point.partition("@")
    name, group = name.removesuffix("-group"), name.endswith("-group")
    if name in ("sigint", "sigterm"):
        signal_at(place or "dispatch", {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[name], n, patch, group)
    elif point == "step":
        parallel.Runner.train = on_nth(n, parallel.Runner.train, send(signal.SIGKILL))
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

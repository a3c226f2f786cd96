"""Grain pipelines: deterministic for a seed, resumable at any step, sharded across hosts.

An epoch's order and augmentation depend only on (seed, epoch) and on an example's place in that
order, never on how many hosts read it: host h of H takes the h-th of the H equal, contiguous
parts of each global batch, so the H hosts' batches, placed one after another as the device mesh
orders them, are one host's global batch, example for example.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import signal
import threading
from typing import Callable, Iterator, Sequence

import grain
import numpy as np

from densenet_jax.data.dataset import Example
from densenet_jax.data.images import warn_unreadable


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def steps_per_epoch(num_examples: int, global_batch: int, process_count: int = 1) -> int:
    """Full global batches per epoch (the remainder is dropped, as torch's drop_last does)."""
    return (num_examples // process_count) // (global_batch // process_count)


def train_batches(source: Sequence[Example], augment: Callable[[Example, np.random.Generator], Example],
                  *, seed: int, epoch: int, global_batch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1, workers: int = 0,
                  mix: Callable[[Example, np.random.Generator], Example] | None = None) -> Iterator[Example]:
    """This host's share of each global training batch of ``epoch``, from ``start_step`` on.

    ``mix`` (mixup/CutMix) transforms each batch of this host in the workers, with a generator
    seeded by (seed, epoch, step), the same on every host and on a resumed run.

    A folder's batches also hold ``skipped`` (int32, 1 where an unreadable image's stand-in is):
    its sum is the number of images skipped in the batch. ``workers`` > 0 decodes in that many
    processes (started per call, stopped when the batches are dropped); the batches are the same."""
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by {process_count} hosts")
    epoch_seed = _epoch_seed(seed, epoch)
    if hasattr(source, "train_stream"):  # shards streamed (data.wds), not indexed
        return source.train_stream(augment, epoch_seed=epoch_seed, global_batch=global_batch,
                                   steps=steps_per_epoch(len(source), global_batch, process_count),
                                   start_step=start_step, process_index=process_index,
                                   process_count=process_count, workers=workers)
    ds = grain.MapDataset.source(source).shuffle(seed=epoch_seed).random_map(augment, seed=epoch_seed)
    steps = steps_per_epoch(len(source), global_batch, process_count)
    # Global batch k is this dataset's parts k*H .. k*H + H-1: this host's is part k*H + h.
    ds = ds[:steps * global_batch].batch(global_batch // process_count)[process_index::process_count]
    if mix is not None:  # a seed apart from the examples': batch k's draws are not example k's
        ds = ds.random_map(mix, seed=int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0]))
    return _iterate(ds[start_step:], workers)


def eval_batches(source: Sequence[Example], transform: Callable[[Example], Example], *,
                 global_batch: int, process_index: int = 0, process_count: int = 1,
                 workers: int = 0) -> Iterator[Example]:
    """Every example once, in order; the last batch is padded to full size, with a ``weight`` of 0
    on the padding, and on an unreadable image's stand-in (``skipped``), so that they count for
    nothing."""
    if hasattr(source, "eval_stream"):  # shards streamed (data.wds), not indexed
        return source.eval_stream(transform, global_batch=global_batch, process_index=process_index,
                                  process_count=process_count, workers=workers)
    per_host = global_batch // process_count
    ds = grain.MapDataset.source(_Padded(source, global_batch)).map(
        lambda ex: {**transform(ex["example"]),
                    "weight": ex["weight"] * np.float32(1 - ex["example"].get("skipped", 0))})
    return _iterate(ds[process_index::process_count].batch(per_host), workers)


class _Padded(Sequence):
    """``source`` repeated at its end up to a multiple of ``multiple``, with weights 1 then 0."""

    def __init__(self, source, multiple):
        self.source = source
        self.length = -(-len(source) // multiple) * multiple

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:  # also ends iteration, which the wrap-around would not
            raise IndexError(f"index {index} out of range for {self.length} padded examples")
        real = index < len(self.source)
        return {"example": self.source[index if real else index % len(self.source)],
                "weight": np.float32(real)}


def _iterate(ds: grain.MapDataset, workers: int) -> Iterator[Example]:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_start_worker)
    it = iter(it)
    try:
        first = _first_batch(it, workers)
        if first is not None:
            yield _warned(first)
            for batch in it:
                yield _warned(batch)
    finally:  # when the caller drops the batches: stop the worker processes, free their shared memory
        # A second Ctrl-C in the half second this takes left the workers half-stopped, with a
        # traceback; a stop is under way already.
        with _sigint_ignored(workers > 0):
            it.close()


def _warned(batch: Example) -> Example:
    """``batch`` without its ``unreadable`` field (a folder's), once this process has warned about
    the files it names: a worker process's warnings would repeat in every worker and epoch."""
    notes = batch.pop("unreadable", None)
    if notes is not None:
        warn_unreadable(notes)
    return batch


def _first_batch(it: Iterator[Example], workers: int) -> Example | None:
    """``next(it, None)``, with SIGINT ignored while Grain starts the ``workers`` processes
    (within the first batch, from threads of its own), so that they inherit that. A terminal's
    Ctrl-C goes to the whole process group: a worker that took it died with a traceback, where
    this process alone should take it, stop the workers and checkpoint. A process's handlers are
    not inherited, nor is a blocked signal mask; an ignored signal is. The first batch is awaited
    in a thread, so that this process ignores SIGINT only until the workers exist (milliseconds),
    not while they import (seconds), at every epoch and evaluation."""
    if not workers:
        return next(it, None)
    before = set(multiprocessing.active_children())
    outcome: dict = {}

    def first():
        try:
            outcome["batch"] = next(it, None)
        except BaseException as e:  # raised again in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=first, name="first batch", daemon=True)
    with _sigint_ignored(True):
        thread.start()
        while thread.is_alive() and len(set(multiprocessing.active_children()) - before) < workers:
            thread.join(0.005)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["batch"]


@contextlib.contextmanager
def _sigint_ignored(active: bool):
    """SIGINT ignored meanwhile; only from the main thread, the one that can set a handler
    (elsewhere nothing changes)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_worker(worker_index: int, worker_count: int) -> None:
    """Runs in each worker process once it has imported grain, jax and this package. Moves those
    objects out of the garbage collector's sight (``gc.freeze``): a worker's exit ran a full
    collection over them that took half a second, once per worker at every epoch's end. Silences
    this package's log: the main process warns about unreadable images, from the batches."""
    gc.freeze()
    logging.getLogger("densenet_jax").disabled = True


def _absl_flags_parsed() -> None:
    """Grain 0.2.18 reads its absl flag ``grain_enable_multiprocess_worker_profiling`` when it
    starts worker processes, which absl refuses before the flags are parsed (only ``absl.app.run``
    parses them). Marking them parsed leaves every flag at its default, as the run would have it;
    google/grain#1355, fixed by #1362 after 0.2.18, reads the default itself."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

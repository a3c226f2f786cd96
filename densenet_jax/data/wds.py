"""WebDataset tar shards (``--dataset wds/<shard pattern>``), read with the standard ``tarfile``.

A sample is the run of consecutive tar members sharing a key (the member name up to the first
dot of its file name), by WebDataset's convention: the image is its first member among
``IMAGE_KEYS`` (timm's, plus ``jpeg``), the label its ``cls`` member (an integer as text) or, with
a target key, that field of its ``json`` member.

Training, per epoch: the shard list is shuffled with the epoch's seed (the same on every host),
host h of H takes every H-th shard of it and streams them in that order (over again if they run
short of its share of the epoch, said once), through a shuffle buffer seeded by (seed, epoch,
host). Position i of a host's stream is decoded and augmented with a generator seeded by
(seed, epoch, host, i), so the batches depend on the seed and host alone, never on ``workers``;
an unreadable image's place is taken by the next readable one of the stream, as in a folder.
Resuming at a step streams the shards again to that position without decoding anything.
Evaluation: every host streams every shard in order and decodes every H-th sample, padded with
weight-0 stand-ins to whole global batches (the hosts must run as many evaluation steps).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import multiprocessing
import multiprocessing.pool
import re
import signal
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from densenet_jax.data.folder import image_dataset
from densenet_jax.data.images import STAND_IN, UnreadableImage, decode_image, warn_skipped
from densenet_jax.errors import DataError

log = logging.getLogger("densenet_jax")

PREFIX = "wds/"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples held by the training stream's shuffle buffer (encoded bytes)
_IN_FLIGHT = 2  # batches being decoded ahead of the one being used


def expand_braces(pattern: str) -> list[str]:
    """Every name ``pattern`` stands for, in order, as the ``braceexpand`` package (webdataset's)
    expands it: ``{000..127}`` a range (zero-padded to the width of its first bound; ``{3..1}``
    counts down), ``{a,b}`` a choice, several in one pattern."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def find_shards(pattern: str, data_dir: str | None = None) -> list[str]:
    """The shard files of ``pattern`` (relative ones under ``data_dir``, when given). DataError naming
    the pattern when it has none, or the first shard that is not there."""
    names = expand_braces(pattern)
    shards = [str(Path(data_dir or "", name).expanduser()) for name in names]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such shard ({len(missing)} of {len(shards)} of {pattern} missing)")
    return shards


def scan_shards(shards: list[str], target_key: str | None = None) -> tuple[int, int]:
    """(samples, largest label) of ``shards``, from their tar headers and label members alone
    (images are skipped, not read). DataError naming a shard that is no readable tar file."""
    decoder = Decoder(None, "RGB", target_key, None)
    label_ext = "cls" if target_key is None else "json"
    total, largest = 0, -1
    for shard in shards:
        keys = set()
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, ext = _split_name(member.name)
                    if member.isfile() and ext == label_ext:
                        sample = {ext: tar.extractfile(member).read()}
                        largest = max(largest, decoder.label(sample, f"{shard}:{key}"))
                    keys.add(key)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise _bad_shard(shard, e) from None
        total += len(keys)
    return total, largest


def _bad_shard(shard: str, e: Exception) -> DataError:
    reason = str(e).strip().splitlines()[0].rstrip(":") if str(e).strip() else ""  # tarfile's run to lines
    return DataError(f"{shard}: not a readable tar shard ({type(e).__name__}: {reason})")


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member: WebDataset splits at the first dot of the file name."""
    folder, _, file = name.rpartition("/")
    stem, _, ext = file.partition(".")
    return f"{folder}/{stem}" if folder else stem, ext.lower()


def read_shard(shard: str) -> Iterator[dict]:
    """The samples of one shard, in order: ``{"__key__": key, "__where__": "shard:key", ext:
    bytes, ...}``. DataError naming the shard when it is no readable tar file."""
    sample: dict = {}
    try:
        with tarfile.open(shard, "r|*") as tar:  # streamed: members in order, no seeking
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample["__where__"] = f"{shard}:{key}"
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _bad_shard(shard, e) from None
    if sample:
        yield sample


class Decoder:
    """A raw sample to an example: the image decoded in ``mode`` then ``transform``-ed, with a
    generator seeded by ``seed`` and the sample's position (None: ``transform`` takes the example
    alone); the label from ``cls`` or the json field ``target_key``. Returns UnreadableImage for an
    image that does not decode; DataError names a sample without an image or label."""

    def __init__(self, transform: Callable | None, mode: str, target_key: str | None,
                 seed: list[int] | None, num_classes: int = 0):
        self.transform, self.mode, self.target_key, self.seed = transform, mode, target_key, seed
        self.num_classes = num_classes  # 0: not checked

    def __call__(self, item: tuple[int, dict]):
        position, sample = item
        where = sample["__where__"]
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise DataError(f"{where}: sample has no image ({', '.join(IMAGE_KEYS)}; it has "
                            f"{', '.join(k for k in sample if not k.startswith('__'))})")
        label = self.label(sample, where)
        if self.num_classes and not 0 <= label < self.num_classes:
            raise DataError(f"{where}: label {label} is not one of the {self.num_classes} classes")
        example = {"label": np.int32(label)}
        try:
            example["image"] = decode_image(sample[image_key], f"{where}.{image_key}", self.mode)
        except UnreadableImage as e:
            return e
        if self.seed is None:
            return self.transform(example)
        return self.transform(example, np.random.default_rng([*self.seed, position]))

    def label(self, sample: dict, where: str) -> int:
        """The sample's label (``cls``, or ``target_key`` of its json); DataError naming ``where``."""
        try:
            if self.target_key is None:
                return int(sample["cls"])
            return int(json.loads(sample["json"])[self.target_key])
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: json is not readable ({e})") from None
        except KeyError as e:
            raise DataError(f"{where}: sample has no label ({e.args[0]!r})") from None
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: label is not an integer ({e})") from None


class ShardSource:
    """WebDataset shards as a split of ``num_samples`` examples, read as the module says."""

    def __init__(self, shards: list[str], num_samples: int, num_classes: int, mode: str = "RGB",
                 strict: bool = False, target_key: str | None = None):
        self.shards, self.num_samples, self.num_classes, self.mode = shards, num_samples, num_classes, mode
        self.strict, self.target_key = strict, target_key

    def __len__(self):
        return self.num_samples

    def train_stream(self, augment: Callable, *, epoch_seed: int, global_batch: int, steps: int,
                     start_step: int, process_index: int, process_count: int,
                     workers: int) -> Iterator[dict]:
        """This host's batches of an epoch (see the module doc), from ``start_step`` on."""
        if len(self.shards) < process_count:
            raise DataError(f"{self.shards[0]}: {len(self.shards)} shard(s) for {process_count} hosts: "
                            "each host needs one at least")
        per_host = global_batch // process_count
        order = np.random.default_rng(epoch_seed).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[process_index::process_count]]
        rng = np.random.default_rng([epoch_seed, process_index])
        stream = enumerate(self._cycled(mine, rng))
        # Before start_step: skipped, never decoded. After the epoch's last sample: never read, or
        # the decoding, which runs ahead, would start the shards over and say they ran short.
        stream = itertools.islice(stream, start_step * per_host, steps * per_host)
        decoder = Decoder(augment, self.mode, self.target_key, [epoch_seed, process_index], self.num_classes)
        examples = _stand_ins(_decoded(stream, decoder, workers, per_host), self.strict)
        return _batched(examples, per_host, (steps - start_step) * per_host)

    def eval_stream(self, transform: Callable, *, global_batch: int, process_index: int,
                    process_count: int, workers: int) -> Iterator[dict]:
        """This host's share of every held-out sample, in order, in batches of its share of
        ``global_batch`` with a ``weight`` (0 for padding and unreadable images' stand-ins)."""
        per_host = global_batch // process_count
        stream = (item for item in enumerate(itertools.chain.from_iterable(map(read_shard, self.shards)))
                  if item[0] % process_count == process_index)
        decoder = Decoder(transform, self.mode, self.target_key, None, self.num_classes)
        examples = _stand_ins(_decoded(stream, decoder, workers, per_host), self.strict, pad=True)
        total = -(-self.num_samples // global_batch) * per_host
        return _batched(examples, per_host, total, weighted=True)

    def _cycled(self, shards: list[str], rng: np.random.Generator) -> Iterator[dict]:
        """The samples of ``shards`` through the shuffle buffer, pass after pass."""
        for rounds in itertools.count():
            if rounds == 1:
                log.info("%s and %d other shard(s) ran short of this host's share of an epoch; "
                         "reading them again (shards of equal size avoid this)", shards[0], len(shards) - 1)
            samples = itertools.chain.from_iterable(map(read_shard, shards))
            yield from _shuffled(samples, rng, SHUFFLE_BUFFER)


def _shuffled(samples: Iterable, rng: np.random.Generator, size: int) -> Iterator:
    """``samples`` through a buffer of ``size``: each one goes in, a random one of the buffer out."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.integers(size)
        yield buffer[j]
        buffer[j] = sample
    yield from (buffer[j] for j in rng.permutation(len(buffer)))


def _decoded(items: Iterator, decoder: Decoder, workers: int, chunk: int) -> Iterator:
    """``decoder`` of each item, in order: in ``workers`` processes (0: two threads of this one, as
    a folder's pipeline decodes), ``chunk`` items a task, a few chunks ahead; the items are read
    here."""
    if workers == 0:
        pool = multiprocessing.pool.ThreadPool(2)  # Pillow decodes without holding the GIL
    else:  # Ctrl-C reaches the whole process group: this process stops the workers, who ignore it.
        pool = multiprocessing.get_context("spawn").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN))
    with pool:
        pending: collections.deque = collections.deque()
        while True:
            while len(pending) < _IN_FLIGHT * max(workers, 2):
                tasks = list(itertools.islice(items, chunk))
                if not tasks:
                    break
                pending.append(pool.map_async(decoder, tasks))
            if not pending:
                return
            yield from pending.popleft().get()


def _stand_ins(results: Iterator, strict: bool, pad: bool = False) -> Iterator[dict]:
    """Examples in order, each unreadable one (warned once) replaced by the next readable, with
    ``skipped`` 1; after the last readable one, by it. With ``pad``, that last one repeats
    forever, marked ``skipped`` (the caller stops)."""
    waiting, last = 0, None
    for result in results:
        if isinstance(result, UnreadableImage):
            if strict:
                raise result
            warn_skipped(result, STAND_IN)
            waiting += 1
            continue
        for _ in range(waiting):
            yield {**result, "skipped": np.int32(1)}
        waiting, last = 0, result
        yield {**result, "skipped": np.int32(0)}
    if last is None and (waiting or pad):
        raise DataError("no readable image in these shards")
    while waiting or pad:
        waiting -= 1
        yield {**last, "skipped": np.int32(1)}


def _batched(examples: Iterator[dict], size: int, total: int, weighted: bool = False) -> Iterator[dict]:
    """The first ``total`` of ``examples`` stacked in batches of ``size``; ``weighted`` adds a
    ``weight``, 0 where ``skipped``."""
    for _ in range(total // size):
        batch = list(itertools.islice(examples, size))
        out = {k: np.stack([np.asarray(ex[k]) for ex in batch]) for k in ("image", "label", "skipped")}
        if weighted:
            out["weight"] = (1 - out["skipped"]).astype(np.float32)
        yield out


def shard_dataset(pattern: str, data_dir: str | None = None, image_size: int = 224, strict: bool = False,
                  mode: str = "RGB", target_key: str | None = None, val_split: str | None = None,
                  train_num_samples: int | None = None):
    """``wds/<pattern>`` as a Dataset: training shards ``pattern``, held-out shards ``val_split``
    (both brace patterns, relative ones under ``data_dir``), with an image folder's transforms
    (``folder.image_folder``). The classes are 0 to the largest label of the held-out shards
    (whose headers and labels are scanned: they count its samples too); the training shards are
    scanned only when ``train_num_samples`` is None. DataError naming the pattern or shard at
    fault."""
    if val_split is None:
        raise DataError(f"{PREFIX}{pattern}: --val-split names the held-out shards (a pattern)")
    val_shards = find_shards(val_split, data_dir)
    val_count, largest = scan_shards(val_shards, target_key)
    train_shards = find_shards(pattern, data_dir)
    if train_num_samples is None:
        log.info("%s: counting the samples of %d shard(s) (--train-num-samples skips this)",
                 pattern, len(train_shards))
        train_num_samples, train_largest = scan_shards(train_shards, target_key)
        largest = max(largest, train_largest)
    classes = [str(i) for i in range(largest + 1)]
    if not classes:
        raise DataError(f"{val_split}: no labelled sample")
    train = ShardSource(train_shards, train_num_samples, len(classes), mode, strict, target_key)
    val = ShardSource(val_shards, val_count, len(classes), mode, strict, target_key)
    return image_dataset(PREFIX + pattern, train, val, classes, image_size, mode)

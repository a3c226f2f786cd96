"""The folder input pipeline against torchvision's, side by side in one run.

    python benchmarks/data.py                  # writes benchmarks/results/data-<machine>.md
    python benchmarks/data.py --images 512 --rounds 3 --setup-files 20000

Throughput: synthetic ImageNet-like JPEGs (500x375, about 95 KB), read as training batches of 32:
decode, RandomResizedCrop 224, horizontal flip, normalise, as float32. Ours is
``densenet_jax.data.train_batches`` over the folder data set; torchvision's is a DataLoader over
ImageFolder with the same transforms. Both with 0, 1 and 2 worker processes (ours with 0 workers
still decodes in Grain's 2 threads; torchvision's with 0 decodes in the main thread). Each round
reads every image once. Images/s count the batches between the first ones (1, or 2 per worker:
until every worker has started) and the last one, as a long epoch runs; the time to the first
ones is reported apart as start-up, and the time from the last batch until the batches end (the
workers stopped) as end; a whole pass adds both. Rounds alternate between the two contenders, and
each figure is the median over rounds.

Set-up: the time to list a folder of ``--setup-files`` image files (100 classes) as a data set,
first (no listing cache) and again (the cache checked, as on a resume), against a plain recursive
listing (``os.walk``) and torchvision's ImageFolder; medians of 5, files in the page cache.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import machine_name  # noqa: E402

BATCH = 32


def write_jpegs(root: Path, count: int, classes: int = 4, seed: int = 0) -> None:
    """``count`` 500x375 JPEGs of smooth shapes and grain (about 95 KB at quality 92)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), np.int16)
        pixels = np.clip(base + rng.normal(0, 14, base.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=92)


def ours(root: Path, workers: int):
    """Batches of our training pipeline, and how to count images in one."""
    from densenet_jax.data.folder import FileSource, find_images
    from densenet_jax.data import transforms as T
    from densenet_jax.data.pipeline import train_batches
    from densenet_jax.model.pretrained_cfg import IMAGENET_MEAN, IMAGENET_STD

    found = find_images(root)
    source = FileSource(found.paths, found.labels)
    augment = T.Compose([T.RandomResizedCrop(224), T.RandomFlip(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    epoch = iter(range(10**6))
    return lambda: train_batches(source, augment, seed=0, epoch=next(epoch), global_batch=BATCH, workers=workers)


def torchvisions(root: Path, workers: int):
    """Batches of torchvision's DataLoader over ImageFolder with the same transforms."""
    import torch
    import torchvision.transforms as TT
    from torchvision.datasets import ImageFolder

    transform = TT.Compose([TT.RandomResizedCrop(224), TT.RandomHorizontalFlip(), TT.ToTensor(),
                            TT.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = ImageFolder(str(root), transform=transform)
    return lambda: iter(torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                                    num_workers=workers, drop_last=True))


def one_round(make_batches, warmup: int) -> tuple[float, float, float, float]:
    """(seconds to the ``warmup``-th batch, images/s from there to the last batch, seconds from
    the last batch until the batches end and the workers are stopped, images/s over the whole
    pass) for one pass."""
    started = time.perf_counter()
    batches = make_batches()
    for _ in range(warmup):
        next(batches)
    first = last = time.perf_counter()
    seen = 0
    for _ in batches:
        last = time.perf_counter()
        seen += BATCH
    ended = time.perf_counter()
    del batches
    return first - started, seen / (last - first), ended - last, (seen + warmup * BATCH) / (ended - started)


def throughput(root: Path, rounds: int) -> list[dict]:
    rows = []
    for workers in (0, 1, 2):
        contenders = {"densenet_jax (grain)": ours(root, workers), "torchvision DataLoader": torchvisions(root, workers)}
        results = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, make in contenders.items():
                results[name].append(one_round(make, warmup=max(1, 2 * workers)))
        for name, measured in results.items():
            start, rate, end, whole = (statistics.median(m[i] for m in measured) for i in range(4))
            rows.append({"workers": workers, "contender": name, "rate": rate, "per_worker": rate / max(workers, 1),
                         "startup": start, "end": end, "whole": whole})
    return rows


def setup_times(files: int, repeats: int = 5) -> dict[str, float]:
    from torchvision.datasets import ImageFolder

    from densenet_jax.data.folder import find_images

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "train", Path(tmp) / "listings"
        payload = b"\xff\xd8\xff" + bytes(1000)  # a stand-in: set-up never reads content
        for i in range(files):
            folder = root / f"n{i % 100:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:08d}.JPEG").write_bytes(payload)
        past = time.time() - 60  # a data set's folders are older than its first listing
        for folder, _, _ in os.walk(root):
            os.utime(folder, (past, past))

        def timed(fn):
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        def first():
            for f in cache.glob("*"):
                f.unlink()
            return find_images(root, cache_dir=cache)

        def walk():
            return sorted(os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs)

        return {"os.walk (plain recursive listing)": timed(walk),
                "densenet_jax, first set-up (listed, cache written)": timed(first),
                "densenet_jax, again (cache checked)": timed(lambda: find_images(root, cache_dir=cache)),
                "torchvision ImageFolder": timed(lambda: ImageFolder(str(root)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="JPEGs read per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--setup-files", type=int, default=20000)
    p.add_argument("--note", default="", help="a line about the conditions (e.g. a shared machine)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images)
        sizes = [f.stat().st_size for f in Path(tmp).rglob("*.jpg")]
        rows = throughput(Path(tmp), args.rounds)
    setup = setup_times(args.setup_files)
    from importlib.metadata import version

    name = machine_name()
    lines = [f"# data pipeline, {name}", "",
             f"{datetime.date.today()}, grain {version('grain')}, pillow {version('pillow')}, torch "
             f"{version('torch')}, torchvision {version('torchvision')}, {os.cpu_count()} CPU cores. "
             f"{args.note}".rstrip(), "",
             f"Command: `python benchmarks/data.py --images {args.images} --rounds {args.rounds} "
             f"--setup-files {args.setup_files}`.", "",
             f"Training batches of {BATCH} from {args.images} JPEGs of 500x375 (median "
             f"{statistics.median(sizes) / 1000:.0f} KB): decode, RandomResizedCrop 224, flip, normalise; "
             f"medians of {args.rounds} alternating rounds. Images/s between the first batches (1, or 2 "
             f"per worker) and the last; start-up (to the first batches) and end (from the last batch "
             f"until the workers are stopped) apart, as every epoch pays them once.", "",
             "| workers | contender | images/s | images/s per worker | vs torchvision | start-up s | end s | "
             "whole pass images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        reference = next(r["rate"] for r in rows if r["workers"] == row["workers"] and r["contender"].startswith("torchvision"))
        lines.append(f"| {row['workers']} | {row['contender']} | {row['rate']:.0f} | {row['per_worker']:.0f} | "
                     f"{row['rate'] / reference:.2f}x | {row['startup']:.2f} | {row['end']:.2f} | "
                     f"{row['whole']:.0f} |")
    walk = setup["os.walk (plain recursive listing)"]
    lines += ["", f"Set-up of {args.setup_files:,} image files in 100 class folders (medians of 5):", "",
              "| set-up | seconds | vs os.walk |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / walk:.2f}x |" for k, v in setup.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / f"data-{name}.md"
    out.write_text(text)


if __name__ == "__main__":
    main()

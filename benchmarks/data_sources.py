"""Image folders, Hugging Face data sets (hfds/) and WebDataset shards (wds/) side by side, ours
against timm's loader on the same source, in one run.

    python benchmarks/data_sources.py          # writes benchmarks/results/data-sources-<machine>.md
    python benchmarks/data_sources.py --images 512 --rounds 3 --setup-examples 100000

Throughput: the same synthetic JPEGs (benchmarks/data.py's, 500x375, about 95 KB) as a folder, a
Parquet folder laid out as the Hub stores it, and 4 tar shards; training batches of 32 (decode,
RandomResizedCrop 224, flip, normalise, float32) with 0 and 1 worker processes. Ours is
``densenet_jax.data.train_batches`` over ``load_dataset``'s source; timm's is
``timm.data.create_dataset`` (``''``, ``hfds/...``, ``wds/...``) with ``create_loader`` (its
default ImageNet training transforms with no extra augmentation, same crop size and flip).
Images/s count the batches between the first ones and the last, as benchmarks/data.py does;
medians over alternating rounds.

Set-up: the seconds from naming a source of ``--setup-examples`` examples (8x8 PNGs: content is not
what set-up reads) to its first training batch: a Parquet folder read the first time (``datasets``
prepares its Arrow cache) and again (cached), a save_to_disk folder, and shards with
``--train-num-samples`` (nothing scanned) and without (the tar headers counted).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import machine_name  # noqa: E402
from data import BATCH, one_round, write_jpegs  # noqa: E402

SHARDS = 4


def write_sources(root: Path, images: int) -> dict[str, dict]:
    """The JPEGs as a folder (train/ and val/), a Parquet folder and shards; ``load_dataset`` args."""
    import datasets

    datasets.disable_progress_bars()
    write_jpegs(root / "folder" / "train", images)
    (root / "folder" / "val").symlink_to(root / "folder" / "train")
    files = sorted((root / "folder" / "train").rglob("*.jpg"))
    labels = [int(f.parent.name[len("class"):]) for f in files]
    payloads = [f.read_bytes() for f in files]
    classes = sorted({f.parent.name for f in files})
    write_parquet(root / "parquet", payloads, labels, classes)
    write_tars(root / "shards", payloads, labels, "jpg")
    pattern = f"{root}/shards/train-{{0..{SHARDS - 1}}}.tar"
    return {"folder": {"name": "folder", "data_dir": str(root / "folder")},
            "hfds": {"name": f"hfds/{root / 'parquet'}"},
            "wds": {"name": f"wds/{pattern}", "val_split": pattern,
                    "train_num_samples": len(files)}}


def hf_rows(payloads, labels, classes):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in payloads], "label": labels},
                                      features=features)


def write_parquet(root: Path, payloads, labels, classes) -> None:
    (root / "data").mkdir(parents=True)
    rows = hf_rows(payloads, labels, classes)
    for split in ("train", "validation"):
        rows.to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")


def write_tars(root: Path, payloads, labels, ext: str) -> None:
    root.mkdir(parents=True)
    per = -(-len(payloads) // SHARDS)
    for k in range(SHARDS):
        with tarfile.open(root / f"train-{k}.tar", "w") as tar:
            for i in range(k * per, min(len(payloads), (k + 1) * per)):
                for suffix, data in ((ext, payloads[i]), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def ours(args: dict, workers: int):
    from densenet_jax.data import load_dataset, train_batches

    data = load_dataset(**args)
    epoch = iter(range(10**6))
    return lambda: train_batches(data.train, data.augment, seed=0, epoch=next(epoch), global_batch=BATCH,
                                 workers=workers)


def timms(args: dict, workers: int, count: int):
    from timm.data import create_dataset, create_loader

    name = args["name"]
    if name == "folder":
        dataset = create_dataset("", root=str(Path(args["data_dir"]) / "train"), split="train", is_training=True)
    elif name.startswith("hfds/"):
        dataset = create_dataset(name, root=None, split="train", is_training=True)
    else:
        pattern = Path(name[len("wds/"):])
        dataset = create_dataset("wds/bench", root=str(pattern.parent), split=f"{pattern.name}|{count}",
                                 is_training=True, batch_size=BATCH)
    loader_args = dict(input_size=(3, 224, 224), batch_size=BATCH, is_training=True, no_aug=False,
                       scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0, num_workers=workers,
                       persistent_workers=False, use_prefetcher=False)  # its prefetcher is CUDA's
    return lambda: iter(create_loader(dataset, **loader_args))


def throughput(sources: dict[str, dict], rounds: int, count: int) -> list[dict]:
    rows = []
    for workers in (0, 1):
        for short, args in sources.items():
            contenders = {f"densenet_jax {short}": ours(args, workers), f"timm {short}": timms(args, workers, count)}
            results = {name: [] for name in contenders}
            for _ in range(rounds):
                for name, make in contenders.items():
                    results[name].append(one_round(make, warmup=max(1, 2 * workers)))
            for name, measured in results.items():
                rate = statistics.median(m[1] for m in measured)
                rows.append({"workers": workers, "source": short, "contender": name, "rate": rate,
                             "per_worker": rate / max(workers, 1),
                             "startup": statistics.median(m[0] for m in measured)})
    return rows


def setup_times(root: Path, examples: int) -> dict[str, float]:
    """Seconds from naming each source to its first batch."""
    from densenet_jax.data import load_dataset, train_batches

    rng = np.random.default_rng(0)
    payloads = []
    for i in range(examples):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(out, "PNG")
        payloads.append(out.getvalue())
    labels = [i % 10 for i in range(examples)]
    classes = [f"c{i}" for i in range(10)]
    write_parquet(root / "parquet", payloads, labels, classes)
    hf_rows(payloads, labels, classes).save_to_disk(str(root / "saved"))
    write_tars(root / "shards", payloads, labels, "png")
    write_tars(root / "val", payloads[:1000], labels[:1000], "png")
    pattern, val = f"{root}/shards/train-{{0..{SHARDS - 1}}}.tar", f"{root}/val/train-{{0..{SHARDS - 1}}}.tar"
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-cache")

    def timed(**args):
        started = time.perf_counter()
        data = load_dataset(**args, image_size=8)
        next(iter(train_batches(data.train, data.augment, seed=0, epoch=0, global_batch=BATCH)))
        return time.perf_counter() - started

    return {"hfds Parquet folder, first (datasets prepares its Arrow cache)": timed(name=f"hfds/{root / 'parquet'}"),
            "hfds Parquet folder, again (cached)": timed(name=f"hfds/{root / 'parquet'}"),
            "hfds save_to_disk folder": timed(name=f"hfds/{root / 'saved'}"),
            "wds with --train-num-samples (no scan)": timed(name=f"wds/{pattern}", val_split=val,
                                                            train_num_samples=examples),
            "wds without (tar headers counted)": timed(name=f"wds/{pattern}", val_split=val)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="JPEGs read per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--setup-examples", type=int, default=100_000)
    p.add_argument("--note", default="", help="a line about the conditions (e.g. a shared machine)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf-cache")
        sources = write_sources(Path(tmp), args.images)
        rows = throughput(sources, args.rounds, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        setup = setup_times(Path(tmp), args.setup_examples)
    from importlib.metadata import version

    name = machine_name()
    lines = [f"# data sources, {name}", "",
             f"{datetime.date.today()}, grain {version('grain')}, datasets {version('datasets')}, pillow "
             f"{version('pillow')}, timm {version('timm')}, torch {version('torch')}, {os.cpu_count()} CPU "
             f"cores. {args.note}".rstrip(), "",
             f"Command: `python benchmarks/data_sources.py --images {args.images} --rounds {args.rounds} "
             f"--setup-examples {args.setup_examples}`.", "",
             f"Training batches of {BATCH} from {args.images} JPEGs of 500x375: decode, RandomResizedCrop 224, "
             f"flip, normalise; medians of {args.rounds} alternating rounds; images/s between the first "
             f"batches (1, or 2 per worker) and the last; start-up (to the first batches) apart.", "",
             "| workers | source | contender | images/s | images/s per worker | vs our folder | vs timm, same source | start-up s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = [r for r in rows if r["workers"] == row["workers"]]
        folder = next(r["rate"] for r in same if r["contender"] == "densenet_jax folder")
        timm = next(r["rate"] for r in same if r["contender"] == f"timm {row['source']}")
        lines.append(f"| {row['workers']} | {row['source']} | {row['contender']} | {row['rate']:.0f} | "
                     f"{row['per_worker']:.0f} | {row['rate'] / folder:.2f}x | {row['rate'] / timm:.2f}x | "
                     f"{row['startup']:.2f} |")
    lines += ["", f"Set-up of a {args.setup_examples:,}-example source, to its first training batch (one run each):", "",
              "| source | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in setup.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / f"data-sources-{name}.md"
    out.write_text(text)


if __name__ == "__main__":
    main()

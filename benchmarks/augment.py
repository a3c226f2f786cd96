"""Training augmentation against timm's loader, and what mixup/CutMix cost, side by side in one run.

    python benchmarks/augment.py                  # writes benchmarks/results/augment-<machine>.md
    python benchmarks/augment.py --images 512 --rounds 3 --steps 20

Throughput: synthetic ImageNet-like JPEGs (benchmarks/data.py's), read as training batches of 32
with ``--aa rand-m9-mstd0.5 --reprob 0.25``: decode, RandomResizedCrop 224 (bilinear), flip,
RandAugment, normalise, random erasing, as float32. Ours is ``train_batches`` over the folder with
the transform ``densenet-jax train`` builds; timm's is ``timm.data.create_loader`` over its
``ImageDataset`` with the same options (no prefetcher: it needs CUDA), the same worker count.
Rounds alternate, figures are medians (benchmarks/data.py's ``one_round``).

Mixing and EMA: the train step of a CIFAR DenseNet-BC (``--model``, 32x32, batch 64) with soft
targets (mixup's) and with the EMA average against the plain step with integer labels, medians of
``--steps`` alternating steps after compiling; and the time to mix
a batch (``Mixup`` on the host, which runs in the data workers), at the same size and at
ImageNet's (32 x 224 x 224), against the step and against a worker's time per batch.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import machine_name  # noqa: E402
from data import BATCH, one_round, write_jpegs  # noqa: E402

AA, REPROB = "rand-m9-mstd0.5", 0.25


def ours(root: Path, workers: int):
    """Batches of our pipeline with the transform ``densenet-jax train --aa ... --reprob ...`` builds."""
    from densenet_jax.data import transforms as T
    from densenet_jax.data.augment import AugmentOptions, train_transform
    from densenet_jax.data.folder import FileSource, find_images
    from densenet_jax.data.pipeline import train_batches
    from densenet_jax.model.pretrained_cfg import IMAGENET_MEAN, IMAGENET_STD

    found = find_images(root)
    source = FileSource(found.paths, found.labels)
    augment = train_transform(AugmentOptions(aa=AA, reprob=REPROB), T.RandomResizedCrop(224), 224,
                              T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    epoch = iter(range(10**6))
    return lambda: train_batches(source, augment, seed=0, epoch=next(epoch), global_batch=BATCH, workers=workers)


def timms(root: Path, workers: int):
    """Batches of timm's create_loader with the same options."""
    from timm.data import ImageDataset, create_loader

    dataset = ImageDataset(str(root))
    return lambda: iter(create_loader(dataset, (3, 224, 224), BATCH, is_training=True, use_prefetcher=False,
                                      auto_augment=AA, re_prob=REPROB, interpolation="bilinear",
                                      num_workers=workers, persistent_workers=False))


def throughput(root: Path, rounds: int, worker_counts) -> list[dict]:
    rows = []
    for workers in worker_counts:
        contenders = {"densenet_jax (grain)": ours(root, workers), "timm create_loader": timms(root, workers)}
        results = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, make in contenders.items():
                results[name].append(one_round(make, warmup=max(1, 2 * workers)))
        for name, measured in results.items():
            start, rate, end, whole = (statistics.median(m[i] for m in measured) for i in range(4))
            rows.append({"workers": workers, "contender": name, "rate": rate, "startup": start, "whole": whole})
    return rows


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def mixing_costs(steps: int, model_name: str) -> dict[str, float]:
    """Seconds: the train step with integer labels, with soft targets, and with the EMA average
    (timm's ModelEmaV3, decay 0.9998 with warm-up), the variants alternating step by step; and
    mixing a batch on the host."""
    import jax
    from flax import nnx

    import densenet_jax as dj
    from densenet_jax.data.mixup import Mixup, MixupOptions
    from densenet_jax.train import optim
    from densenet_jax.train.step import Steps

    def steps_of(**options):
        model = dj.create_model(model_name, num_classes=10, rngs=nnx.Rngs(0))
        return Steps(model, optim.sgd(0.9, 1e-4), **options)

    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    mixer = Mixup(MixupOptions(mixup=0.8, cutmix=1.0, smoothing=0.1), 10)
    mixed = mixer({"image": images, "label": labels}, rng)
    plain, ema = steps_of(), steps_of(ema=(0.9998, True))
    variants = {"step, integer labels": (plain, labels), "step, soft targets": (plain, mixed["target"]),
                "step, integer labels, EMA": (ema, labels)}
    calls = {}
    for name, (s, targets) in variants.items():
        train = jax.jit(s.train)
        calls[name] = lambda train=train, s=s, targets=targets: jax.block_until_ready(
            train(s.initial, s.rest, mixed["image"], targets, np.float32(0.1)))
        calls[name]()  # compile
    times = {name: [] for name in calls}
    for _ in range(steps):  # alternating, so that a noisy neighbour hurts every variant alike
        for name, call in calls.items():
            times[name].append(_median_seconds(call, 1))
    out = {name: statistics.median(t) for name, t in times.items()}
    out["mix 64x32x32x3 (host)"] = _median_seconds(lambda: mixer({"image": images, "label": labels}, rng), 50)
    big = rng.standard_normal((BATCH, 224, 224, 3)).astype(np.float32)
    out[f"mix {BATCH}x224x224x3 (host)"] = _median_seconds(
        lambda: Mixup(MixupOptions(mixup=0.8, cutmix=1.0), 1000)({"image": big, "label": labels[:BATCH]}, rng), 10)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="JPEGs read per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--steps", type=int, default=20, help="timed train steps per variant")
    p.add_argument("--model", default="densenet_bc_100_k12", help="the model whose train step is timed")
    p.add_argument("--note", default="", help="a line about the conditions (e.g. a shared machine)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images)
        rows = throughput(Path(tmp), args.rounds, args.workers)
    costs = mixing_costs(args.steps, args.model)
    from importlib.metadata import version

    name = machine_name()
    lines = [f"# training augmentation and mixing, {name}", "",
             f"{datetime.date.today()}, grain {version('grain')}, pillow {version('pillow')}, timm "
             f"{version('timm')}, torch {version('torch')}, jax {version('jax')}, {os.cpu_count()} CPU cores. "
             f"{args.note}".rstrip(), "",
             f"Command: `python benchmarks/augment.py --images {args.images} --rounds {args.rounds} "
             f"--workers {' '.join(map(str, args.workers))} --steps {args.steps} --model {args.model}`.", "",
             f"Training batches of {BATCH} from {args.images} JPEGs of 500x375 with `--aa {AA} --reprob "
             f"{REPROB}` (decode, RandomResizedCrop 224, flip, RandAugment, normalise, random erasing); "
             f"medians of {args.rounds} alternating rounds; images/s between the first batches and the "
             "last, start-up apart (benchmarks/data.py's method).", "",
             "| workers | contender | images/s | vs timm | start-up s | whole pass images/s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        reference = next(r["rate"] for r in rows if r["workers"] == row["workers"] and r["contender"].startswith("timm"))
        lines.append(f"| {row['workers']} | {row['contender']} | {row['rate']:.0f} | {row['rate'] / reference:.2f}x | "
                     f"{row['startup']:.2f} | {row['whole']:.0f} |")
    step = costs["step, integer labels"]
    ours_rate = next(r["rate"] for r in rows if r["contender"].startswith("densenet") and r["workers"] == max(args.workers))
    per_batch = BATCH / ours_rate * max(max(args.workers), 1)  # one worker's seconds per batch
    lines += ["", f"Mixup/CutMix and EMA ({args.model}, 32x32, batch 64, fp32; medians):", "",
              "| what | ms | vs the step with integer labels | vs a worker's time per 224 px batch |",
              "|---|---|---|---|"]
    for what, seconds in costs.items():
        against_worker = f"{seconds / per_batch:.3f}x" if "224" in what else ""
        lines.append(f"| {what} | {seconds * 1e3:.2f} | {seconds / step:.3f}x | {against_worker} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / f"augment-{name}.md"
    out.write_text(text)


if __name__ == "__main__":
    main()

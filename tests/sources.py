"""The same small labelled images as an image folder, a Hugging Face data set (Parquet files laid out
as the Hub stores them, and a save_to_disk folder) and WebDataset tar shards; and what one host
reads of each (tests/read_share.py runs it in two processes joined by jax.distributed).

Example i is a 20x24 PNG of levels ``LEVEL * i`` and above (exactly that at the top left) with label i (one class each), so that
an image read back names its example, whatever source it came from.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COUNT, LEVEL, SHARDS = 12, 20, 4
BATCH = 4  # global: 3 steps an epoch, 2 examples per step on each of 2 hosts


def png(level: int) -> bytes:
    """``level`` plus a texture below ``LEVEL`` (0 at the top left), so that augmentations show."""
    texture = np.random.default_rng(level).integers(0, LEVEL, (20, 24, 3))
    texture[0, 0] = 0
    out = io.BytesIO()
    Image.fromarray((level + texture).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def class_names(count: int = COUNT) -> list[str]:
    return [f"c{i:02d}" for i in range(count)]


def write_folder(root: Path, count: int = COUNT) -> Path:
    for split in ("train", "val"):
        for i, name in enumerate(class_names(count)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            (root / split / name / "0.png").write_bytes(png(LEVEL * i))
    return root


def hf_splits(count: int = COUNT, images: list[bytes] | None = None):
    """A DatasetDict ``train``/``validation`` with an Image column and a ClassLabel ``label``."""
    import datasets

    datasets.disable_progress_bars()
    images = images or [png(LEVEL * i) for i in range(count)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names(count))})
    split = {"image": [{"bytes": b, "path": None} for b in images], "label": list(range(count))}
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(split, features=features)
                                 for name in ("train", "validation")})


def write_parquet(root: Path, count: int = COUNT, images: list[bytes] | None = None) -> Path:
    """``root/data/<split>-00000-of-00001.parquet``, as the Hub stores a data set."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, split in hf_splits(count, images).items():
        split.to_parquet(root / "data" / f"{name}-00000-of-00001.parquet")
    return root


def write_saved(root: Path, count: int = COUNT) -> Path:
    hf_splits(count).save_to_disk(str(root))
    return root


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A tar of ``{"__key__": key, ext: bytes}`` samples, members in order."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(root: Path, count: int = COUNT, shards: int = SHARDS) -> str:
    """``root/train-{0..shards-1}.tar``, ``count // shards`` samples each (png + cls); the pattern."""
    root.mkdir(parents=True, exist_ok=True)
    per = count // shards
    for k in range(shards):
        write_shard(root / f"train-{k}.tar", [{"__key__": f"s{i:05d}", "png": png(LEVEL * i), "cls": str(i).encode()}
                                              for i in range(k * per, (k + 1) * per)])
    return f"{root}/train-{{0..{shards - 1}}}.tar"


def write_all(root: Path) -> dict[str, dict]:
    """Every source of the same examples: ``load_dataset`` arguments by a short name."""
    shards = write_shards(root / "shards")
    return {"folder": {"name": "folder", "data_dir": str(write_folder(root / "folder"))},
            "hfds": {"name": f"hfds/{write_parquet(root / 'parquet')}"},
            "wds": {"name": f"wds/{shards}", "val_split": shards, "train_num_samples": COUNT}}


def identity(example, rng=None):
    return {**example, "image": np.asarray(example["image"])}


def read_share(sources: dict[str, dict], process_index: int, process_count: int) -> dict:
    """What host ``process_index`` of ``process_count`` reads of each source: per training epoch
    (0 and 1) its batches' examples, named by their pixels; and the held-out ones of weight 1."""
    from densenet_jax.data import eval_batches, load_dataset, train_batches

    share = {"host": [process_index, process_count]}
    for short, args in sources.items():
        data = load_dataset(**args, image_size=16)
        epochs = [[_names(batch, LEVEL) for batch in train_batches(
                      data.train, identity, seed=5, epoch=epoch, global_batch=BATCH,
                      process_index=process_index, process_count=process_count)] for epoch in (0, 1)]
        held_out = [name for batch in eval_batches(data.eval, identity, global_batch=BATCH,
                                                   process_index=process_index, process_count=process_count)
                    for name, weight in zip(_names(batch, LEVEL), batch["weight"]) if weight]
        share[short] = {"train": epochs, "eval": held_out}
    return share


def _names(batch, level: int) -> list[int]:
    """Each example's number, read from its pixels, checked against its label."""
    names = (np.asarray(batch["image"])[:, 0, 0, 0] // level).tolist()
    assert names == np.asarray(batch["label"]).tolist(), (names, batch["label"])
    return names


def dump(share: dict) -> str:
    return json.dumps(share)

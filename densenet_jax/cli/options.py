"""What several commands' parsers share: the data set's options."""

from __future__ import annotations

import argparse

from densenet_jax.data.csv_source import UNCERTAIN
from densenet_jax.train.config import DATASETS, FOLDER_IMAGE_SIZE

FOLDER_SPLITS = "a folder with train/ and val/"
IMAGE_SIZE_HELP = (f"folder: training crop (default {FOLDER_IMAGE_SIZE}); eval resizes to 8/7 of it "
                   "and centre-crops; csv: resize and centre crop, train and eval")


def dataset_options(p: argparse.ArgumentParser, folder: str = FOLDER_SPLITS,
                    image_size_help: str = IMAGE_SIZE_HELP) -> None:
    """``--dataset``, ``--data-dir``, ``--workers``, ``--strict`` and ``--image-size``; ``folder``
    says what a folder data set holds, ``image_size_help`` what ``--image-size`` sets."""
    p.add_argument("--dataset", default="digits", metavar="{" + ",".join(DATASETS) + ",hfds/NAME,wds/PATTERN}",
                   help="digits ships with scikit-learn; cifar10, cifar100, folder and csv read --data-dir; "
                        "hfds/NAME a Hugging Face data set (Hub name, Parquet or save_to_disk folder); "
                        "wds/PATTERN WebDataset tar shards (train-{000..127}.tar)")
    p.add_argument("--data-dir", default=None, help=f"cifar-10-batches-py / cifar-100-python folder, {folder}, "
                                                    "or the folder a CSV's image paths start from")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (0: threads only)")
    p.add_argument("--strict", action="store_true",
                   help="folder: stop at an unreadable image instead of skipping it with a warning")
    p.add_argument("--image-size", type=int, default=None, help=image_size_help)
    csv_options(p)


def source_options(p: argparse.ArgumentParser) -> None:
    """timm's options for ``hfds/`` and ``wds/`` data: keys, splits and the training sample count."""
    p.add_argument("--input-key", default=None, help="hfds: the image column (default image)")
    p.add_argument("--target-key", default=None,
                   help="hfds: the label column (default label); wds: the json field holding the label "
                        "(default: the .cls member)")
    p.add_argument("--train-split", default=None, help="hfds: the training split (default train)")
    p.add_argument("--val-split", default=None,
                   help="hfds: the held-out split (default validation); wds: its shard pattern")
    p.add_argument("--train-num-samples", type=int, default=None,
                   help="wds: samples in the training shards (default: counted from their headers)")


def csv_options(p: argparse.ArgumentParser) -> None:
    """``--dataset csv``'s options (data.csv_source.CsvSpec's fields)."""
    g = p.add_argument_group("--dataset csv", "images listed in CSV files, one row each, paths relative to --data-dir")
    g.add_argument("--train-csv", default=None, metavar="FILE", help="the training rows")
    g.add_argument("--val-csv", default=None, metavar="FILE", help="the held-out rows")
    g.add_argument("--path-column", default=None, metavar="NAME", help="the image paths' column (default: the first)")
    g.add_argument("--label-columns", default=None, nargs="+", metavar="NAME",
                   help="label columns, 1/0/-1/blank each (default: every other column but --patient-column); "
                        "one column of class names: one label per image")
    g.add_argument("--patient-column", default=None, metavar="NAME",
                   help="patient ids: --val-fraction holds out whole patients")
    g.add_argument("--uncertain", default="ignore", choices=UNCERTAIN,
                   help="-1 labels (CheXpert's policies): ignore as missing, zeros, ones")
    g.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="without --val-csv: hold out this fraction of the patients (rows without "
                        "--patient-column), drawn with a fixed seed")


def figure(value: float | None) -> str:
    """A held-out figure to four decimals, or ``undefined`` (an AUROC of one class only)."""
    return "undefined" if value is None else f"{value:.4f}"

"""``densenet-jax evaluate``: the held-out figures of a weights file, in one line or as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json

from densenet_jax.cli.options import dataset_options, figure, source_options
from densenet_jax.data.csv_source import CsvSpec
from densenet_jax.train.config import PRECISIONS, SOURCE_OPTIONS
from densenet_jax.train.evaluate import Evaluation, evaluate_weights

HELP = "held-out loss and accuracy (AUROC for multi-label weights) of a weights file"


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax evaluate``'s arguments and options, added to ``p``."""
    p.add_argument("--weights", required=True, help="a densenet_jax .safetensors")
    dataset_options(p, folder="a folder with val/ (train/ is not read)",
                    image_size_help="folder, csv: the centre crop instead of the one the weights record "
                                    "(their resize ratio, interpolation and mean/std kept; without a "
                                    "record, torchvision's: resize to 8/7 of it, bilinear; default 224)")
    source_options(p)
    p.add_argument("--batch-size", type=int, default=128, help="images per evaluation step")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: compute in bfloat16; fp64: in float64")
    p.add_argument("--json", action="store_true",
                   help="one JSON document on stdout (multi-label: auroc and auprc per label, their means)")


def csv_spec(args: argparse.Namespace) -> CsvSpec:
    """The parsed ``--dataset csv`` options."""
    return CsvSpec(args.train_csv, args.val_csv, args.path_column,
                   tuple(args.label_columns) if args.label_columns else None, args.patient_column,
                   args.uncertain, args.val_fraction)


def run(args: argparse.Namespace) -> None:
    """Print the held-out figures of ``--weights``, the images counted and, for image files, how
    they were prepared (see :func:`densenet_jax.train.evaluate.evaluate_weights`)."""
    result = evaluate_weights(args.weights, args.dataset, args.data_dir, batch_size=args.batch_size,
                              precision=args.precision, workers=args.workers, strict=args.strict,
                              image_size=args.image_size, csv=csv_spec(args),
                              sources={k: getattr(args, k) for k in SOURCE_OPTIONS})
    if args.json:
        print(json.dumps(_as_json(result), indent=1))
        return
    skipped = result.examples - result.count
    unreadable = f", {skipped} unreadable skipped" if skipped > 0 else ""
    figures = f"loss {result.loss:.4f}, accuracy {result.accuracy:.4f}"
    if result.auroc is not None:
        per_label = ", ".join(f"{name} {figure(v)}" for name, v in result.auroc.items())
        figures = (f"mean AUROC {figure(result.mean_auroc)} ({per_label}), mean AUPRC "
                   f"{figure(result.mean_auprc)}, loss {result.loss:.4f}, exact-match accuracy {result.accuracy:.4f}")
    print(f"{args.weights} on {args.dataset} (held-out, {result.count} images{unreadable}"
          f"{result.preprocessing}): {figures}")


def _as_json(result: Evaluation) -> dict:
    """The evaluation as JSON: every field, the multi-label ones only for multi-label weights."""
    fields = {**dataclasses.asdict(result), "preprocessing": result.preprocessing.removeprefix("; ")}
    multi = ("auroc", "mean_auroc", "auprc", "mean_auprc")
    return {k: v for k, v in fields.items() if result.auroc is not None or k not in multi}


"""Images listed in CSV files with their labels, as chest X-ray data sets are (NIH ChestX-ray14,
CheXpert, MIMIC-CXR, PadChest): one row per image, a column of paths relative to a root folder,
one column per label.

Label values: ``1`` (present), ``0`` (absent), blank or ``NaN`` (missing, left out of the loss and
the metrics), ``-1`` (uncertain: CheXpert's policies, Irvin et al. 2019, arXiv 1901.07031:
``ignore`` as missing, ``zeros`` as absent, ``ones`` as present); ``1.0`` and the like too. Several
label columns make a multi-label data set (targets float32 (L,), NaN where missing). One label
column holding anything else (class names) makes a one-label data set: its classes are the
column's distinct values, sorted (as numbers where they all are integers), targets int32.

Without a validation CSV, ``val_fraction`` of the patients (``patient_column``; else of the rows)
is held out, drawn with a fixed seed, so that ``train`` and ``evaluate`` hold out the same rows.
Every listed file is checked to exist when the CSV is read (one ``stat`` per row): a bad row is
named, with its row number, before anything trains.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from densenet_jax.data import transforms as T
from densenet_jax.data.dataset import Dataset
from densenet_jax.data.folder import FileSource
from densenet_jax.errors import DataError
from densenet_jax.model.pretrained_cfg import PretrainedCfg

log = logging.getLogger("densenet_jax")

UNCERTAIN = ("ignore", "zeros", "ones")
_UNCERTAIN_AS = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}
_SPLIT_SEED = 0  # the held-out patients must not change with --seed: evaluate draws them again


@dataclasses.dataclass(frozen=True)
class CsvSpec:
    """How to read a CSV data set: the training and validation CSV files (relative to the data
    folder, or absolute), the column of image paths (None: the first), the label columns (None:
    every other column but the patient column), the column naming each image's patient, the
    policy for uncertain (-1) labels (one of ``UNCERTAIN``) and, without ``val_csv``, the
    fraction of patients held out."""

    train_csv: str | None = None
    val_csv: str | None = None
    path_column: str | None = None
    label_columns: tuple[str, ...] | None = None
    patient_column: str | None = None
    uncertain: str = "ignore"
    val_fraction: float | None = None


@dataclasses.dataclass
class Table:
    """The rows of one CSV: image ``paths`` (under the data folder), ``labels`` (float32 (n, L), NaN
    missing; or int32 (n,) class indices), ``patients`` (one per row, or None), the label or class
    ``names``, and whether it is ``multi_label``."""

    paths: list[str]
    labels: np.ndarray
    patients: list[str] | None
    names: list[str]
    multi_label: bool

    def subset(self, rows: np.ndarray) -> Table:
        """The table of the rows at indices ``rows`` only."""
        return Table([self.paths[i] for i in rows], self.labels[rows],
                     None if self.patients is None else [self.patients[i] for i in rows], self.names,
                     self.multi_label)


def _where(csv_path: Path, row: int, line: int) -> str:
    return f"{csv_path}, row {row} (line {line})"


def _read_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, fields) of every row; DataError naming the file when it
    cannot be read, is empty, has a repeated column or a row of another length than the header."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, fields) for fields in reader if any(v.strip() for v in fields)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read the CSV ({getattr(e, 'strerror', None) or e})") from None
    if not header:
        raise DataError(f"{csv_path}: empty CSV file, no header")
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DataError(f"{csv_path}: column {repeated[0]!r} appears more than once in the header")
    if not rows:
        raise DataError(f"{csv_path}: no rows below the header")
    for row, (line, fields) in enumerate(rows, 1):
        if len(fields) != len(header):
            raise DataError(f"{_where(csv_path, row, line)}: {len(fields)} fields, the header has {len(header)}")
    return header, rows


def _column(header: list[str], name: str, option: str, csv_path: Path) -> int:
    if name not in header:
        shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
        raise DataError(f"{csv_path}: no column {name!r} ({option}); its columns: {shown}")
    return header.index(name)


def _label_value(text: str, uncertain: str) -> float | None:
    """A label cell as 1.0, 0.0 or NaN; None when it is no label value."""
    text = text.strip()
    if text == "" or text.lower() == "nan":
        return np.nan
    try:
        value = float(text)
    except ValueError:
        return None
    if value == -1:
        return _UNCERTAIN_AS[uncertain]
    return value if value in (0.0, 1.0) else None


def read_table(root: Path, csv_name: str, spec: CsvSpec, class_names: list[str] | None = None,
               multi_label: bool | None = None) -> Table:
    """The rows of ``root/csv_name`` as ``spec`` reads them (the module's rules). ``class_names``
    fixes the classes' order (one-label) or the label columns (multi-label), as another table or
    a weights file has them; ``multi_label`` overrides what the columns say.

    DataError naming the file (and the row and line) for an unknown column, a listed file that is
    not there, a label value that is not one, a class not among ``class_names``."""
    csv_path = root / csv_name
    header, rows = _read_rows(csv_path)
    path_col = _column(header, spec.path_column, "--path-column", csv_path) if spec.path_column else 0
    patient_col = (_column(header, spec.patient_column, "--patient-column", csv_path)
                   if spec.patient_column else None)
    label_names = spec.label_columns or (class_names if multi_label else None) or [
        h for i, h in enumerate(header) if i not in (path_col, patient_col)]
    label_cols = [_column(header, name, "--label-columns", csv_path) for name in label_names]
    if not label_cols:
        raise DataError(f"{csv_path}: no label columns besides the path column {header[path_col]!r}")
    if path_col in label_cols:
        raise DataError(f"{csv_path}: column {header[path_col]!r} is both the path and a label column")
    paths = [_checked_file(root, fields[path_col], csv_path, row, line)
             for row, (line, fields) in enumerate(rows, 1)]
    patients = [fields[patient_col].strip() for _, fields in rows] if patient_col is not None else None
    cells = [[fields[c] for c in label_cols] for _, fields in rows]
    if multi_label is None:
        multi_label = len(label_cols) > 1 or all(_label_value(v[0], spec.uncertain) is not None for v in cells)
    if multi_label:
        labels = _multi_labels(cells, label_names, spec.uncertain, csv_path, rows)
        return Table(paths, labels, patients, list(label_names), True)
    if len(label_cols) > 1:
        raise DataError(f"{csv_path}: one label per image is read from one column of class names, "
                        f"not {len(label_cols)} ({', '.join(label_names)})")
    column = [v[0].strip() for v in cells]
    names = class_names or _sorted_classes(column)
    return Table(paths, _class_indices(column, names, csv_path, rows), patients, names, False)


def _checked_file(root: Path, relative: str, csv_path: Path, row: int, line: int) -> str:
    if not relative.strip():
        raise DataError(f"{_where(csv_path, row, line)}: no image path")
    path = root / relative.strip()
    if not path.is_file():
        raise DataError(f"{_where(csv_path, row, line)}: {path}: no such image file")
    return str(path)


def _multi_labels(cells: list[list[str]], names, uncertain: str, csv_path: Path, rows) -> np.ndarray:
    labels = np.empty((len(cells), len(names)), np.float32)
    for i, values in enumerate(cells):
        for j, text in enumerate(values):
            value = _label_value(text, uncertain)
            if value is None:
                raise DataError(f"{_where(csv_path, i + 1, rows[i][0])}: column {names[j]!r}: {text.strip()!r} "
                                "is no label value (1, 0, -1 for uncertain, blank for missing)")
            labels[i, j] = value
    return labels


def _sorted_classes(column: list[str]) -> list[str]:
    distinct = set(column) - {""}
    if all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _class_indices(column: list[str], names: list[str], csv_path: Path, rows) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    for i, value in enumerate(column):
        if value not in index:
            what = "no class" if not value else f"class {value!r} is not one of {', '.join(names[:8])}"
            raise DataError(f"{_where(csv_path, i + 1, rows[i][0])}: {what}")
    return np.asarray([index[v] for v in column], np.int32)


def held_out_rows(table: Table, fraction: float) -> np.ndarray:
    """Whether each row is held out (bool (n,)): all rows of ``fraction`` of the patients (of the
    rows, without a patient column), drawn with a fixed seed from the sorted patient ids, so that
    no patient is on both sides. ValueError when that leaves a side empty."""
    keys = table.patients if table.patients is not None else [str(i) for i in range(len(table.paths))]
    patients = sorted(set(keys))
    count = round(fraction * len(patients))
    if not 0 < count < len(patients):
        raise ValueError(f"--val-fraction {fraction} of {len(patients)} "
                         f"{'patients' if table.patients is not None else 'rows'} leaves a split empty")
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(patients))
    held = {patients[i] for i in order[:count]}
    return np.asarray([k in held for k in keys])


def split_tables(root: Path, spec: CsvSpec, class_names: list[str] | None = None,
                 multi_label: bool | None = None) -> tuple[Table | None, Table]:
    """The training table (None without ``spec.train_csv``) and the held-out one: ``val_csv``'s
    rows, or ``val_fraction`` of the training CSV's patients (:func:`held_out_rows`)."""
    train = read_table(root, spec.train_csv, spec, class_names, multi_label) if spec.train_csv else None
    if spec.val_csv:
        names = train.names if train else class_names
        return train, read_table(root, spec.val_csv, spec, names, train.multi_label if train else multi_label)
    held = held_out_rows(train, spec.val_fraction)
    if train.patients is None:
        log.info("%s: holding out %.0f%% of the rows (no --patient-column: images of one patient may fall "
                 "on both sides)", root / spec.train_csv, 100 * spec.val_fraction)
    return train.subset(np.flatnonzero(~held)), train.subset(np.flatnonzero(held))


def check_spec(spec: CsvSpec, training: bool = True) -> None:
    """ValueError naming the option when ``spec`` cannot describe a data set: a training CSV (for
    training), a validation CSV or ``val_fraction`` in (0, 1) (not both), a known uncertain policy."""
    if training and not spec.train_csv:
        raise ValueError("--dataset csv needs --train-csv FILE (relative to --data-dir)")
    if not training and not (spec.val_csv or spec.train_csv):
        raise ValueError("--dataset csv needs --val-csv FILE, or --train-csv FILE with --val-fraction")
    if spec.uncertain not in UNCERTAIN:
        raise ValueError(f"--uncertain {spec.uncertain!r}: must be one of {', '.join(UNCERTAIN)}")
    if spec.val_csv and spec.val_fraction is not None:
        raise ValueError("--val-fraction splits the training CSV; leave it out with --val-csv")
    if not spec.val_csv and spec.val_fraction is None:
        raise ValueError("--dataset csv needs --val-csv FILE, or --val-fraction F to hold out part of "
                         "--train-csv")
    if spec.val_fraction is not None and not 0 < spec.val_fraction < 1:
        raise ValueError(f"--val-fraction {spec.val_fraction}: must be between 0 and 1")


def csv_dataset(data_dir: str | os.PathLike, spec: CsvSpec, image_size: int = 224, strict: bool = False,
                mode: str = "RGB") -> Dataset:
    """The CSV data set ``spec`` describes under ``data_dir`` (module doc), images read in ``mode``
    ("L" for one channel), with CheXNet's preparation: the shorter side resized to ``image_size``
    and centre-cropped square, a random horizontal flip in training, normalised with ImageNet's
    mean and std (their averages for "L"). DataError or ValueError naming the file, row or option."""
    check_spec(spec)
    root = Path(data_dir)
    train, val = split_tables(root, spec)
    cfg = PretrainedCfg().with_in_chans(1 if mode == "L" else 3)
    normalize = T.Normalize(cfg.mean, cfg.std)
    resize = T.ResizeCenterCrop(image_size, image_size)
    return Dataset("csv", FileSource(train.paths, train.labels, mode, strict),
                   FileSource(val.paths, val.labels, mode, strict), len(train.names), image_size,
                   augment=T.Compose([resize, T.RandomFlip(), normalize]),
                   preprocess=T.Compose([resize, normalize]), class_names=train.names,
                   multi_label=train.multi_label)

"""Hugging Face data sets (``--dataset hfds/NAME``): a Hub name, a local folder of Parquet files laid
out as the Hub stores them (``data/train-00000-of-00004.parquet``, ...), or a ``save_to_disk``
folder, read through the ``datasets`` library (an optional extra, imported only here).

Rows are read by index from ``datasets``' memory-mapped Arrow tables, so the training pipeline
shuffles, splits across hosts and resumes them as it does a folder's files: a host decodes only its
rows. The image column's bytes are decoded by this package (``images.decode_image``) with the
folder's mode rules and unreadable-image rule, naming the row; labels come from the target column,
class names from its ``ClassLabel`` feature (``timm``'s ``hfds`` reader takes the same keys:
``image`` and ``label`` by default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from densenet_jax.data.folder import StandInSource, image_dataset
from densenet_jax.data.images import decode_image, read_image
from densenet_jax.errors import DataError

PREFIX = "hfds/"
INPUT_KEY, TARGET_KEY = "image", "label"
TRAIN_SPLIT, VAL_SPLIT = "train", "validation"


class RowSource(StandInSource):
    """The rows of a ``datasets.Dataset`` as examples (see ``folder.StandInSource``): the image
    column ``input_key`` decoded in ``mode``, labels from ``labels`` (int32). ``where`` names the
    split in errors and warnings (``hfds/NAME[train] row 17``)."""

    def __init__(self, rows, input_key: str, labels: np.ndarray, where: str, mode: str = "RGB",
                 strict: bool = False):
        super().__init__(labels, strict)
        self.rows, self.input_key, self.mode, self.name = rows, input_key, mode, where

    def read(self, index: int):
        """Row ``index``'s image: its bytes decoded, or the file it names read."""
        cell = self.rows[int(index)][self.input_key]  # {"bytes": ..., "path": ...}: decode=False
        name = f"{self.name} row {index}"
        if cell.get("bytes") is None:  # a data set that stores paths to image files
            return read_image(cell["path"], self.mode)
        return decode_image(cell["bytes"], name, self.mode)

    def where(self) -> str:
        """The data set and split, as ``hfds/NAME[split]``."""
        return self.name


def load_rows(name: str, split: str):
    """Split ``split`` of data set ``name`` (a ``save_to_disk`` folder, a folder of Parquet files, or
    a Hub name, looked up in the Hub cache alone under ``HF_HUB_OFFLINE=1``) as a
    ``datasets.Dataset``. DataError, in one line, for a name or split that cannot be read."""
    import datasets  # optional extra ``data``: only this source needs it

    datasets.logging.disable_progress_bar()
    folder = Path(name).expanduser()
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            saved = datasets.load_from_disk(str(folder))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise DataError(f"{PREFIX}{name}: no split {split!r} (it has {', '.join(saved)})")
                return saved[split]
            return saved  # one split saved alone: it serves whichever is asked
        return datasets.load_dataset(str(folder) if folder.is_dir() else name, split=split)
    except DataError:
        raise
    except ValueError as e:
        if "Unknown split" in str(e) or "split" in str(e).lower():
            raise DataError(f"{PREFIX}{name}: no split {split!r} ({_first_line(e)})") from None
        raise DataError(f"{PREFIX}{name}: cannot read it ({_first_line(e)})") from None
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataError(f"{PREFIX}{name}: cannot read it ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def split_source(name: str, split: str, input_key: str, target_key: str, mode: str,
                 strict: bool) -> tuple[RowSource, list[str]]:
    """``(examples, class names)`` of one split. DataError naming the split and the column for a
    missing input or target column, an input column that holds no images, or a label outside the
    class names."""
    import datasets  # optional extra ``data``: only this source needs it

    rows = load_rows(name, split)
    where = f"{PREFIX}{name}[{split}]"
    for key, what in ((input_key, "--input-key"), (target_key, "--target-key")):
        if key not in rows.features:
            raise DataError(f"{where}: no column {key!r} ({what}; columns: {', '.join(rows.features)})")
    if not isinstance(rows.features[input_key], datasets.Image):
        raise DataError(f"{where}: column {input_key!r} holds {rows.features[input_key]}, not images (--input-key)")
    target = rows.features[target_key]
    labels = np.asarray(rows.data.column(target_key).to_numpy(zero_copy_only=False), np.int64)
    if isinstance(target, datasets.ClassLabel):
        classes = list(target.names)
    else:
        classes = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise DataError(f"{where} row {bad[0]}: label {labels[bad[0]]} is not one of the "
                        f"{len(classes)} classes (column {target_key!r})")
    rows = rows.cast_column(input_key, datasets.Image(decode=False))  # decoded here, by our rules
    return RowSource(rows, input_key, labels.astype(np.int32), where, mode, strict), classes


def hf_dataset(name: str, image_size: int = 224, strict: bool = False, mode: str = "RGB",
               input_key: str | None = None, target_key: str | None = None,
               train_split: str | None = None, val_split: str | None = None):
    """``hfds/<name>`` as a Dataset: splits ``train_split`` (default ``train``) and ``val_split``
    (``validation``), images from column ``input_key`` (``image``), labels from ``target_key``
    (``label``), with an image folder's transforms (``folder.image_folder``). DataError naming the
    split for classes that differ between the splits."""
    input_key, target_key = input_key or INPUT_KEY, target_key or TARGET_KEY
    train, classes = split_source(name, train_split or TRAIN_SPLIT, input_key, target_key, mode, strict)
    val, val_classes = split_source(name, val_split or VAL_SPLIT, input_key, target_key, mode, strict)
    if val_classes != classes and len(val_classes) > len(classes):
        raise DataError(f"{val.where()}: {len(val_classes)} classes, {train.where()} has {len(classes)}")
    return image_dataset(PREFIX + name, train, val, classes, image_size, mode)

"""What a run leaves in its work directory besides checkpoints: metrics.jsonl and curves.png."""

from __future__ import annotations

import io
import json
from pathlib import Path

from densenet_jax.files import atomic_write_bytes

# images_per_sec leaves out the process's first step (compilation), timed apart in
# first_step_seconds on the row of the epoch it fell in (null on the others).
FIELDS = ("epoch", "step", "train_loss", "train_acc", "eval_loss", "eval_acc", "images_per_sec", "seconds",
          "first_step_seconds")
# Multi-label runs' rows add these (densenet_jax.train.multilabel): the mean AUROC and AUPRC over the
# labels where they are defined, and each label's ({name: value}, null where undefined).
MULTI_LABEL_FIELDS = ("eval_auroc", "eval_auprc", "eval_auroc_labels", "eval_auprc_labels")
EMA_FIELDS = ("eval_loss_ema", "eval_acc_ema") + tuple(f"{f}_ema" for f in MULTI_LABEL_FIELDS)  # --model-ema


def selection_key(rows: list[dict], ema: bool = False) -> str:
    """The held-out figure a run's best epoch is chosen on: the mean AUROC for multi-label rows,
    else accuracy; the EMA weights' (``*_ema``) with ``ema``."""
    key = "eval_auroc" if rows and "eval_auroc" in rows[-1] else "eval_acc"
    return f"{key}_ema" if ema else key


def best_row(rows: list[dict], ema: bool = False) -> dict:
    """The epoch whose weights best.safetensors holds: the best on :func:`selection_key`, the
    later of a tie (each epoch as good as the best so far replaces it); an undefined mean AUROC
    (no label with both classes held out) ranks below every number."""
    key = selection_key(rows, ema)
    values = [-float("inf") if r.get(key) is None else r[key] for r in rows]
    return rows[max(range(len(rows)), key=lambda i: (values[i], i))]


def is_best(rows: list[dict], ema: bool = False) -> bool:
    """Whether the last row is :func:`best_row` (best.safetensors is to be written for it)."""
    return best_row(rows, ema) is rows[-1]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file atomically (it stays small: one line per epoch)."""
    text = "".join(json.dumps({**{k: row.get(k) for k in FIELDS},
                               **{k: row[k] for k in MULTI_LABEL_FIELDS + EMA_FIELDS if k in row}})
                   + "\n" for row in rows)
    atomic_write_bytes(path, text.encode())


def plot_curves(path: Path, rows: list[dict]) -> None:
    """Loss and accuracy against epoch, train and held-out, as a PNG; multi-label rows add the
    held-out mean AUROC."""
    import matplotlib  # lazy: optional (the train extra), needed only once an epoch ends
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    panels = [("loss", "loss"), ("acc", "accuracy")] + [("auroc", "mean AUROC")] * ("eval_auroc" in rows[-1])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        if f"train_{key}" in rows[-1]:
            ax.plot(epochs, [r[f"train_{key}"] for r in rows], marker=".", label="train")
        # Markers: a first epoch is a single point, which a line alone does not draw.
        ax.plot(epochs, [float("nan") if r[f"eval_{key}"] is None else r[f"eval_{key}"] for r in rows],
                marker=".", label="held-out")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


# Beside the checkpoints, the running sums of the epoch each mid-epoch checkpoint stopped in, so that
# a resumed epoch reports the same train loss and accuracy as an uninterrupted one.
PARTIAL = "partial_epochs.json"


def write_partial_epoch(workdir: Path, step: int, totals: dict, keep: int) -> None:
    """Record ``totals`` (the epoch's sums up to checkpoint ``step``), keeping the last ``keep``
    records. Written before the checkpoint itself, so that a checkpoint never lacks its record."""
    records = _read_partials(workdir)
    records[str(step)] = totals
    kept = sorted(records, key=int)[-keep:]
    atomic_write_bytes(workdir / PARTIAL, json.dumps({k: records[k] for k in kept}).encode())


def remove_partial_epochs(workdir: Path) -> None:
    """Delete the record once the run is complete (one unlink: the file is there whole or gone);
    a later, longer run starts its next epoch from its first step, with nothing to read."""
    (workdir / PARTIAL).unlink(missing_ok=True)


def read_partial_epoch(workdir: Path, step: int) -> dict | None:
    """The sums recorded with the mid-epoch checkpoint at ``step``, or None if there are none."""
    return _read_partials(workdir).get(str(step))


def _read_partials(workdir: Path) -> dict:
    path = workdir / PARTIAL
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # damaged: the resumed epoch's figures then cover only its remaining steps
        return {}

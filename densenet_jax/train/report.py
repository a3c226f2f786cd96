"""What a run leaves in its work directory besides checkpoints: metrics.jsonl and curves.png."""

from __future__ import annotations

import json
from pathlib import Path

from densenet_jax.weights import atomic_write_bytes

FIELDS = ("epoch", "step", "train_loss", "train_acc", "eval_loss", "eval_acc", "images_per_sec", "seconds")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file atomically (it stays small: one line per epoch)."""
    text = "".join(json.dumps({k: row[k] for k in FIELDS}) + "\n" for row in rows)
    atomic_write_bytes(path, text.encode())


def plot_curves(path: Path, rows: list[dict]) -> None:
    """Loss and accuracy against epoch, train and held-out, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], label="train")
        ax.plot(epochs, [r[f"eval_{key}"] for r in rows], label="held-out")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)

"""An epoch's running figures: loss and accuracy sums, wall time, and images/s without compilation."""

from __future__ import annotations

import time

# An epoch's running sums: loss and correct predictions over its steps, wall seconds, and the images
# and seconds of the steps timed for images/s (all but a process's first, which compiles).
EMPTY_TOTALS = {"loss": 0.0, "correct": 0.0, "steps": 0, "seconds": 0.0, "timed_images": 0, "timed_seconds": 0.0}


def images_per_second(totals: dict, batch_size: int) -> float:
    """Training throughput without compilation; when only the first step ran, with it."""
    if totals["timed_images"]:
        return totals["timed_images"] / totals["timed_seconds"]
    return totals["steps"] * batch_size / max(totals["seconds"], 1e-9)


class EpochMeter:
    """``totals`` (EMPTY_TOTALS's form) of one epoch, on top of what a resumed epoch had, and the
    steps dispatched whose metrics are not read yet. Metrics are read back a few steps at a time
    because reading waits for the device."""

    def __init__(self, totals: dict, batch_size: int):
        self.totals, self.base, self.batch_size = totals, dict(totals), batch_size
        self.started = self.clock = time.perf_counter()  # clock: where the timed steps begin
        self.timed = 0
        self.pending: list[tuple[int, dict]] = []  # (step, its metrics on the device)

    def dispatched(self, step: int, metrics: dict, timed: bool = True) -> None:
        """Step ``step`` was dispatched; an untimed one is a process's first (it compiles)."""
        self.pending.append((step, metrics))
        self.timed += timed

    def first_step_done(self, dispatched_at: float) -> float:
        """The process's first step ended now: timing starts here; returns that step's seconds."""
        self.clock = time.perf_counter()
        return self.clock - dispatched_at

    def add(self, metrics: dict[str, float]) -> None:
        """Count one read step's loss and correct predictions."""
        self.totals["loss"] += metrics["loss"]
        self.totals["correct"] += metrics["correct"]
        self.totals["steps"] += 1

    def update_times(self) -> None:
        """Bring the totals' times up to now."""
        now = time.perf_counter()
        self.totals["seconds"] = self.base["seconds"] + now - self.started
        self.totals["timed_images"] = self.base["timed_images"] + self.timed * self.batch_size
        self.totals["timed_seconds"] = self.base["timed_seconds"] + now - self.clock

    def postfix(self) -> dict[str, str]:
        """The progress bar's figures so far."""
        t = self.totals
        return {"loss": f"{t['loss'] / t['steps']:.4f}",
                "acc": f"{t['correct'] / (t['steps'] * self.batch_size):.4f}",
                "img_s": f"{images_per_second(t, self.batch_size):.0f}"}

    def summary(self) -> dict[str, float]:
        """The epoch's train figures as metrics.jsonl records them."""
        t, seen = self.totals, max(self.totals["steps"], 1)
        return {"train_loss": t["loss"] / seen, "train_acc": t["correct"] / (seen * self.batch_size),
                "images_per_sec": images_per_second(t, self.batch_size), "seconds": t["seconds"]}

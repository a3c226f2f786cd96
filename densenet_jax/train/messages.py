"""What a training run tells its user: a start-up block, a line per epoch, where a stopped run
stands, and a warning for a precision that is slow where it runs."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from densenet_jax.data import Dataset
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.registry import architecture_name


def parameter_count(model: DenseNet) -> int:
    """Trainable parameters (BatchNorm running statistics not counted)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def startup_lines(config, data: Dataset, model: DenseNet, workdir: Path, *, start: int,
                  steps_per_epoch: int, total_steps: int) -> list[str]:
    """The block a run prints before its first step: what trains on what, where, and from where.

    ``config`` is the run's TrainConfig; ``start`` the step it starts (or resumes) at.
    """
    c = config
    source = f" from {c.init_from}" if c.init_from else ""
    devices = jax.device_count()
    return [
        f"model: {architecture_name(model.config)}{source}, {parameter_count(model):,} parameters, "
        f"{model.config.num_classes} classes{', head only' if c.head_only else ''}",
        f"data: {data.name}, {len(data.train):,} training and {len(data.eval):,} held-out images, "
        f"{data.image_size}x{data.image_size}",
        f"devices: {devices} {jax.default_backend()} device{'s' * (devices > 1)} in "
        f"{jax.process_count()} process{'es' * (jax.process_count() > 1)} ({c.parallel})",
        f"batch {c.batch_size} ({c.batch_size // devices} per device), {steps_per_epoch} steps per "
        f"epoch, {c.epochs} epoch{'s' * (c.epochs != 1)} = {total_steps} steps; lr {c.lr}, "
        f"{c.sched or c.schedule} schedule; "
        f"precision {c.precision}",
        f"work directory: {workdir}; {starting_point(start, steps_per_epoch, total_steps)}",
    ]


def starting_point(start: int, steps_per_epoch: int, total_steps: int) -> str:
    """Where a run starts: at step 0, resuming (at an epoch's start or within it), complete, or
    past the steps asked for (a longer run's folder, finished or not)."""
    epoch, into = divmod(start, steps_per_epoch)
    if start == total_steps:
        return f"complete at step {start}"
    if start > total_steps:
        return f"at step {start}, past the {total_steps} steps asked for"
    if into:
        return f"resuming at step {start} (epoch {epoch + 1}, {into} of its {steps_per_epoch} steps done)"
    if start:
        return f"resuming at step {start} (the start of epoch {epoch + 1})"
    return "starting at step 0"


def nothing_to_train(workdir, start: int, steps_per_epoch: int, total_steps: int) -> str | None:
    """Why a run that starts at step ``start`` trains nothing, or None when it trains: it is
    complete, or past the steps asked for (a longer run's folder, finished or not, left as it is)."""
    if start < total_steps:
        return None
    where = starting_point(start, steps_per_epoch, total_steps)
    if start == total_steps:
        return (f"{workdir}: {where} ({total_steps} asked for); nothing to do (a larger --epochs continues it, "
                "another --workdir starts a new run)")
    return (f"{workdir}: {where}; nothing to do, nothing written (run.json records the run's own --epochs; "
            "another --workdir starts a new run)")


def epoch_line(row: dict, epochs: int) -> str:
    """One epoch's figures (a metrics.jsonl row), with the process's first step timed apart when it
    fell in this epoch, because it includes compilation (or loading the compiled step)."""
    line = (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}, "
            f"held-out loss {row['eval_loss']:.4f} acc {row['eval_acc']:.4f}, "
            + (f"EMA loss {row['eval_loss_ema']:.4f} acc {row['eval_acc_ema']:.4f}, " if "eval_acc_ema" in row else "")
            + f"{row['images_per_sec']:.0f} images/s, {row['seconds']:.0f} s")
    if "eval_auroc" in row:  # multi-label: acc is exact match; AUROC is what the run is chosen on
        auroc = "undefined" if row["eval_auroc"] is None else f"{row['eval_auroc']:.4f}"
        line = line.replace(", held-out loss", f", held-out mean AUROC {auroc}, loss", 1)
    if row.get("first_step_seconds") is not None:
        line += f" (first step {row['first_step_seconds']:.1f} s: compiling, or loading from the cache)"
    return line


def stopped_line(step: int, steps_per_epoch: int, total_steps: int) -> str:
    """Where a run that ``--max-steps`` stopped early stands, and how to go on."""
    epoch, into = divmod(step, steps_per_epoch)
    at = f"end of epoch {epoch}" if into == 0 else f"epoch {epoch + 1}, {into} of its {steps_per_epoch} steps"
    return (f"stopped by --max-steps at step {step} of {total_steps} ({at}), checkpoint saved; "
            "run the same command again to continue")


def precision_warning(precision: str) -> str | None:
    """A warning when ``precision`` is bf16 on a CPU, where XLA has no fast bf16 convolution or
    matmul path, so that nobody takes the slowness for a fault; bf16 pays off on GPUs and TPUs."""
    if precision == "bf16" and jax.default_backend() == "cpu":
        return ("warning: --precision bf16 on a CPU is about 7x slower than fp32 (XLA:CPU has no fast "
                "bf16 path); it is meant for GPUs and TPUs")
    return None

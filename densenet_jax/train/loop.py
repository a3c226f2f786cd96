"""The training loop: data, steps, checkpoints, metrics, and the weight files a run leaves."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from densenet_jax.data import Dataset, eval_batches, load_dataset, train_batches
from densenet_jax.data import transforms as T
from densenet_jax.data.pipeline import steps_per_epoch
from densenet_jax.errors import DivergedError, Interrupted
from densenet_jax.factory import create_model, load
from densenet_jax.model.densenet import DenseNet, smallest_input
from densenet_jax.model.pretrained_cfg import PretrainedCfg
from densenet_jax.model.registry import get_config
from densenet_jax.train import optim, parallel, workdir
from densenet_jax.train.checkpoint import Checkpoints, has_checkpoints
from densenet_jax.train.messages import (architecture_name, check_batch_statistics, epoch_line,
                                         precision_warning, startup_lines, stopped_line)
from densenet_jax.train.report import (plot_curves, read_metrics, read_partial_epoch, write_metrics,
                                       write_partial_epoch)
from densenet_jax.train.signals import StopSignals
from densenet_jax.weights.format import cast, state_arrays, write_safetensors

log = logging.getLogger("densenet_jax")

# bf16: bfloat16 compute, fp32 parameters, statistics and loss. fp64 (with jax_enable_x64): for
# reference runs where fp32 rounding would hide whether two set-ups compute the same thing.
PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp64": jnp.float64}


@dataclasses.dataclass
class TrainConfig:
    model: str = "densenet_40_k12"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    schedule: optim.Schedule = "cifar"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    workdir: str | None = None  # None: runs/<model>-<dataset> (workdir.default_workdir)
    init_from: str | None = None
    pretrained: str | None = None  # a pretrained tag (densenet121.ra_in1k) to fine-tune, from the Hub
    in_chans: int = 3  # input channels; folder data is read as greyscale for 1
    head_only: bool = False
    precision: str = "fp32"
    parallel: str = "mesh"
    seed: int = 0
    drop_rate: float = 0.0
    memory_efficient: bool = False
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch
    keep: int = 3
    workers: int = 0
    strict: bool = False  # folder data: an unreadable image stops the run instead of being skipped
    image_size: int = 224  # folder data: the crop size
    max_steps: int = 0  # stop after this many steps of this invocation (0: to the end); rerun to go on
    progress: bool = True


def build_model(config: TrainConfig, num_classes: int) -> DenseNet:
    """The model to train: from ``init_from`` or a ``pretrained`` tag (a new head if the class
    count differs, conv0 adapted to ``in_chans``), or fresh."""
    rngs = nnx.Rngs(config.seed)
    options = dict(drop_rate=config.drop_rate, memory_efficient=config.memory_efficient,
                   in_chans=config.in_chans)
    if config.init_from and config.pretrained:
        raise ValueError("--init-from and --pretrained both name the starting weights: give one")
    if config.init_from:
        return load(config.init_from, num_classes=num_classes, rngs=rngs, **options)
    if config.pretrained:
        # proj_drop_rate: the per-layer dropout whatever the name (timm's drop_rate is the head's).
        return create_model(config.pretrained, pretrained=True, num_classes=num_classes, rngs=rngs,
                            proj_drop_rate=options.pop("drop_rate"), **options)
    return DenseNet(get_config(config.model, num_classes=num_classes, **options), rngs=rngs)


def preprocessing_cfg(data: Dataset) -> PretrainedCfg:
    """``data``'s eval preprocessing as a pretrained cfg (size, resize as crop_pct, interpolation,
    mean/std, channels), stored with the weights a run writes so that ``predict`` prepares images
    exactly as ``evaluate`` did. Read off the data set's own transforms."""
    steps = getattr(data.preprocess, "transforms", [data.preprocess])
    normalize = next(t for t in steps if isinstance(t, T.Normalize))
    crop = next((t for t in steps if isinstance(t, T.ResizeCenterCrop)), None)
    size = crop.crop if crop else data.image_size
    interpolation = {v: k for k, v in T.INTERPOLATIONS.items()}[crop.interpolation] if crop else "bilinear"
    return PretrainedCfg(input_size=(len(normalize.mean), size, size), interpolation=interpolation,
                         crop_pct=size / crop.resize if crop else 1.0, num_classes=data.num_classes,
                         mean=tuple(map(float, normalize.mean)), std=tuple(map(float, normalize.std)))


class Run:
    """One training run in its work directory; ``fit`` resumes from the latest checkpoint there."""

    def __init__(self, config: TrainConfig):
        if config.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}")
        self.config = config
        self.workdir = Path(config.workdir or workdir.default_workdir(
            config.pretrained or config.model, config.dataset, config.init_from, config.data_dir))
        self.is_main = jax.process_index() == 0
        # Read the data first: a bad folder fails in a second, not after compiling.
        self.data: Dataset = load_dataset(config.dataset, config.data_dir, config.strict, config.image_size,
                                          config.in_chans)
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), config.batch_size,
                                               jax.process_count())
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch size {config.batch_size} exceeds the {len(self.data.train)} "
                             "training examples")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.model = build_model(config, self.data.num_classes)
        minimum = smallest_input(self.model.config)
        if self.data.image_size < minimum:  # said before the work directory is touched
            raise ValueError(f"images of {self.data.image_size}x{self.data.image_size} are too small for "
                             f"{architecture_name(self.model.config)}: at least {minimum}x{minimum}"
                             + (" (--image-size)" if config.dataset == "folder" else ""))
        if not config.head_only:  # a frozen backbone normalises with its running statistics
            check_batch_statistics(self.model, config.batch_size, self.data.image_size)
        if warning := precision_warning(config.precision):
            log.warning(warning)
        self.first_step_seconds: float | None = None  # this process's first step: compilation
        if config.precision == "fp64":
            if not jax.config.jax_enable_x64:
                raise ValueError("--precision fp64 needs jax_enable_x64 (JAX_ENABLE_X64=1)")
            cast(self.model, jnp.float64)
        self.schedule = optim.learning_rate(config.schedule, config.lr, self.total_steps,
                                            self.steps_per_epoch, config.warmup_epochs)
        tx = optim.sgd(config.momentum, config.weight_decay)
        if config.head_only:
            tx = optim.head_only(tx)
        self.runner = parallel.make(config.parallel, self.model, tx, self._step_store(), seed=config.seed,
                                    compute_dtype=PRECISIONS[config.precision],
                                    freeze_features=config.head_only)

    def _step_store(self) -> tuple[Path, str] | None:
        """Where the traced train step is kept for reruns (beside XLA's compilation cache, when that
        is on), and everything the step depends on besides its code and argument shapes."""
        cache = jax.config.jax_compilation_cache_dir
        if not cache:
            return None
        # The learning rate is an argument of the step, so its schedule shapes nothing in it.
        not_in_program = {"workdir", "max_steps", "checkpoint_every", "keep", "workers", "progress",
                          "strict", "data_dir", "init_from", "lr", "epochs", "schedule", "warmup_epochs"}
        shaping = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in not_in_program}
        key = repr((sorted(shaping.items()), self.model.config))
        return Path(cache) / "densenet-jax-steps", key

    def fit(self) -> dict:
        """Train from the latest intact checkpoint to the end (or ``max_steps`` further).

        Raises DivergedError on a NaN/Inf loss and Interrupted after SIGINT/SIGTERM; in both cases
        the checkpoints on disk are complete and hold only finite states. Raises WorkdirError, with
        nothing written or compiled, when the work directory belongs to another run (see
        :mod:`densenet_jax.train.workdir`). A run already complete is left as it is.
        """
        c = self.config
        # Whose folder this is, checked before anything in it is created or compiled.
        self.record = workdir.describe(c, self.model.config, self.data)
        workdir.check(self.workdir, self.record, has_checkpoints(self.workdir / "checkpoints"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        checkpoints = Checkpoints(self.workdir / "checkpoints", keep=c.keep)
        try:
            with StopSignals() as signals:
                state, step = self._train(checkpoints, signals)
        finally:
            checkpoints.close()
        final = self.workdir / "model.safetensors"
        # A complete run's files are left as they are; the final weights are written once (or
        # again, if a kill came between the last checkpoint and them).
        if step >= self.total_steps and self.is_main and (step > self.start_step or not final.exists()):
            self._write_weights(state, final)
            log.info("final weights: %s", final)
        return {"step": step, "state": state, "metrics": self.rows}

    def _train(self, checkpoints: Checkpoints, signals: StopSignals):
        c = self.config
        state, start = self._restore(checkpoints)
        self.start_step = start
        if self.is_main:
            for line in startup_lines(self, start):
                log.info(line)
        self.rows = [r for r in read_metrics(self.workdir / "metrics.jsonl") if r["step"] <= start]
        if start >= self.total_steps:
            log.info("%s: complete at step %d of %d; nothing to do (a larger --epochs continues it, "
                     "another --workdir starts a new run)", self.workdir, start, self.total_steps)
        stop = min(self.total_steps, start + c.max_steps) if c.max_steps else self.total_steps
        step = start
        while step < stop:
            epoch, first = divmod(step, self.steps_per_epoch)
            last = min(self.steps_per_epoch, first + stop - step)
            state, step, train_metrics = self._train_epoch(state, epoch, first, last, checkpoints, signals)
            if step % self.steps_per_epoch == 0 and step > epoch * self.steps_per_epoch:  # it ended here
                first_step = self.first_step_seconds if epoch == start // self.steps_per_epoch else None
                evaluation = self._evaluate_unless_stopped(state, signals)
                if evaluation is not None:
                    self.rows.append({"epoch": epoch + 1, "step": step, **train_metrics, **evaluation,
                                      "first_step_seconds": first_step})
                    self._report(state, self.rows)
                    if self.is_main:
                        log.info(epoch_line(self.rows[-1], c.epochs))
            # A stop acknowledged anywhere (data wait, step, device wait, fetch, evaluation, a
            # checkpoint write) ends here, with the last completed step checkpointed.
            if step % self.steps_per_epoch == 0 or step == stop or signals.received:
                self._checkpoint(checkpoints, step, state)
            if signals.received:
                raise Interrupted(signals.received, step)
        if step < self.total_steps and self.is_main:
            log.info(stopped_line(step, self.steps_per_epoch, self.total_steps))
        return state, step

    def _checkpoint(self, checkpoints: Checkpoints, step: int, state) -> None:
        if step != checkpoints.latest_step():
            if step % self.steps_per_epoch and self.is_main:
                write_partial_epoch(self.workdir, step, self.totals, self.config.keep + 1)
            checkpoints.save(step, self.runner.host_state(state))

    def _restore(self, checkpoints: Checkpoints):
        initial = self.runner.steps.initial
        # A host template: the checkpoint is read into numpy, then placed as the runner places states.
        restored = checkpoints.restore_latest_good(jax.tree.map(np.asarray, initial))
        if self.is_main:  # the folder is this run's now (a different one was refused by now)
            workdir.write(self.workdir, self.record)
        if restored is None:
            return self.runner.place_state(initial), 0
        host, step = restored
        log.info("resuming from %s at step %d", checkpoints.directory, step)
        return self.runner.place_state(host), step

    def _train_epoch(self, state, epoch, first, last, checkpoints, signals):
        """Steps ``first``..``last`` of ``epoch``; returns early, every step's metrics checked, when
        a stop signal came (the caller checkpoints)."""
        c = self.config
        batches = train_batches(self.data.train, self.data.augment, seed=c.seed, epoch=epoch,
                                global_batch=c.batch_size, start_step=first,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), workers=c.workers)
        bar = _progress(c.progress and self.is_main, total=self.steps_per_epoch, initial=first,
                        desc=f"epoch {epoch + 1}/{c.epochs}")
        step = epoch * self.steps_per_epoch + first
        self.totals = totals = self._epoch_totals(step) if first else dict(EMPTY_TOTALS)
        timing = _Timing(totals)
        pending = []
        for i in range(first, last):
            try:
                batch = next(batches)
            except Exception:
                if signals.received:  # a SIGTERM to the process group ended the data workers too
                    break
                raise
            if signals.received:  # it came during the data wait: no further step
                break
            images, labels = self.runner.place_batch(batch["image"], batch["label"])
            dispatched = time.perf_counter()
            state, metrics = self.runner.train(state, images, labels, self.schedule(step))
            step += 1
            if self.first_step_seconds is None:
                jax.block_until_ready(metrics)
                self.first_step_seconds = timing.untimed_step(dispatched)
            else:
                timing.timed += 1
            pending.append((step, metrics))
            save = c.checkpoint_every and step % c.checkpoint_every == 0
            # Fetching syncs, so only every few steps; always before a checkpoint, so that no
            # checkpoint ever holds a state that a NaN loss has touched.
            if save or len(pending) == 10 or i + 1 == last:
                self._fetch_metrics(pending, timing, checkpoints)
                bar.set_postfix(loss=f"{totals['loss'] / totals['steps']:.4f}",
                                acc=f"{totals['correct'] / (totals['steps'] * c.batch_size):.4f}",
                                img_s=f"{images_per_second(totals, c.batch_size):.0f}")
            bar.update(1)
            if save:
                self._checkpoint(checkpoints, step, state)
            if signals.received:
                break
        # A stop can leave steps unread (it came after this step's fetch): read them before the
        # caller checkpoints this state.
        self._fetch_metrics(pending, timing, checkpoints)
        bar.close()
        seen = max(totals["steps"], 1)
        return state, step, {"train_loss": totals["loss"] / seen,
                             "train_acc": totals["correct"] / (seen * c.batch_size),
                             "images_per_sec": images_per_second(totals, c.batch_size),
                             "seconds": totals["seconds"]}

    def _fetch_metrics(self, pending: list, timing: _Timing, checkpoints: Checkpoints) -> None:
        """Add the ``(step, metrics)`` in ``pending`` to the epoch's totals and empty it.
        DivergedError at the first NaN or Inf loss or gradient norm."""
        totals = timing.totals
        for at, m in pending:
            m = self.runner.fetch(m)
            if not np.isfinite([m["loss"], m["grad_norm"]]).all():
                raise DivergedError(at, m["loss"], m["grad_norm"], checkpoints.latest_step())
            totals["loss"] += m["loss"]
            totals["correct"] += m["correct"]
        totals["steps"] += len(pending)
        pending.clear()
        timing.update(self.config.batch_size)

    def _epoch_totals(self, step: int) -> dict:
        """The running sums of the epoch that a mid-epoch checkpoint at ``step`` stopped in."""
        totals = read_partial_epoch(self.workdir, step)
        if totals is None and self.is_main:
            log.warning("warning: no record of the steps before %d in this epoch; its train loss and "
                        "accuracy cover only the steps from %d on", step, step)
        return totals or dict(EMPTY_TOTALS)

    def _evaluate_unless_stopped(self, state, signals: StopSignals) -> dict | None:
        """The epoch's evaluation; None when a stop signal ended it (a SIGTERM to the process
        group ends the data workers too): the epoch's state is checkpointed all the same."""
        try:
            return self.evaluate(state)
        except Exception:
            if signals.received:
                return None
            raise

    def evaluate(self, state) -> dict:
        """Loss and accuracy on the held-out split."""
        return evaluate_state(self.runner, state, self.data, self.config.batch_size, self.config.workers)

    def _report(self, state, rows):
        if not self.is_main:
            return
        write_metrics(self.workdir / "metrics.jsonl", rows)
        plot_curves(self.workdir / "curves.png", rows)
        if rows[-1]["eval_acc"] >= max(r["eval_acc"] for r in rows):
            self._write_weights(state, self.workdir / "best.safetensors")

    def _write_weights(self, state, path: Path):
        model = self.runner.steps.model(self.runner.host_state(state))
        write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()},
                          model.config.replace(memory_efficient=False, drop_rate=0.0, head_drop_rate=0.0), path,
                          class_names=self.data.class_names, pretrained_cfg=preprocessing_cfg(self.data))


# An epoch's running sums: loss and correct predictions over its steps, wall seconds, and the images
# and seconds of the steps timed for images/s (all but a process's first, which compiles).
EMPTY_TOTALS = {"loss": 0.0, "correct": 0.0, "steps": 0, "seconds": 0.0, "timed_images": 0, "timed_seconds": 0.0}


def images_per_second(totals: dict, batch_size: int) -> float:
    """Training throughput without compilation; when only the first step ran, with it."""
    if totals["timed_images"]:
        return totals["timed_images"] / totals["timed_seconds"]
    return totals["steps"] * batch_size / max(totals["seconds"], 1e-9)


class _Timing:
    """Keeps an epoch's ``seconds`` and the timed images and seconds (for images/s, all steps but a
    process's first, which compiles) in ``totals``, on top of what a resumed epoch had."""

    def __init__(self, totals: dict):
        self.totals, self.base = totals, dict(totals)
        self.started = self.clock = time.perf_counter()  # clock: where the timed steps begin
        self.timed = 0

    def untimed_step(self, dispatched: float) -> float:
        """The first step ended now: timing starts here; returns that step's seconds."""
        self.clock = time.perf_counter()
        return self.clock - dispatched

    def update(self, batch_size: int) -> None:
        """Bring the totals' times up to now."""
        now = time.perf_counter()
        self.totals["seconds"] = self.base["seconds"] + now - self.started
        self.totals["timed_images"] = self.base["timed_images"] + self.timed * batch_size
        self.totals["timed_seconds"] = self.base["timed_seconds"] + now - self.clock


def evaluate_state(runner, state, data: Dataset, batch_size: int, workers: int = 0) -> dict:
    """Mean loss and accuracy of ``state`` on ``data``'s held-out split, over every process."""
    sums = evaluation_sums(runner, state, data.eval, data.preprocess, batch_size, workers)
    return {"eval_loss": sums["loss"] / sums["count"], "eval_acc": sums["correct"] / sums["count"]}


def evaluation_sums(runner, state, examples, preprocess, batch_size: int, workers: int = 0) -> dict:
    """Summed loss, correct predictions and ``count``, the number of ``examples`` that counted
    (an unreadable image's stand-in counts for nothing), of ``state`` over every process, each
    example prepared by ``preprocess``."""
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in eval_batches(examples, preprocess, global_batch=batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              workers=workers):
        placed = runner.place_batch(batch["image"], batch["label"], batch["weight"])
        for k, v in runner.fetch(runner.eval(state, *placed)).items():
            sums[k] += v
    return sums


def _progress(enabled: bool, **kwargs):
    from tqdm import tqdm
    return tqdm(disable=not enabled, dynamic_ncols=True, leave=True, **kwargs)

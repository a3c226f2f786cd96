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

from densenet_jax.data import Dataset, load_dataset, train_batches
from densenet_jax.data import transforms as T
from densenet_jax.data.pipeline import steps_per_epoch
from densenet_jax.errors import DiskFullError, DivergedError, Interrupted
from densenet_jax.factory import build_model, create_model, load
from densenet_jax.files import disk_of, is_disk_full
from densenet_jax.model.config import DenseNetConfig
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.registry import get_config
from densenet_jax.train import augment_config, optim, parallel, schedules, workdir
from densenet_jax.train.checkpoint import Checkpoints, has_checkpoints
from densenet_jax.train.config import PRECISIONS, TrainConfig, source_options
from densenet_jax.train.evaluate import evaluate_state
from densenet_jax.train.losses import LossConfig
from densenet_jax.train.checks import (check_accumulation, check_batch_norm_inputs, check_devices, check_image_size,
                                       check_model_matches, check_precision_available, check_steps_per_epoch)
from densenet_jax.train.messages import epoch_line, nothing_to_train, precision_warning, startup_lines, stopped_line
from densenet_jax.train.meter import EMPTY_TOTALS, EpochMeter
from densenet_jax.train.report import (is_best, plot_curves, read_metrics, read_partial_epoch,
                                       remove_partial_epochs, write_metrics, write_partial_epoch)
from densenet_jax.train.signals import StopSignals
from densenet_jax.weights.format import cast, state_arrays, write_safetensors

log = logging.getLogger("densenet_jax")


def starting_model(config: TrainConfig, num_classes: int) -> DenseNet:
    """The model to train: from ``init_from`` or a ``pretrained`` tag (a new head if the class
    count differs, conv0 adapted to ``in_chans``), or fresh."""
    rngs = nnx.Rngs(config.seed)
    options = dict(drop_rate=config.drop_rate, memory_efficient=config.memory_efficient,
                   in_chans=config.in_chans)
    if config.init_from:
        return load(config.init_from, num_classes=num_classes, rngs=rngs, **options)
    if config.pretrained:
        # proj_drop_rate: the per-layer dropout whatever the name (timm's drop_rate is the head's).
        return create_model(config.pretrained, pretrained=True, num_classes=num_classes, rngs=rngs,
                            proj_drop_rate=options.pop("drop_rate"), **options)
    return build_model(get_config(config.model, num_classes=num_classes, **options), rngs=rngs)


def training_model(config: TrainConfig, data: Dataset) -> DenseNet:
    """:func:`starting_model` for ``data``, in the run's precision, once it is known to train on
    ``data``'s images: said before the work directory is touched or anything compiles."""
    model = starting_model(config, data.num_classes)
    check_image_size(model.config, data.image_size, config.dataset)
    if not config.head_only:  # a frozen backbone normalises with its running statistics
        check_batch_norm_inputs(model, config.batch_size, data.image_size)
    if warning := precision_warning(config.precision):
        log.warning(warning)
    check_precision_available(config.precision)
    if config.precision == "fp64":
        cast(model, jnp.float64)
    return model


def step_store(config: TrainConfig, architecture: DenseNetConfig,
               loss: LossConfig = LossConfig()) -> tuple[Path, str] | None:
    """Where the traced train step is kept for reruns (beside XLA's compilation cache, when that
    is on), and everything the step depends on besides its code and argument shapes (the loss
    too: ``--pos-weight auto`` gives other weights on other data)."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache:
        return None
    # The learning rate is an argument of the step, so its schedule shapes nothing in it.
    not_in_program = {"workdir", "max_steps", "checkpoint_every", "keep", "workers", "progress",
                      "strict", "data_dir", "init_from", "lr", "epochs", "schedule", "warmup_epochs", "sched",
                      "decay_epochs", "decay_rate", "decay_milestones", "warmup_lr", "min_lr", "cooldown_epochs",
                      "patience_epochs", "lr_base", "lr_base_size", "lr_base_scale", "best_from", "recipe",
                      "recipe_values", "train_csv", "val_csv"}
    shaping = {k: v for k, v in dataclasses.asdict(config).items() if k not in not_in_program}
    return Path(cache) / "densenet-jax-steps", repr((sorted(shaping.items()), architecture, loss))


class Run:
    """One training run in its work directory.

    Set up when made (data, model, schedule, the steps placed on the devices), refusing what cannot
    train before the folder is touched. :meth:`fit` then restores the latest checkpoint, trains
    epoch by epoch (each ended by an evaluation, a report and a checkpoint) and writes the final
    weights.
    """

    def __init__(self, config: TrainConfig):
        check_model_matches(config)
        check_devices(config.batch_size)
        self.config = config
        self.workdir = Path(config.workdir or workdir.default_workdir(
            config.pretrained or config.model, config.dataset, config.init_from, config.data_dir))
        workdir.check_folder(self.workdir)
        self.is_main = jax.process_index() == 0
        # Read the data first: a bad folder fails in a second, not after compiling.
        self.data: Dataset = augment_config.with_augmentation(
            load_dataset(config.dataset, config.data_dir, config.strict, config.image_size, config.in_chans,
                         **source_options(config)), config)
        self.loss = augment_config.loss_config(config, self.data)
        self.mixer = augment_config.batch_mixer(config, self.data.num_classes)
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), config.batch_size, jax.process_count())
        check_steps_per_epoch(self.steps_per_epoch, config.batch_size, len(self.data.train))
        check_accumulation(self.steps_per_epoch, config.grad_accum_steps)
        self.total_steps = optim.run_epochs(config) * self.steps_per_epoch
        self.model = training_model(config, self.data)
        # plateau: the rate follows the held-out accuracy of the epochs so far (metrics.jsonl's on resume).
        self.schedule = optim.schedule_of(config, self.steps_per_epoch, lambda: [r["eval_acc"] for r in self.rows])
        tx = optim.from_config(config, nnx.as_pure(nnx.state(self.model, nnx.Param)))
        ema = (config.model_ema_decay, config.model_ema_warmup) if config.model_ema else None
        self.runner = parallel.make(config.parallel, self.model, tx, step_store(config, self.model.config, self.loss),
                                    seed=config.seed, compute_dtype=PRECISIONS[config.precision],
                                    freeze_features=config.head_only, accum_steps=config.grad_accum_steps,
                                    ema=ema, loss=self.loss)
        self._warn_about_lr()
        self.record = workdir.describe(config, self.model.config, self.data)  # what run.json holds
        self.first_step_seconds: float | None = None  # this process's first step: compilation
        self.rows: list[dict] = []  # metrics.jsonl's, one per evaluated epoch

    def _warn_about_lr(self) -> None:
        c = self.config
        warning = schedules.far_from_scaled(c.lr, 0.1 if c.lr_base is None else c.lr_base, c.lr_base_size,
                                            c.batch_size * c.grad_accum_steps, c.lr_base_scale, c.opt)
        if warning and self.is_main:
            log.warning(warning)

    def fit(self) -> dict:
        """Train from the latest intact checkpoint to the end (or ``max_steps`` further).

        Raises DiskFullError, in one line naming the disk and the last checkpoint, when the work
        directory's disk fills up (the resume once space is freed goes on from that checkpoint);
        DivergedError on a NaN/Inf loss and Interrupted after SIGINT/SIGTERM; in both cases
        the checkpoints on disk are complete and hold only finite states. Raises WorkdirError, with
        nothing written or compiled, when the work directory belongs to another run (see
        :mod:`densenet_jax.train.workdir`). A run already complete is left as it is.
        """
        # Whose folder this is, checked before anything in it is created or compiled.
        self.changed = workdir.check(self.workdir, self.record, has_checkpoints(self.workdir / "checkpoints"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            return self._fit()
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise DiskFullError(disk_full_line(self.workdir)) from None

    def _fit(self) -> dict:
        checkpoints = Checkpoints(self.workdir / "checkpoints", keep=self.config.keep)
        try:
            with StopSignals() as signals:
                state, start = self._restore(checkpoints)
                self._begin(start)
                self._evaluate_missing_epoch(state, start, signals)
                state, step = self._train(state, start, checkpoints, signals)
        finally:
            checkpoints.close()
        self._finish(state, start, step)
        return {"step": step, "state": state, "metrics": self.rows}

    def _restore(self, checkpoints: Checkpoints):
        """The placed state to start from and its step: the latest intact checkpoint's, or step 0's."""
        initial = self.runner.steps.initial
        # A host template: the checkpoint is read into numpy, then placed as the runner places states.
        restored = checkpoints.restore_latest_good(jax.tree.map(np.asarray, initial))
        # The folder is this run's now (a different one was refused by now), unless it trained
        # past what this command asks for: then nothing trains, and the record stays the run's.
        if self.is_main and (restored is None or restored[1] < self.total_steps):
            workdir.write(self.workdir, self.record)
        if restored is None:
            return self.runner.place_state(initial), 0
        host, step = restored
        if step < self.total_steps:  # else nothing trains, and _begin says why
            if self.is_main and self.changed:
                log.warning("warning: continuing %s with changed settings (%s)", self.workdir, "; ".join(self.changed))
            log.info("resuming from %s at step %d", checkpoints.directory, step)
        return self.runner.place_state(host), step

    def _begin(self, start: int) -> None:
        """Say what trains on what, where and from which step; take up the metrics up to ``start``."""
        if self.is_main:
            for line in startup_lines(self.config, self.data, self.model, self.workdir, start=start,
                                      steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps):
                log.info(line)
        self.rows = [r for r in read_metrics(self.workdir / "metrics.jsonl") if r["step"] <= start]
        if (why := nothing_to_train(self.workdir, start, self.steps_per_epoch, self.total_steps)) is not None:
            log.info(why)

    def _evaluate_missing_epoch(self, state, start: int, signals: StopSignals) -> None:
        """An epoch counts as done only with its evaluation recorded: a resume at the end of an
        epoch whose evaluation a stop or a kill cut short evaluates it now (its row, the curves, the
        choice of best.safetensors), with the epoch's train figures recorded beside its checkpoint."""
        epoch, within = divmod(start, self.steps_per_epoch)
        if not start or within or start > self.total_steps or any(r["step"] == start for r in self.rows):
            return
        if self.is_main:
            log.info("evaluating epoch %d, whose evaluation was not recorded", epoch)
        meter = EpochMeter(self._epoch_totals(start), self.config.batch_size)
        self._end_epoch(state, epoch - 1, meter, False, signals)
        if signals.received:
            raise Interrupted(signals.received, start)

    def _train(self, state, start: int, checkpoints: Checkpoints, signals: StopSignals):
        """Epochs, or their parts, from step ``start`` to the end or ``max_steps`` further, each
        ended by its evaluation and a checkpoint: (state, the step reached)."""
        c = self.config
        stop = min(self.total_steps, start + c.max_steps) if c.max_steps else self.total_steps
        step = start
        while step < stop:
            epoch, first = divmod(step, self.steps_per_epoch)
            last = min(self.steps_per_epoch, first + stop - step)
            state, step, meter = self._train_epoch(state, epoch, first, last, checkpoints, signals)
            if step == (epoch + 1) * self.steps_per_epoch:  # the epoch ended, not a stop within it
                self._end_epoch(state, epoch, meter, epoch == start // self.steps_per_epoch, signals)
            # A stop acknowledged anywhere (data wait, step, device wait, fetch, evaluation, a
            # checkpoint write) ends here, with the last completed step checkpointed.
            if step % self.steps_per_epoch == 0 or step == stop or signals.received:
                self._checkpoint(checkpoints, step, state, meter.totals)
            if signals.received:
                raise Interrupted(signals.received, step)
        if step < self.total_steps and self.is_main:
            log.info(stopped_line(step, self.steps_per_epoch, self.total_steps))
        return state, step

    def _train_epoch(self, state, epoch: int, first: int, last: int, checkpoints: Checkpoints,
                     signals: StopSignals):
        """Steps ``first``..``last`` of ``epoch``: (state, step, the epoch's meter). Returns early,
        every step's metrics checked, when a stop signal came (the caller checkpoints)."""
        c = self.config
        step = epoch * self.steps_per_epoch + first
        meter = EpochMeter(self._epoch_totals(step) if first else dict(EMPTY_TOTALS), c.batch_size)
        batches = train_batches(self.data.train, self.data.augment, seed=c.seed, epoch=epoch,
                                global_batch=c.batch_size, start_step=first,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), workers=c.workers, mix=self.mixer)
        bar = _progress(c.progress and self.is_main, total=self.steps_per_epoch, initial=first,
                        desc=f"epoch {epoch + 1}/{c.epochs}")
        for i in range(first, last):
            batch = _next_batch(batches, signals)
            if batch is None:
                break
            signals.waiting_for = signals.FIRST_STEP if self.first_step_seconds is None else None
            state, step = self._step(state, step, batch, meter)
            signals.waiting_for = None
            save = c.checkpoint_every and step % c.checkpoint_every == 0
            # Reading metrics waits for the device, so only every few steps; always before a
            # checkpoint, so that no checkpoint ever holds a state that a NaN loss has touched.
            if save or len(meter.pending) == 10 or i + 1 == last:
                self._read_metrics(meter, checkpoints)
                bar.set_postfix(**meter.postfix())
            bar.update(1)
            if save:
                self._checkpoint(checkpoints, step, state, meter.totals)
            if signals.received:
                break
        # A stop can leave steps unread (it came after this step's fetch): read them before the
        # caller checkpoints this state.
        self._read_metrics(meter, checkpoints)
        bar.close()
        return state, step, meter

    def _step(self, state, step: int, batch: dict, meter: EpochMeter):
        """Dispatch the train step after ``step`` on ``batch``: (state, step + 1). This process's first
        step is awaited, so that its time (compilation) is told apart from the others'."""
        # Mixed batches carry soft targets beside their labels.
        images, labels = self.runner.place_batch(batch["image"], batch.get("target", batch["label"]))
        dispatched = time.perf_counter()
        state, metrics = self.runner.train(state, images, labels, self.schedule(step))
        first = self.first_step_seconds is None
        if first:
            jax.block_until_ready(metrics)
            self.first_step_seconds = meter.first_step_done(dispatched)
        meter.dispatched(step + 1, metrics, timed=not first)
        return state, step + 1

    def _read_metrics(self, meter: EpochMeter, checkpoints: Checkpoints) -> None:
        """Add the pending steps' metrics to the epoch's totals. DivergedError at the first NaN or
        Inf loss or gradient norm."""
        for at, metrics in meter.pending:
            m = self.runner.fetch(metrics)
            if not np.isfinite([m["loss"], m["grad_norm"]]).all():
                raise DivergedError(at, m["loss"], m["grad_norm"], checkpoints.latest_step())
            meter.add(m)
        meter.pending.clear()
        meter.update_times()

    def _epoch_totals(self, step: int) -> dict:
        """The running sums of the epoch that a mid-epoch checkpoint at ``step`` stopped in."""
        totals = read_partial_epoch(self.workdir, step)
        if totals is None and self.is_main:
            log.warning("warning: no record of the steps before %d in this epoch; its train loss and "
                        "accuracy cover only the steps from %d on", step, step)
        return totals or dict(EMPTY_TOTALS)

    def _end_epoch(self, state, epoch: int, meter: EpochMeter, first_epoch: bool, signals: StopSignals):
        """Evaluate the epoch's state and report its row; nothing when a stop signal ended the
        evaluation. The first epoch of this invocation's row times its first step apart."""
        evaluation = self._evaluate_unless_stopped(state, signals)
        if evaluation is None:
            return
        first_step = self.first_step_seconds if first_epoch else None
        self.rows.append({"epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch, **meter.summary(),
                          **evaluation, "first_step_seconds": first_step})
        if self.is_main:
            self._report(state)

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
        """Loss and accuracy on the held-out split; with --model-ema the average's too (``*_ema``)."""
        c = self.config
        result = evaluate_state(self.runner, state, self.data, c.batch_size, c.workers)
        if c.model_ema:
            averaged = evaluate_state(self.runner, state.averaged(), self.data, c.batch_size, c.workers)
            result.update({f"{k}_ema": v for k, v in averaged.items()})
        return result

    def _report(self, state) -> None:
        """metrics.jsonl, curves.png, best.safetensors when this epoch is the best (by the model's
        or the average's accuracy, --best-from), and its line."""
        write_metrics(self.workdir / "metrics.jsonl", self.rows)
        plot_curves(self.workdir / "curves.png", self.rows)
        ema = self.config.best_from == "ema"
        if is_best(self.rows, ema):
            self._write_weights(state.averaged() if ema else state, self.workdir / "best.safetensors")
        log.info(epoch_line(self.rows[-1], self.config.epochs))

    def _checkpoint(self, checkpoints: Checkpoints, step: int, state, totals: dict) -> None:
        """Save ``state`` at ``step`` unless it is saved already, with its epoch's ``totals``, so
        that a resumed epoch (or a missing evaluation made up) reports what an uninterrupted one would."""
        if step != checkpoints.latest_step():
            if self.is_main:  # at an epoch's end too: its evaluation may yet be cut short
                write_partial_epoch(self.workdir, step, totals, self.config.keep + 1)
            checkpoints.save(step, self.runner.host_state(state))

    def _finish(self, state, start: int, step: int) -> None:
        """The final weights, once the run is complete: written once, or again if a kill came
        between the last checkpoint and them. A complete run's files are left as they are, less the
        record of partial epochs (only a resume within an epoch reads it); a longer run's, wholly."""
        if step != self.total_steps or not self.is_main:
            return
        final = self.workdir / "model.safetensors"
        if step > start or not final.exists():
            if self.config.model_ema:
                self._write_weights(state.averaged(), self.workdir / "model_ema.safetensors")
            self._write_weights(state, final)
            log.info("final weights: %s", final)
        remove_partial_epochs(self.workdir)

    def _write_weights(self, state, path: Path) -> None:
        """``state``'s weights (placed, or on the host) with the class names and preprocessing."""
        model = self.runner.steps.model(self.runner.host_state(state))
        write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()},
                          model.config.replace(memory_efficient=False, drop_rate=0.0, head_drop_rate=0.0), path,
                          class_names=self.data.class_names, pretrained_cfg=T.preprocessing_cfg(self.data),
                          multi_label=self.data.multi_label)


def disk_full_line(workdir: Path) -> str:
    """What a full disk under ``workdir`` kept, and how to go on."""
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    kept = f"the checkpoint of step {max(steps)} and the results up to it" if steps else "no checkpoint yet"
    return (f"{workdir}: the disk holding it is full ({disk_of(workdir)}); kept {kept}; free space "
            "there and run the same command again to resume")


def _next_batch(batches, signals: StopSignals) -> dict | None:
    """The next batch, or None when a stop signal came while it was awaited: no further step then.
    A SIGTERM to the process group ends the data workers too, which fails the pipeline."""
    try:
        batch = next(batches)
    except Exception:
        if signals.received:
            return None
        raise
    return None if signals.received else batch




def _progress(enabled: bool, **kwargs):
    from tqdm import tqdm  # lazy: optional (the train extra), needed only once a run trains
    return tqdm(disable=not enabled, dynamic_ncols=True, leave=True, **kwargs)

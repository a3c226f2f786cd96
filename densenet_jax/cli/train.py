"""``densenet-jax train``: its options, the TrainConfig they describe, and the run's summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import jax

from densenet_jax.cli.augment import add_augment_options
from densenet_jax.cli.optim_options import add_optim_options, config_values, mark_defaults
from densenet_jax.cli.options import dataset_options, figure, source_options
from densenet_jax.model.registry import architecture_name, get_config, list_models
from densenet_jax.train.checks import check_model_matches
from densenet_jax.train.config import PARALLEL, PRECISIONS, SCHEDULES, DistributedConfig, TrainConfig
from densenet_jax.train.loop import Run
from densenet_jax.train.report import best_row, selection_key

log = logging.getLogger("densenet_jax")

HELP = "train or fine-tune a DenseNet; rerun to resume"


def _model_name(name: str) -> str:
    """``--model``: a name get_config knows (argparse says why not, in one line)."""
    try:
        get_config(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def add_options(p: argparse.ArgumentParser) -> None:
    """``densenet-jax train``'s arguments and options, added to ``p``."""
    d = TrainConfig()
    p.add_argument("--model", default=None, type=_model_name, metavar="NAME",
                   help=f"architecture to train from scratch: {', '.join(list_models())}, or any "
                        f"densenet_<L>_k<k> / densenet_bc_<L>_k<k> of the paper's family (default "
                        f"{d.model}; with --init-from, the file's)")
    dataset_options(p)
    source_options(p)
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, over all devices and hosts")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 0.1, or --lr-base scaled to the batch)")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="cifar: lr/10 at 50%% and 75%%; imagenet: lr/10 at 1/3 and 2/3 (30 and 60 of 90 "
                        "epochs); cosine: warm-up then cosine decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up (cosine only)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay, as torch's SGD")
    p.add_argument("--workdir", default=argparse.SUPPRESS,
                   help="checkpoints, metrics.jsonl, curves.png, *.safetensors; one folder per run "
                        "(default: runs/<model>-<dataset>, the model being the --init-from file's name)")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from these weights (.safetensors, e.g. converted torchvision); a new "
                        "head when the class count differs")
    p.add_argument("--head-only", action="store_true", help="train only the classifier (with --init-from)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="bf16: compute in bfloat16, keep fp32 parameters, BN statistics and loss (for "
                        "GPUs and TPUs: on a CPU about 7x slower than fp32); fp64: everything in "
                        "float64, for reference runs")
    p.add_argument("--parallel", default=d.parallel, choices=PARALLEL,
                   help="mesh: jit over all devices, batch sharded (global BN statistics); "
                        "pmap: a replica per device, BN synchronised across devices")
    p.add_argument("--seed", type=int, default=d.seed, help="fixes init, data order, augmentation, dropout")
    p.add_argument("--drop-rate", type=float, default=d.drop_rate, help="dropout after each dense layer")
    p.add_argument("--memory-efficient", action="store_true", help="recompute concat-BN-ReLU-conv1 in backward")
    p.add_argument("--pos-weight", default=None, metavar="auto|W[,W...]",
                   help="multi-label data: weight of each label's positives in the BCE; auto: negatives "
                        "/ positives of the training split (CheXNet)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="also checkpoint every this many steps (always at each epoch's end)")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many steps, checkpointed (0: no limit); rerun to continue")
    _pretrained_options(p, d)
    add_augment_options(p, d)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_optim_options(p, d)
    _distributed_options(p)
    mark_defaults(p, TrainConfig.__dataclass_fields__)


def _pretrained_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--pretrained", default=None, metavar="TAG",
                   help="fine-tune a pretrained tag from the Hugging Face Hub (densenet121.ra_in1k; "
                        "`densenet-jax models --pretrained` lists them) with a new head")
    p.add_argument("--in-chans", type=int, default=d.in_chans,
                   help="input channels: 1 reads folder images as greyscale (conv0 of pretrained "
                        "weights adapted as timm's adapt_input_conv)")


def _distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several hosts: process 0's address, passed to jax.distributed.initialize")
    p.add_argument("--num-processes", type=int, default=None, help="several hosts: how many")
    p.add_argument("--process-id", type=int, default=None, help="several hosts: this one's index")
    p.add_argument("--distributed-timeout", type=int, default=DistributedConfig.timeout, metavar="SECONDS",
                   help="several hosts: how long to wait for every process to join before giving up")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` that parsed ``train`` options describe (each option sets the field of its
    name, unless left at None for the config's default; the distributed ones are not part of it).
    ValueError as TrainConfig raises it."""
    return TrainConfig(**config_values(args, set(TrainConfig.__dataclass_fields__)))


def distributed_config(args: argparse.Namespace) -> DistributedConfig:
    """The ``DistributedConfig`` of the parsed ``--coordinator``, ``--num-processes``,
    ``--process-id`` and ``--distributed-timeout``."""
    return DistributedConfig(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)


def run(args: argparse.Namespace) -> None:
    """Train or resume in ``--workdir``, then print a summary. Every option is checked before any
    process joins or anything compiles."""
    config, distributed = train_config(args), distributed_config(args)
    if distributed.several_hosts:
        check_model_matches(config)  # before this process waits for the others (Run checks it too)
        _join_processes(distributed)
    started = time.perf_counter()
    trainer = Run(config)
    result = trainer.fit()
    rows = result["metrics"]
    if rows and trainer.is_main:
        print(f"{architecture_name(trainer.model.config)} on {config.dataset}: {held_out_summary(rows, config)}, "
              f"step {result['step']}/{trainer.total_steps}, {time.perf_counter() - started:.0f} s")
        print(results_line(trainer.workdir, config))


def held_out_summary(rows: list[dict], config: TrainConfig) -> str:
    """The last epoch's held-out figure and the best epoch's: the one best.safetensors holds
    (the average's with --best-from ema)."""
    ema = config.best_from == "ema"
    key, best = selection_key(rows, ema), best_row(rows, ema)
    what = ("mean AUROC" if key.startswith("eval_auroc") else "accuracy") + (" of the EMA weights" if ema else "")
    return f"held-out {what} {figure(rows[-1][key])} (best {figure(best[key])} at epoch {best['epoch']})"


def results_line(workdir, config: TrainConfig) -> str:
    """The summary's last line: the files the run writes in ``workdir``."""
    final = "model.safetensors, model_ema.safetensors" if config.model_ema else "model.safetensors"
    return (f"results in {workdir}/: run.json, metrics.jsonl, curves.png, best.safetensors, {final} "
            "(at the end), checkpoints/")


def _join_processes(d: DistributedConfig) -> None:
    """jax.distributed.initialize, saying what it waits for; after ``d.timeout`` seconds without
    every process, one line and exit 1 (JAX itself would abort with a C++ stack trace)."""
    log.info("process %d of %d: waiting up to %d s for the others at %s", d.process_id,
             d.num_processes, d.timeout, d.coordinator)

    def give_up():
        print(f"densenet-jax: error: not every one of {d.num_processes} processes joined at "
              f"{d.coordinator} within {d.timeout} s: start the same command on every "
              f"host, each with its --process-id (0 to {d.num_processes - 1})", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(d.timeout, give_up)
    timer.daemon = True
    timer.start()
    # JAX's own deadline later than ours, so that ours speaks first.
    jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id,
                               initialization_timeout=d.timeout + 60)
    timer.cancel()

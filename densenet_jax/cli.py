"""The ``densenet-jax`` command: ``train``, ``evaluate`` and ``predict``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from densenet_jax.errors import CheckpointError, DivergedError, Interrupted

log = logging.getLogger("densenet_jax")
_HANDLER = logging.StreamHandler()
_HANDLER.setFormatter(logging.Formatter("%(message)s"))


def _train_parser(sub) -> None:
    from densenet_jax.configs import list_models
    from densenet_jax.train.loop import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train or fine-tune a DenseNet; rerun to resume",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, choices=list_models(), help="architecture to train from scratch")
    _dataset_options(p)
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, over all devices and hosts")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--schedule", default=d.schedule, choices=["cifar", "imagenet", "cosine", "constant"],
                   help="cifar: lr/10 at 50%% and 75%%; imagenet: lr/10 at 1/3 and 2/3 (30 and 60 of 90 "
                        "epochs); cosine: warm-up then cosine decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up (cosine only)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay, as torch's SGD")
    p.add_argument("--workdir", default=d.workdir, help="checkpoints, metrics.jsonl, curves.png, *.safetensors")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from these weights (.safetensors, e.g. converted torchvision); a new "
                        "head when the class count differs")
    p.add_argument("--head-only", action="store_true", help="train only the classifier (with --init-from)")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp64"],
                   help="bf16: compute in bfloat16, keep fp32 parameters, BN statistics and loss; "
                        "fp64: everything in float64, for reference runs")
    p.add_argument("--parallel", default=d.parallel, choices=["mesh", "pmap"],
                   help="mesh: jit over all devices, batch sharded (global BN statistics); "
                        "pmap: a replica per device, BN synchronised across devices")
    p.add_argument("--seed", type=int, default=d.seed, help="fixes init, data order, augmentation, dropout")
    p.add_argument("--drop-rate", type=float, default=d.drop_rate, help="dropout after each dense layer")
    p.add_argument("--memory-efficient", action="store_true", help="recompute concat-BN-ReLU-conv1 in backward")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="also checkpoint every this many steps (always at each epoch's end)")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many steps, checkpointed (0: no limit); rerun to continue")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _distributed_options(p)


def _dataset_options(p) -> None:
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10", "cifar100", "folder"],
                   help="digits ships with scikit-learn; the others read --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="cifar-10-batches-py / cifar-100-python folder, or a folder with train/ and val/")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (0: threads only)")
    p.add_argument("--strict", action="store_true",
                   help="folder: stop at an unreadable image instead of skipping it with a warning")
    p.add_argument("--image-size", type=int, default=224,
                   help="folder: training crop; eval resizes to 8/7 of it and centre-crops")


def _distributed_options(p) -> None:
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several hosts: process 0's address, passed to jax.distributed.initialize")
    p.add_argument("--num-processes", type=int, default=None, help="several hosts: how many")
    p.add_argument("--process-id", type=int, default=None, help="several hosts: this one's index")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="held-out loss and accuracy of a weights file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", required=True, help="a densenet_jax .safetensors")
    _dataset_options(p)
    p.add_argument("--batch-size", type=int, default=128, help="images per evaluation step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp64"],
                   help="bf16: compute in bfloat16; fp64: in float64")


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="top-5 classes of image files, with torchvision's eval preprocessing",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--weights", required=True, help="a densenet_jax .safetensors (e.g. converted torchvision)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="class names, one per line (default: those the weights were trained with, "
                        "ImageNet's for 1000 classes, else numbers)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    p.add_argument("--crop", type=int, default=224, help="centre crop size")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    """The ``densenet-jax`` argument parser, with its three subcommands."""
    p = argparse.ArgumentParser(prog="densenet-jax", description="DenseNet in JAX: train, evaluate, predict.")
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _evaluate_parser(sub)
    _predict_parser(sub)
    return p


def train_config(args: argparse.Namespace):
    """The ``TrainConfig`` that parsed ``train`` options describe (each option sets the field of its
    name; the distributed ones are not part of it)."""
    from densenet_jax.train.loop import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def train(args) -> None:
    """``densenet-jax train``: train or resume in ``--workdir``, then print a summary."""
    from densenet_jax.train.loop import Run

    config = train_config(args)
    started = time.perf_counter()
    run = Run(config)
    result = run.fit()
    rows = result["metrics"]
    if rows and run.is_main:
        best = max(rows, key=lambda r: r["eval_acc"])
        print(f"{config.model} on {config.dataset}: held-out accuracy {rows[-1]['eval_acc']:.4f} "
              f"(best {best['eval_acc']:.4f} at epoch {best['epoch']}), step {result['step']}/"
              f"{run.total_steps}, {time.perf_counter() - started:.0f} s")
        print(f"results in {run.workdir}/: metrics.jsonl, curves.png, best.safetensors, "
              f"model.safetensors (at the end), checkpoints/")


def evaluate(args) -> None:
    """``densenet-jax evaluate``: held-out loss and accuracy of a weights file."""
    import optax

    from densenet_jax.data import load_dataset
    from densenet_jax.train import parallel
    from densenet_jax.train.loop import PRECISIONS, evaluate_state
    from densenet_jax.weights import load

    data = load_dataset(args.dataset, args.data_dir, args.strict, args.image_size)
    model = load(args.weights)
    if model.config.num_classes != data.num_classes:
        raise ValueError(f"{args.weights}: has {model.config.num_classes} classes, "
                         f"{args.dataset} has {data.num_classes}")
    runner = parallel.make("mesh", model, optax.identity(), compute_dtype=PRECISIONS[args.precision])
    state = runner.place_state(runner.steps.initial)
    result = evaluate_state(runner, state, data, args.batch_size, args.workers)
    print(f"{args.weights} on {args.dataset} (held-out, {len(data.eval)} images): "
          f"loss {result['eval_loss']:.4f}, accuracy {result['eval_acc']:.4f}")


def predict(args) -> None:
    """``densenet-jax predict``: top-k classes of image files, as text or JSON."""
    import json

    from densenet_jax.predict import predict as classify
    from densenet_jax.weights import load, stored_class_names

    model = load(args.weights)
    labels = args.labels or stored_class_names(args.weights)
    results = classify(model, args.images, top_k=args.top, batch_size=args.batch_size,
                       labels=labels, resize=args.resize, crop=args.crop, strict=args.strict,
                       progress=args.progress and not args.json)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for result in results:
        print(result["file"])
        for entry in result["top"]:
            print(f"  {entry['probability']:7.2%}  {entry['name']} ({entry['class']})")


COMMANDS = {"train": train, "evaluate": evaluate, "predict": predict}


def _enable_compilation_cache() -> None:
    """Keep compiled programs on disk so that a second run, or a resumed one, skips compilation.
    DENSENET_JAX_CACHE sets the folder; an empty value turns the cache off."""
    import os

    import jax
    folder = os.environ.get("DENSENET_JAX_CACHE", os.path.expanduser("~/.cache/densenet-jax/xla"))
    if folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str] | None = None) -> None:
    """Entry point; user errors end in one line on stderr and a non-zero exit status."""
    args = parser().parse_args(argv)
    _enable_compilation_cache()
    # main() may run more than once in a process (tests, notebooks): one handler, on today's stderr.
    _HANDLER.stream = sys.stderr
    if _HANDLER not in log.handlers:
        log.addHandler(_HANDLER)
    log.setLevel(logging.INFO)
    log.propagate = False
    import jax
    if getattr(args, "precision", None) == "fp64":
        jax.config.update("jax_enable_x64", True)
    if getattr(args, "coordinator", None):
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        COMMANDS[args.command](args)
    except Interrupted as e:
        print(f"densenet-jax: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)  # what a shell reports for a command a signal stopped
    except KeyboardInterrupt:
        print("densenet-jax: interrupted", file=sys.stderr)
        sys.exit(130)
    except (CheckpointError, DivergedError, ValueError, FileNotFoundError) as e:
        print(f"densenet-jax: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

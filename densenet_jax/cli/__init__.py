"""The ``densenet-jax`` command: ``train``, ``evaluate``, ``predict``, ``models``, ``convert`` and
``export``."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time

from densenet_jax.errors import CheckpointError, DataError, DivergedError, Interrupted

log = logging.getLogger("densenet_jax")
_HANDLER = logging.StreamHandler()
_HANDLER.setFormatter(logging.Formatter("%(message)s"))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for options that take a value; not for flags, where ``--no-progress``
    would read "(default: True)", nor for None, which the help words."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:  # a flag, or a default the help describes
            return action.help
        return super()._get_help_string(action)


def _model_name(name: str) -> str:
    """``--model``: a name get_config knows (argparse says why not, in one line)."""
    from densenet_jax.model.registry import get_config

    try:
        get_config(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def _train_parser(sub) -> None:
    from densenet_jax.model.registry import list_models
    from densenet_jax.train.loop import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train or fine-tune a DenseNet; rerun to resume",
                       formatter_class=_HelpFormatter)
    p.add_argument("--model", default=None, type=_model_name, metavar="NAME",
                   help=f"architecture to train from scratch: {', '.join(list_models())}, or any "
                        f"densenet_<L>_k<k> / densenet_bc_<L>_k<k> of the paper's family (default "
                        f"{d.model}; with --init-from, the file's)")
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
    p.add_argument("--workdir", default=argparse.SUPPRESS,
                   help="checkpoints, metrics.jsonl, curves.png, *.safetensors; one folder per run "
                        "(default: runs/<model>-<dataset>, the model being the --init-from file's name)")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from these weights (.safetensors, e.g. converted torchvision); a new "
                        "head when the class count differs")
    p.add_argument("--head-only", action="store_true", help="train only the classifier (with --init-from)")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp64"],
                   help="bf16: compute in bfloat16, keep fp32 parameters, BN statistics and loss (for "
                        "GPUs and TPUs: on a CPU about 7x slower than fp32); fp64: everything in "
                        "float64, for reference runs")
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
    _pretrained_train_options(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _distributed_options(p)


def _pretrained_train_options(p) -> None:
    p.add_argument("--pretrained", default=None, metavar="TAG",
                   help="fine-tune a pretrained tag from the Hugging Face Hub (densenet121.ra_in1k; "
                        "`densenet-jax models --pretrained` lists them) with a new head")
    p.add_argument("--in-chans", type=int, default=3,
                   help="input channels: 1 reads folder images as greyscale (conv0 of pretrained "
                        "weights adapted as timm's adapt_input_conv)")


_FOLDER_SPLITS = "a folder with train/ and val/"
_IMAGE_SIZE_HELP = "folder: training crop (default 224); eval resizes to 8/7 of it and centre-crops"


def _dataset_options(p, folder: str = _FOLDER_SPLITS, image_size_help: str = _IMAGE_SIZE_HELP) -> None:
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10", "cifar100", "folder"],
                   help="digits ships with scikit-learn; the others read --data-dir")
    p.add_argument("--data-dir", default=None, help=f"cifar-10-batches-py / cifar-100-python folder, or {folder}")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (0: threads only)")
    p.add_argument("--strict", action="store_true",
                   help="folder: stop at an unreadable image instead of skipping it with a warning")
    p.add_argument("--image-size", type=int, default=None, help=image_size_help)


def _distributed_options(p) -> None:
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several hosts: process 0's address, passed to jax.distributed.initialize")
    p.add_argument("--num-processes", type=int, default=None, help="several hosts: how many")
    p.add_argument("--process-id", type=int, default=None, help="several hosts: this one's index")
    p.add_argument("--distributed-timeout", type=int, default=300, metavar="SECONDS",
                   help="several hosts: how long to wait for every process to join before giving up")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="held-out loss and accuracy of a weights file",
                       formatter_class=_HelpFormatter)
    p.add_argument("--weights", required=True, help="a densenet_jax .safetensors")
    _dataset_options(p, folder="a folder with val/ (train/ is not read)",
                     image_size_help="folder: the centre crop instead of the one the weights record "
                                     "(their resize ratio, interpolation and mean/std kept; without a "
                                     "record, torchvision's: resize to 8/7 of it, bilinear; default 224)")
    p.add_argument("--batch-size", type=int, default=128, help="images per evaluation step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp64"],
                   help="bf16: compute in bfloat16; fp64: in float64")


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="top-5 classes of image files, prepared as the weights want",
                       formatter_class=_HelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--weights", default=None,
                   help="a densenet_jax .safetensors (e.g. converted torchvision); with --model, a "
                        "local copy of that tag's weights (timm's model.safetensors)")
    _pretrained_predict_options(p)
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="class names, one per line (default: those the weights were trained with, "
                        "ImageNet's for 1000 classes, else numbers)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--resize", type=int, default=256,
                   help="torchvision preprocessing (or weights that carry none): shorter side before the crop")
    p.add_argument("--crop", type=int, default=224, help="torchvision preprocessing: centre crop size")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _pretrained_predict_options(p) -> None:
    p.add_argument("--model", default=None, metavar="TAG",
                   help="a pretrained tag (densenet121.tv_in1k), downloaded from the Hugging Face Hub "
                        "on first use, or hf-hub:<repo>")
    p.add_argument("--preprocess", default="weights", choices=["weights", "torchvision"],
                   help="weights: the preprocessing stored with the weights (timm's for the tags); "
                        "torchvision: resize --resize bilinear, centre crop --crop")
    p.add_argument("--test-size", action="store_true",
                   help="the weights' larger test size where they have one (288/0.95 for ra tags)")
    p.add_argument("--in-chans", type=int, default=None,
                   help="input channels (1: greyscale); adapts conv0 of 3-channel weights")


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="the model names, their parameters and pretrained tags")
    p.add_argument("--pretrained", action="store_true",
                   help="the pretrained tags: source, preprocessing, published top-1")


_CONVERT_HELP = "a torchvision or timm checkpoint (.pth, .pt, .safetensors) to densenet_jax weights, or back"


def _convert_parser(sub) -> None:
    _convert_options(sub.add_parser("convert", help=_CONVERT_HELP,
                                    formatter_class=_HelpFormatter))


def _convert_options(p) -> None:
    p.add_argument("input", help="a torch state dict or training checkpoint, or a safetensors file "
                   "(with --to torch: densenet_jax weights)")
    p.add_argument("output", help="the file to write")
    p.add_argument("--to", default="densenet_jax", choices=["densenet_jax", "torch"],
                   help="densenet_jax: .safetensors for densenet_jax.load; torch: a torchvision .pth "
                        "(needs torch)")
    p.add_argument("--prefix", default=None,
                   help="the DenseNet to take from a file that holds several, by the key prefix "
                        "named in the message (e.g. model_ema.module.)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="a weights file as ONNX, a StableHLO artifact or timm's Hub folder",
                       formatter_class=_HelpFormatter)
    p.add_argument("output", metavar="OUT", help="the file (onnx, stablehlo) or folder (timm) to write")
    p.add_argument("--weights", required=True, help="a densenet_jax .safetensors")
    p.add_argument("--format", required=True, metavar="{onnx,stablehlo,timm}",
                   help="onnx: for onnxruntime; stablehlo: jax.export, for any JAX process; timm: "
                        "config.json and model.safetensors that timm loads as pretrained weights")
    p.add_argument("--image-size", type=int, default=224,
                   help="input height and width (onnx, stablehlo), timm's input_size (timm)")
    p.add_argument("--layout", default="nhwc", metavar="{nhwc,nchw}", help="onnx: the input's layout")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")


def parser() -> argparse.ArgumentParser:
    """The ``densenet-jax`` argument parser, with its subcommands."""
    p = argparse.ArgumentParser(prog="densenet-jax",
                                description="DenseNet in JAX: train, evaluate, predict, models, convert, export.")
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _evaluate_parser(sub)
    _predict_parser(sub)
    _models_parser(sub)
    _convert_parser(sub)
    _export_parser(sub)
    return p


def train_config(args: argparse.Namespace):
    """The ``TrainConfig`` that parsed ``train`` options describe (each option sets the field of its
    name, unless left at None for the config's default; the distributed ones are not part of it)."""
    from densenet_jax.train.loop import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def train(args) -> None:
    """``densenet-jax train``: train or resume in ``--workdir``, then print a summary."""
    from densenet_jax.train.loop import Run
    from densenet_jax.model.registry import architecture_name

    _check_devices(args)
    config = train_config(args)
    started = time.perf_counter()
    run = Run(config)
    result = run.fit()
    rows = result["metrics"]
    if rows and run.is_main:
        best = max(rows, key=lambda r: r["eval_acc"])
        print(f"{architecture_name(run.model.config)} on {config.dataset}: "
              f"held-out accuracy {rows[-1]['eval_acc']:.4f} "
              f"(best {best['eval_acc']:.4f} at epoch {best['epoch']}), step {result['step']}/"
              f"{run.total_steps}, {time.perf_counter() - started:.0f} s")
        print(f"results in {run.workdir}/: metrics.jsonl, curves.png, best.safetensors, "
              f"model.safetensors (at the end), checkpoints/")


def _check_train_options(args) -> None:
    """Refuse, before any process joins or anything compiles, train options that are out of range
    or contradict each other (one ValueError naming the options)."""
    for option, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                                 ("--max-steps", args.max_steps, 0), ("--keep", args.keep, 1),
                                 ("--checkpoint-every", args.checkpoint_every, 0),
                                 ("--distributed-timeout", args.distributed_timeout, 1),
                                 ("--in-chans", args.in_chans, 1), ("--weight-decay", args.weight_decay, 0)):
        if value < least:
            raise ValueError(f"{option} {value}: must be at least {least}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr}: must be positive")
    if not math.isfinite(args.weight_decay):
        raise ValueError(f"--weight-decay {args.weight_decay}: must be a number, at least 0")
    if not 0 <= args.seed < 2**32:  # what numpy's and JAX's seeds take
        raise ValueError(f"--seed {args.seed}: must be 0 to {2**32 - 1}")
    for option, value in (("--momentum", args.momentum), ("--drop-rate", args.drop_rate)):
        if not 0 <= value < 1:
            raise ValueError(f"{option} {value}: must be at least 0 and less than 1")
    _check_dataset_options(args)
    if args.head_only and not (args.init_from or args.pretrained):
        raise ValueError("--head-only trains only the classifier of loaded weights: add --init-from FILE")
    from densenet_jax.train.optim import WARMUP_SCHEDULES
    if args.warmup_epochs and args.schedule not in WARMUP_SCHEDULES:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} has no effect with --schedule {args.schedule}: "
                         f"only {', '.join(WARMUP_SCHEDULES)} warms up")
    if not 0 <= args.warmup_epochs < args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs}: must be at least 0 and less than "
                         f"--epochs {args.epochs}")
    if args.init_from and args.model:
        _check_model_matches(args.model, args.init_from)
    if args.pretrained and (args.model or args.init_from):
        raise ValueError(f"--pretrained {args.pretrained} names the architecture and its weights: "
                         "leave --model and --init-from out")
    _check_distributed_options(args)


def _check_dataset_options(args) -> None:
    """The options train and evaluate share, in range; a --data-dir beside the bundled digits would
    be ignored, so it is refused."""
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must be at least 0")
    if args.image_size is not None and args.dataset != "folder":
        raise ValueError(f"--image-size {args.image_size} sets a folder's crop; --dataset {args.dataset} "
                         "has images of its own size")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size {args.image_size}: must be at least 1")
    if args.dataset == "digits" and args.data_dir is not None:
        raise ValueError(f"--data-dir {args.data_dir} is read by --dataset cifar10, cifar100 or folder; "
                         "digits ships with scikit-learn")


def _check_model_matches(model: str, weights: str) -> None:
    """``--model`` names the architecture of the ``--init-from`` file (heads aside), or is refused."""
    from densenet_jax.model.registry import architecture_name
    from densenet_jax.weights.format import read_safetensors

    stored = read_safetensors(weights)[1]
    if architecture_name(stored) != model:
        raise ValueError(f"--model {model} contradicts --init-from {weights}, which holds "
                         f"{architecture_name(stored)}: leave --model out to train the file's architecture")


def _check_distributed_options(args) -> None:
    """Several hosts need all three of --coordinator, --num-processes and --process-id."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == 3:
        return
    if missing:
        raise ValueError(f"several hosts need --coordinator HOST:PORT (process 0's address), --num-processes "
                         f"and --process-id: {' and '.join(missing)} missing")
    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id}: must be 0 to {args.num_processes - 1} "
                         f"for --num-processes {args.num_processes}")


def _check_devices(args) -> None:
    """The global batch must split evenly over processes and devices (else a raw sharding error)."""
    import jax

    processes, devices = jax.process_count(), jax.device_count()
    if args.batch_size % devices:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {devices} devices "
                         f"({processes} process{'es' * (processes > 1)}): use a multiple of {devices}")


def _join_processes(args) -> None:
    """jax.distributed.initialize, saying what it waits for; after ``--distributed-timeout`` seconds
    without every process, one line and exit 1 (JAX itself would abort with a C++ stack trace)."""
    import os
    import threading

    import jax

    log.info("process %d of %d: waiting up to %d s for the others at %s", args.process_id,
             args.num_processes, args.distributed_timeout, args.coordinator)

    def give_up():
        print(f"densenet-jax: error: not every one of {args.num_processes} processes joined at "
              f"{args.coordinator} within {args.distributed_timeout} s: start the same command on every "
              f"host, each with its --process-id (0 to {args.num_processes - 1})", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(args.distributed_timeout, give_up)
    timer.daemon = True
    timer.start()
    # JAX's own deadline later than ours, so that ours speaks first.
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=args.distributed_timeout + 60)
    timer.cancel()


def _check_at_least_one(args, *options: str) -> None:
    """ValueError naming the first of ``options`` (``--batch-size`` ...) whose value is below 1."""
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value < 1:
            raise ValueError(f"{option} {value}: must be at least 1")


def evaluate(args) -> None:
    """``densenet-jax evaluate``: held-out loss and accuracy of a weights file (see
    :func:`densenet_jax.train.evaluate.evaluate_weights`)."""
    from densenet_jax.train.evaluate import evaluate_weights

    result = evaluate_weights(args.weights, args.dataset, args.data_dir, batch_size=args.batch_size,
                              precision=args.precision, workers=args.workers, strict=args.strict,
                              image_size=args.image_size)
    skipped = result.examples - result.count
    unreadable = f", {skipped} unreadable skipped" if skipped > 0 else ""
    print(f"{args.weights} on {args.dataset} (held-out, {result.count} images{unreadable}"
          f"{result.preprocessing}): loss {result.loss:.4f}, accuracy {result.accuracy:.4f}")


def predict(args) -> None:
    """``densenet-jax predict``: top-k classes of image files, as text or JSON."""
    import json

    from densenet_jax.predict import model_transform, predict as classify
    from densenet_jax.weights.format import stored_class_names

    _check_at_least_one(args, "--top", "--batch-size", "--resize", "--crop")

    if args.crop > args.resize:
        raise ValueError(f"--crop {args.crop} is larger than --resize {args.resize}: the centre crop "
                         "is taken from the resized image")
    model = _predict_model(args)
    _check_test_size(args, model)
    labels = args.labels or (stored_class_names(args.weights) if args.weights else None)
    transform = model_transform(model, args.preprocess, args.test_size, args.resize, args.crop)
    if not model.config.num_classes:
        raise CheckpointError(f"{args.weights or args.model}: no classifier (a backbone, num_classes 0): "
                              "nothing to predict until a head is trained (densenet-jax train --init-from)")
    results = classify(model, args.images, top_k=args.top, batch_size=args.batch_size,
                       labels=labels, strict=args.strict, transform=transform,
                       progress=args.progress and not args.json)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for result in filter(lambda r: "top" in r, results):  # skipped ones were named on stderr
            print(result["file"])
            for entry in result["top"]:
                print(f"  {entry['probability']:7.2%}  {entry['name']} ({entry['class']})")
    if not any("top" in r for r in results):
        raise DataError(f"none of the {len(results)} image(s) could be classified (all unreadable)")


def _check_test_size(args, model) -> None:
    """``--test-size`` only where the preprocessing comes from weights that have a test size."""
    cfg = model.pretrained_cfg
    if args.test_size and (args.preprocess != "weights" or cfg is None or cfg.test_input_size is None):
        source = "--preprocess torchvision" if args.preprocess != "weights" else (args.model or args.weights)
        raise ValueError(f"--test-size: {source} has no larger test size (the ra tags have one)")


def _predict_model(args):
    """The model predict runs: ``--weights FILE``, ``--model TAG`` (or ``hf-hub:<repo>``), or a tag
    with a local copy of its weights (both)."""
    from densenet_jax.factory import create_model, load
    from densenet_jax.model.registry import HF_HUB_PREFIX

    overrides = {} if args.in_chans is None else {"in_chans": args.in_chans}
    if args.model is None and args.weights is None:
        raise ValueError("give --model TAG (a pretrained tag) or --weights FILE")
    if args.model is None:
        return load(args.weights, **overrides)
    if args.model.startswith(HF_HUB_PREFIX) and args.weights:
        raise ValueError("--weights goes with a pretrained tag, not with hf-hub:<repo>")
    overlay = {"file": args.weights} if args.weights else None
    return create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **overrides)


def models(args) -> None:
    """``densenet-jax models``: every architecture with its parameters and pretrained tags; with
    ``--pretrained`` every tag with its source, preprocessing and published top-1."""
    from densenet_jax.model.config import count_params
    from densenet_jax.model.registry import get_config, list_models
    from densenet_jax.model.registry import TAGS, split_name

    if not args.pretrained:
        for name in list_models():
            tags = [split_name(t)[1] for t in TAGS if split_name(t)[0] == name]
            print(f"{name:22s} {count_params(get_config(name)):>12,d}  {', '.join(tags)}")
        print("and any densenet_<L>_k<k> or densenet_bc_<L>_k<k>: the paper's CIFAR family at depth L, "
              "growth rate k")
        return
    for tag, cfg in TAGS.items():
        size = f"{cfg.input_size[1]}/{cfg.crop_pct}" + (
            f" (test {cfg.test_input_size[1]}/{cfg.test_crop_pct})" if cfg.test_input_size else "")
        top1 = "; ".join(f"{t.value:.3f} ({t.protocol})" for t in cfg.top1)
        print(f"{tag:26s} hf-hub:{cfg.hf_hub_id}  {cfg.interpolation} {size}  top-1 {top1}")


def convert(args) -> None:
    """``densenet-jax convert``: torch checkpoint -> densenet_jax weights, or back (``--to torch``)."""
    from densenet_jax.weights import torch_files

    if args.to == "torch":
        if args.prefix is not None:
            raise ValueError("--prefix picks a DenseNet in a torch checkpoint; densenet_jax weights hold one")
        print(torch_files.to_torch(args.input, args.output, force=args.force))
    else:
        print(torch_files.to_densenet_jax(args.input, args.output, prefix=args.prefix, force=args.force))


def export(args) -> None:
    """``densenet-jax export``: a weights file as ONNX, StableHLO or timm's Hub folder (with the
    class names the weights were trained with)."""
    from densenet_jax.export import export as write
    from densenet_jax.factory import load
    from densenet_jax.weights.format import stored_class_names

    model = load(args.weights)
    path = write(model, args.format, args.output, image_size=args.image_size, layout=args.layout,
                 class_names=stored_class_names(args.weights), force=args.force)
    print(f"{args.weights} -> {path} ({args.format})")


COMMANDS = {"train": train, "evaluate": evaluate, "predict": predict, "models": models, "convert": convert,
            "export": export}


def _enable_compilation_cache() -> None:
    """Keep compiled programs on disk so that a second run, or a resumed one, skips compilation.
    DENSENET_JAX_CACHE sets the folder; an empty value turns the cache off."""
    import os

    import jax
    folder = os.environ.get("DENSENET_JAX_CACHE", os.path.expanduser("~/.cache/densenet-jax/xla"))
    if folder:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, parsed. ``convert`` is parsed on its own: building train's options imports
    the training stack (grain, Pillow: the train extra), which a pip user who only converts lacks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        p = argparse.ArgumentParser(prog="densenet-jax convert", description=_CONVERT_HELP,
                                    formatter_class=_HelpFormatter)
        _convert_options(p)
        return argparse.Namespace(command="convert", **vars(p.parse_args(argv[1:])))
    return parser().parse_args(argv)


_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


def _quiet_resource_tracker() -> None:
    """Grain's data workers, when stopped, leave the batches they had made to Python's resource
    tracker, which removes them at exit and warns of "leaked shared_memory objects": nothing is
    lost, yet the warning came after a run's last line. The tracker is a process of its own that
    takes this process's -W options (``sys.warnoptions``) when it starts."""
    if _TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_WARNING)


def main(argv: list[str] | None = None) -> None:
    """Entry point; user errors end in one line on stderr and a non-zero exit status."""
    args = _parse(argv)
    _enable_compilation_cache()
    # main() may run more than once in a process (tests, notebooks): one handler, on today's stderr.
    _HANDLER.stream = sys.stderr
    if _HANDLER not in log.handlers:
        log.addHandler(_HANDLER)
    log.setLevel(logging.INFO)
    log.propagate = False
    _quiet_resource_tracker()
    import jax
    if getattr(args, "precision", None) == "fp64":
        jax.config.update("jax_enable_x64", True)
    try:
        if args.command == "train":
            _check_train_options(args)
        if getattr(args, "coordinator", None):
            _join_processes(args)
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

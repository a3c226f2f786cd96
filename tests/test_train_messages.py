"""What ``densenet-jax train`` tells its user, and what it refuses before compiling anything."""

import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

import densenet_jax as dj
import train_cli
from densenet_jax import cli
from densenet_jax.model.layers import SingleValueStatistics
from densenet_jax.train import TrainConfig
from densenet_jax.train.config import DistributedConfig
from densenet_jax.train.loop import Run


def tiny_weights(path, block_config=(2, 2, 2)):
    dj.save(dj.create_model("densenet_bc_100_k12", block_config=block_config, growth_rate=6, num_classes=10),
            path)
    return str(path)


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--no-progress", *argv])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--max-steps", "-1"], "--max-steps -1: must be at least 0"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--momentum", "5"], "--momentum 5.0: must be at least 0 and less than 1"),
    (["--drop-rate", "-0.1"], "--drop-rate -0.1: must be at least 0 and less than 1"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be at least 0"),
    (["--workers", "-2"], "--workers -2: must be at least 0"),
    (["--dataset", "folder", "--data-dir", "nowhere", "--image-size", "0"], "--image-size 0: must be at least 1"),
    (["--image-size", "16"], "--image-size 16 sets a folder's crop; --dataset digits has images of its own size"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--weight-decay", "inf"], "--weight-decay inf: must be a number, at least 0"),
    (["--seed", "-1"], "--seed -1: must be 0 to 4294967295"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be 0 to 4294967295"),
    (["--in-chans", "0"], "--in-chans 0: must be at least 1"),
    (["--data-dir", "some/folder"], "--data-dir 'some/folder' is read by --dataset cifar10, cifar100, folder, "
                                    "csv or wds/...; digits ships with scikit-learn"),
    (["--head-only"], "--head-only trains only the classifier of loaded weights: add --init-from FILE"),
    (["--warmup-epochs", "2"], "--warmup-epochs 2.0 has no effect with --schedule cifar: only cosine warms up"),
    (["--schedule", "cosine", "--epochs", "3", "--warmup-epochs", "3"], "--warmup-epochs 3.0: must be at least 0 and less than --epochs 3"),
    (["--num-processes", "2", "--process-id", "1"], "--coordinator missing"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "--process-id missing"),
    (["--coordinator", "127.0.0.1:1234", "--process-id", "0"], "--num-processes missing"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2: must be 0 to 1 for --num-processes 2"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0",
      "--distributed-timeout", "0"], "--distributed-timeout 0: must be at least 1"),
    (["--sched", "cosine", "--lr", "0.01", "--min-lr", "0.05"], "--min-lr 0.05: must be at most --lr 0.01"),
    (["--sched", "multistep", "--decay-milestones", "60", "30"], "--decay-milestones 60 30: must be strictly increasing"),
    (["--sched", "step", "--decay-rate", "0"], "--decay-rate 0.0: must be more than 0"),
])
def test_contradictory_or_out_of_range_options_are_one_line(argv, expected, tmp_path, capsys):
    line = refused([*argv, "--workdir", str(tmp_path / "run")], capsys)
    assert expected in line
    assert not (tmp_path / "run").exists()  # refused before anything started


@pytest.mark.parametrize("options, expected", [
    (dict(lr=float("nan")), "--lr nan: must be a positive number"),
    (dict(lr=float("inf")), "--lr inf: must be a positive number"),
    (dict(weight_decay=float("nan")), "--weight-decay nan: must be a number, at least 0"),
    (dict(epochs=0), "--epochs 0: must be at least 1"),
    (dict(workdir=""), "--workdir '': name a folder"),
    (dict(seed=2**32), "--seed 4294967296: must be 0 to 4294967295"),
    (dict(momentum=1.0), "--momentum 1.0: must be at least 0 and less than 1"),
    (dict(head_only=True), "--head-only trains only the classifier of loaded weights: add --init-from FILE"),
    (dict(warmup_epochs=1), "--warmup-epochs 1 has no effect with --schedule cifar: only cosine warms up"),
    (dict(data_dir="some/folder"), "--data-dir 'some/folder' is read by --dataset cifar10, cifar100, folder, "
                                   "csv or wds/...; digits ships with scikit-learn"),
    (dict(dataset="cifar10"), "--data-dir is needed for dataset cifar10"),
    (dict(dataset="imagenet", data_dir="x"),
     "--dataset 'imagenet': must be one of digits, cifar10, cifar100, folder"),
    (dict(image_size=32), "--image-size 32 sets a folder's crop; --dataset digits has images of its own size"),
    (dict(schedule="step"), "--schedule 'step': must be one of cifar, imagenet, cosine, constant"),
    (dict(precision="fp16"), "--precision 'fp16': must be one of fp32, bf16, fp64"),
    (dict(parallel="ddp"), "--parallel 'ddp': must be one of mesh, pmap"),
    (dict(model="densenet_7"), "unknown model 'densenet_7'; known: densenet121, "),
    (dict(pretrained="densenet121.ra_in1k", init_from="w.safetensors"),
     "--pretrained densenet121.ra_in1k names the architecture and its weights: leave --model and --init-from out"),
    (dict(sched="cosine", min_lr=0.2), "--min-lr 0.2: must be at most --lr 0.1"),
    (dict(sched="multistep", decay_milestones=(30, 30, 60)), "--decay-milestones 30 30 60: must be strictly increasing"),
    (dict(sched="plateau", decay_rate=-0.5), "--decay-rate -0.5: must be more than 0"),
])
def test_the_config_refuses_at_construction_as_the_command_does(options, expected):
    """A script that builds a TrainConfig is stopped where the command is, in the same words."""
    with pytest.raises(ValueError) as error:
        TrainConfig(**options)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


@pytest.mark.parametrize("options, expected", [
    (dict(epochs=1.5), "--epochs 1.5: must be an integer"),
    (dict(epochs="3"), "--epochs '3': must be an integer"),
    (dict(batch_size=True), "--batch-size True: must be an integer"),
    (dict(seed=1.5), "--seed 1.5: must be an integer"),
    (dict(lr="0.1"), "--lr '0.1': must be a number"),
    (dict(head_only=1), "--head-only 1: must be True or False"),
    (dict(model=121), "--model 121: must be a string"),
])
def test_the_config_refuses_values_of_another_type(options, expected):
    """A wrong type is named at construction, not found by a crash after an epoch of training."""
    with pytest.raises(TypeError, match=f"^{re.escape(expected)}$"):
        TrainConfig(**options)
    TrainConfig(epochs=np.int64(2), lr=np.float32(0.1))  # numpy's numbers are numbers


def test_the_config_fills_in_defaults_that_depend_on_other_options():
    """Left out, the model is densenet_40_k12 unless weights name it, and a folder's crop 224."""
    assert TrainConfig().model == "densenet_40_k12" and TrainConfig().image_size is None
    assert TrainConfig(init_from="w.safetensors").model is None
    assert TrainConfig(pretrained="densenet121.ra_in1k").model is None
    assert TrainConfig(dataset="folder", data_dir="images").image_size == 224


def test_the_distributed_options_refuse_a_partial_set_at_construction():
    assert not DistributedConfig().several_hosts
    with pytest.raises(ValueError, match="^several hosts need .*: --process-id missing$"):
        DistributedConfig("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="^--process-id 2: must be 0 to 1 for --num-processes 2$"):
        DistributedConfig("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="^--distributed-timeout 0: must be at least 1$"):
        DistributedConfig(timeout=0)


def test_model_that_contradicts_the_init_from_file_is_refused(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    line = refused(["--model", "densenet121", "--init-from", weights, "--workdir", str(tmp_path / "run")], capsys)
    assert line == (f"densenet-jax: error: --model densenet121 contradicts --init-from {weights}, which holds "
                    "DenseNet(k=6, blocks (2, 2, 2), cifar stem): leave --model out to train the file's "
                    "architecture")


def test_batch_norm_over_one_value_per_channel_is_refused_naming_the_layer():
    """densenet121 on 32x32 reaches a 1x1 map: with batch 1 its last BatchNorms would normalise
    every value to 0. torch refuses that input; so does the model, while tracing (shown on
    densenet121's stem and strides with one layer per block, which reaches 1x1 alike)."""
    reference = torchvision.models.densenet121(weights=None).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        reference(torch.zeros(1, 3, 32, 32))

    def trace(model, batch):
        graphdef, state = nnx.split(model)
        spec = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
        return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, spec)

    for memory_efficient in (False, True):
        model = dj.create_model("densenet121", block_config=(1, 1, 1, 1), memory_efficient=memory_efficient)
        with pytest.raises(SingleValueStatistics) as error:
            trace(model, 1)
        assert str(error.value) == (
            "features.denseblock4.denselayer1.norm1 in train mode gets input of shape (1, 1, 1, 36): one value "
            "per channel, which its batch statistics would normalise to 0; train with a larger batch or "
            "larger images (or in eval mode)")
    assert trace(model, 2).shape == (2, 1000)
    model.eval()  # running statistics: one image is fine
    assert trace(model, 1).shape == (1, 1000)


def test_the_cli_refuses_one_value_per_channel_before_compiling(tmp_path, capsys):
    # Four blocks with the CIFAR stem take digits' 8x8 to 1x1 in the last block.
    weights = tiny_weights(tmp_path / "four.safetensors", block_config=(2, 2, 2, 2))
    line = refused(["--init-from", weights, "--batch-size", "1", "--workdir", str(tmp_path / "run")], capsys)
    assert line.startswith("densenet-jax: error: features.denseblock4.denselayer1.norm1 in train mode gets "
                           "input of shape (1, 1, 1, ")


def test_batch_not_divisible_by_the_devices_and_a_process_left_alone(tmp_path):
    """Both need a fresh process: eight CPU devices, and a wait that ends the process."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "DENSENET_JAX_CACHE": ""}
    base = [sys.executable, "-m", "densenet_jax", "train", "--no-progress", "--workdir", str(tmp_path / "run")]
    uneven = subprocess.run([*base, "--batch-size", "100"], env=env, capture_output=True, text=True, timeout=300)
    assert uneven.returncode == 1
    assert uneven.stderr.strip().splitlines()[-1] == (
        "densenet-jax: error: --batch-size 100 does not split over 8 devices (1 process): use a multiple of 8")
    alone = subprocess.run([*base, "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1",
                            "--distributed-timeout", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 1
    lines = [l for l in alone.stderr.strip().splitlines() if not l.startswith("WARNING: Location")]
    assert lines == ["process 1 of 2: waiting up to 2 s for the others at 127.0.0.1:1",
                     "densenet-jax: error: not every one of 2 processes joined at 127.0.0.1:1 within 2 s: start "
                     "the same command on every host, each with its --process-id (0 to 1)"]
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_cpu_is_said_to_be_slow(tmp_path, caplog, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "on a CPU about 7x slower than fp32" in " ".join(capsys.readouterr().out.split())
    config = TrainConfig(precision="bf16", batch_size=448, workdir=str(tmp_path / "run"), progress=False,
                         init_from=tiny_weights(tmp_path / "tiny.safetensors"))
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        Run(config)
    assert caplog.messages == ["warning: --precision bf16 on a CPU is about 7x slower than fp32 (XLA:CPU has "
                               "no fast bf16 path); it is meant for GPUs and TPUs"]


def test_another_lr_epochs_and_schedule_reuse_the_compiled_step(tmp_path, monkeypatch):
    """The learning rate is an argument of the step: a run with another --lr, --epochs and --schedule
    loads the traced step and XLA's compiled program instead of tracing and compiling again (counted
    through JAX's compile log, JAX_LOG_COMPILES). The session's cache is shared on purpose: the
    program is train_cli.RUN's, which the uninterrupted run may already have compiled."""
    monkeypatch.setenv("JAX_LOG_COMPILES", "1")
    traced = "Finished tracing flat for jit"  # StoredJit traces the train step as ``flat``
    hit = "Persistent compilation cache hit for 'jit_call'"  # the stored step, compiled
    first = train_cli.train(tmp_path / "a", *train_cli.RUN, "--max-steps", "1")
    assert first.count(traced) + first.count(hit) == 1  # traced and compiled, or found in the cache
    again = train_cli.train(tmp_path / "b", *train_cli.RUN, "--max-steps", "1", "--lr", "0.03",
                            "--epochs", "5", "--schedule", "cosine", "--warmup-epochs", "1")
    assert again.count(traced) == 0 and again.count(hit) == 1


def test_the_summary_names_the_architecture_that_trained():
    """After --init-from the summary names the file's architecture, not the default --model."""
    from densenet_jax.model.registry import get_config
    from densenet_jax.model.registry import architecture_name

    assert architecture_name(get_config("densenet121", num_classes=10, drop_rate=0.2)) == "densenet121"
    assert architecture_name(get_config("densenet121", in_chans=1, head_drop_rate=0.1)) == "densenet121"
    assert architecture_name(get_config("densenet_bc_100_k12")) == "densenet_bc_100_k12"
    assert architecture_name(get_config("densenet121", block_config=(1, 2))) == (
        "DenseNet(k=32, blocks (1, 2), imagenet stem)")

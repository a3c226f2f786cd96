"""timm's schedules, lr by batch size, --recipe and model EMA against timm itself (no model compiled):
the rate at every update from timm's own scheduler driven as its train.py drives it, and
ModelEmaV3's average, BN statistics included, update by update."""

import jax
import numpy as np
import pytest
import torch
import warnings

from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from densenet_jax import cli
from densenet_jax.cli.train import train_config
from densenet_jax.train import TrainConfig, optim, schedules
from densenet_jax.train.ema import ema_decay, ema_update
from densenet_jax.weights.torch_keys import from_torchvision, weight_table
from torch_twins import cifar_bc_model, state_dict_numpy

UPDATES_PER_EPOCH = 7
SCHEDULE_CASES = {  # our options: timm's create_scheduler_v2 arguments are the same names
    "step": dict(sched="step", lr=0.016, epochs=12, decay_epochs=2.4, decay_rate=0.97, warmup_lr=1e-6,
                 warmup_epochs=3),
    "multistep": dict(sched="multistep", lr=0.1, epochs=10, decay_milestones=(2, 5, 7), decay_rate=0.5,
                      warmup_epochs=1, warmup_lr=0.01),
    "cosine": dict(sched="cosine", lr=0.5, epochs=10, warmup_epochs=2, warmup_lr=0.005, min_lr=1e-3,
                   cooldown_epochs=2),
    "cosine-accumulating": dict(sched="cosine", lr=0.5, epochs=10, grad_accum_steps=2),
}


def timm_rates(options, total_updates):
    """The lr of the update about to happen, for each update, from timm's scheduler stepped as
    timm's train.py steps it with --sched-on-updates (step_update after every update)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=options["lr"])
    names = ("decay_epochs", "decay_rate", "decay_milestones", "warmup_lr", "warmup_epochs", "min_lr",
             "cooldown_epochs")
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, options["sched"], num_epochs=options["epochs"], step_on_epochs=False,
        updates_per_epoch=UPDATES_PER_EPOCH, **{k: options[k] for k in names if k in options})
    rates = [optimizer.param_groups[0]["lr"]]
    for update in range(1, total_updates):
        scheduler.step_update(num_updates=update)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates, num_epochs


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_timm_schedules_give_timm_rate_at_every_update(case):
    options = SCHEDULE_CASES[case]
    config = TrainConfig(**options)
    accumulate = config.grad_accum_steps
    steps_per_epoch = UPDATES_PER_EPOCH * accumulate
    total_updates = optim.run_epochs(config) * UPDATES_PER_EPOCH
    reference, num_epochs = timm_rates(options, total_updates)
    assert optim.run_epochs(config) == num_epochs  # cosine's cool-down epochs are trained too
    schedule = optim.schedule_of(config, steps_per_epoch)
    ours = [schedule(step) for step in range(total_updates * accumulate)]
    # Every step of an accumulation runs at its update's rate.
    np.testing.assert_allclose(ours, np.repeat(reference, accumulate), rtol=1e-12, atol=0)
    assert len(set(reference)) > 5  # the rate moved


def test_plateau_follows_timm_on_the_same_accuracies():
    """timm's PlateauLRScheduler stepped after each epoch with that epoch's accuracy (timm's
    train.py): warm-up, a decay after more than --patience-epochs without gain, --min-lr."""
    accuracies = [0.1, 0.2, 0.3, 0.5, 0.5, 0.49, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    options = dict(lr=0.4, decay_rate=0.5, warmup_lr=0.01, warmup_epochs=2, min_lr=0.06)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=options["lr"])
    with warnings.catch_warnings():  # timm deprecates it: its state is not in its checkpoints (ours replays)
        warnings.simplefilter("ignore", FutureWarning)
        scheduler, _ = create_scheduler_v2(optimizer, "plateau", num_epochs=len(accuracies), patience_epochs=1,
                                           **{k: v for k, v in options.items() if k != "lr"})
    reference = [optimizer.param_groups[0]["lr"]]
    for epoch, accuracy in enumerate(accuracies):
        scheduler.step(epoch + 1, accuracy)
        reference.append(optimizer.param_groups[0]["lr"])
    config = TrainConfig(sched="plateau", patience_epochs=1, epochs=len(accuracies) + 1, **options)
    schedule = optim.schedule_of(config, 3, lambda: accuracies)
    ours = [schedule(step) for step in range(3 * (len(accuracies) + 1))]
    np.testing.assert_allclose(ours, np.repeat(reference, 3), rtol=1e-12, atol=0)
    assert reference[-1] == pytest.approx(0.06) and 0.2 in reference  # decayed, then held at min_lr


def test_lr_from_lr_base_as_timm_scales_it():
    """timm's train.py: lr = lr_base x (batch x accumulation / lr_base_size), its square root for
    'ada' and 'lamb' optimizers unless --lr-base-scale says; --lr given wins; neither: 0.1."""
    assert TrainConfig(lr_base=0.2, lr_base_size=128, batch_size=32, grad_accum_steps=2).lr == pytest.approx(0.1)
    assert TrainConfig(opt="lamb", lr_base=0.2, lr_base_size=512, batch_size=128).lr == pytest.approx(0.1)
    assert TrainConfig(opt="adamw", lr_base=0.2, lr_base_size=512, batch_size=128,
                       lr_base_scale="linear").lr == pytest.approx(0.05)
    assert TrainConfig(lr=0.3, lr_base=0.2, batch_size=128).lr == 0.3
    assert TrainConfig(batch_size=1000).lr == 0.1


def test_recipe_fills_what_the_command_leaves_out():
    """Explicit options override a preset, even when they give an option's default value; the
    values the preset set are named for the run's record."""
    args = cli.parser().parse_args(["train", "--recipe", "timm-ra", "--epochs", "10", "--batch-size", "64",
                                    "--weight-decay", "1e-4"])
    config = train_config(args)
    assert (config.opt, config.opt_eps, config.sched, config.decay_epochs, config.decay_rate) == (
        "rmsproptf", 1e-3, "step", 2.4, 0.97)
    assert (config.lr, config.warmup_lr, config.model_ema, config.model_ema_decay) == (0.016, 1e-6, True, 0.9999)
    assert (config.epochs, config.batch_size, config.weight_decay) == (10, 64, 1e-4)  # given: kept
    assert {"opt", "lr", "model_ema"} <= config.recipe_values.keys()
    assert not {"epochs", "batch_size", "weight_decay"} & config.recipe_values.keys()
    imagenet = train_config(cli.parser().parse_args(["train", "--recipe", "paper-imagenet"]))
    assert (imagenet.sched, imagenet.decay_epochs, imagenet.epochs, imagenet.batch_size) == ("step", 30, 90, 256)
    assert not imagenet.filter_bias_and_bn


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_timm_model_ema_v3_update_by_update(warmup):
    """ModelEmaV3.update(model, step=n) after each update n, as timm's train.py calls it: every
    parameter and running statistic of the average, four updates of a model that moves."""
    model = cifar_bc_model(16, 6, seed=2).double()
    reference = ModelEmaV3(model, decay=0.8, use_warmup=warmup)
    _, config = from_torchvision(state_dict_numpy(model), "torch")
    table = weight_table(config)
    g = torch.Generator().manual_seed(0)
    with jax.enable_x64(True):
        start = state_dict_numpy(model)  # views of the model's tensors, which move in place: copied
        ours = {e.flax_key: np.array(e.to_flax(start[e.torch_key])) for e in table}
        for update in range(1, 5):
            with torch.no_grad():
                for v in model.state_dict().values():
                    if v.is_floating_point():
                        v.add_(torch.randn(v.shape, generator=g, dtype=v.dtype))
            reference.update(model, step=update)
            current = {e.flax_key: e.to_flax(state_dict_numpy(model)[e.torch_key]) for e in table}
            ours = ema_update(ours, current, ema_decay(update, 0.8, warmup))
        expected = state_dict_numpy(reference.module)
        errors = {e.flax_key: np.linalg.norm(np.asarray(ours[e.flax_key]) - e.to_flax(expected[e.torch_key]))
                  / np.linalg.norm(e.to_flax(expected[e.torch_key])) for e in table}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-12, (worst, errors[worst])
    # The average is not the model: it lags it.
    assert not np.allclose(ours["classifier.kernel"], current["classifier.kernel"])


def test_a_rate_far_from_the_batch_scaled_one_is_warned(tmp_path, tiny_run, caplog):
    """A new user's --batch-size 1-like run at the default lr 0.1 hears that it is far from
    timm's rate for its batch; the paper's batch 64 at 0.1 (4x) does not."""
    from densenet_jax.train.loop import Run
    Run(tiny_run(tmp_path / "two", batch_size=2))
    assert "--lr 0.1 is 128x above 0.000781, timm's rate for a batch of 2" in caplog.text
    assert schedules.far_from_scaled(0.1, 0.1, 256, 64, None, "sgd") is None

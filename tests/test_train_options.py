"""timm's optimiser, schedule, EMA and recipe options and the CSV options of ``densenet-jax train``
reach the TrainConfig fields the trainer reads (each field's effect is checked against timm,
torch or scikit-learn in test_optimizers, test_schedules, test_train_ema and test_xray)."""

import pytest

from densenet_jax import cli
from densenet_jax.cli.train import train_config
from densenet_jax.train import recipes


def config_of(*argv):
    return train_config(cli.parser().parse_args(["train", "--workdir", "unused", *map(str, argv)]))


def test_timm_options_set_their_fields():
    config = config_of(
        "--batch-size", 32, "--opt", "adamw", "--opt-eps", "1e-6", "--opt-betas", "0.8", "0.95",
        "--filter-bias-and-bn", "--clip-grad", 2, "--clip-mode", "value", "--grad-accum-steps", 2,
        "--layer-decay", 0.7, "--sched", "multistep", "--decay-epochs", 3, "--decay-milestones", 2, 4,
        "--decay-rate", 0.5, "--warmup-lr", "1e-5", "--min-lr", "1e-6", "--cooldown-epochs", 1,
        "--patience-epochs", 3, "--lr-base", 0.05, "--lr-base-size", 128, "--lr-base-scale", "linear",
        "--model-ema", "--model-ema-decay", 0.99, "--model-ema-warmup", "--best-from", "ema")
    expected = dict(opt="adamw", opt_eps=1e-6, opt_betas=(0.8, 0.95), filter_bias_and_bn=True, clip_grad=2.0,
                    clip_mode="value", grad_accum_steps=2, layer_decay=0.7, sched="multistep", decay_epochs=3.0,
                    decay_milestones=(2, 4), decay_rate=0.5, warmup_lr=1e-5, min_lr=1e-6, cooldown_epochs=1,
                    patience_epochs=3, lr_base=0.05, lr_base_size=128, lr_base_scale="linear", model_ema=True,
                    model_ema_decay=0.99, model_ema_warmup=True, best_from="ema")
    assert {k: getattr(config, k) for k in expected} == expected
    # timm's rule without --lr: lr_base x (batch x accumulation) / lr_base_size, linear here.
    assert config.lr == pytest.approx(0.05 * 32 * 2 / 128)


def test_a_recipe_fills_what_the_command_left_out():
    preset = recipes.RECIPES["timm-ra"]
    config = config_of("--dataset", "folder", "--data-dir", "root", "--recipe", "timm-ra", "--opt", "sgd", "--lr", 0.01)
    assert config.recipe == "timm-ra" and config.opt == "sgd" and config.lr == 0.01  # given: kept
    assert "opt" not in config.recipe_values and "lr" not in config.recipe_values
    for field, value in config.recipe_values.items():
        assert getattr(config, field) == value == preset[field], field
    assert config.recipe_values  # the preset set something


def test_csv_options_set_the_spec():
    config = config_of("--dataset", "csv", "--data-dir", "root", "--train-csv", "train.csv",
                       "--val-csv", "val.csv", "--path-column", "Path", "--label-columns", "Edema", "Effusion",
                       "--patient-column", "Patient", "--uncertain", "zeros", "--pos-weight", "auto")
    spec = config.csv_spec()
    assert (spec.train_csv, spec.val_csv, spec.path_column, spec.label_columns, spec.patient_column,
            spec.uncertain) == ("train.csv", "val.csv", "Path", ("Edema", "Effusion"), "Patient", "zeros")
    assert config.pos_weight == "auto"
    held_out = config_of("--dataset", "csv", "--data-dir", "root", "--train-csv", "train.csv",
                         "--val-fraction", 0.25).csv_spec()
    assert held_out.val_fraction == 0.25 and held_out.val_csv is None


def test_evaluate_takes_the_same_csv_options():
    from densenet_jax.cli.evaluate import csv_spec

    args = cli.parser().parse_args(["evaluate", "--weights", "w.safetensors", "--dataset", "csv", "--data-dir", "root",
                                    "--train-csv", "train.csv", "--val-fraction", "0.2", "--path-column", "Path",
                                    "--label-columns", "Edema", "--patient-column", "Patient", "--uncertain", "ones",
                                    "--json"])
    spec = csv_spec(args)
    assert (spec.train_csv, spec.val_fraction, spec.path_column, spec.label_columns, spec.patient_column,
            spec.uncertain) == ("train.csv", 0.2, "Path", ("Edema",), "Patient", "ones")
    assert args.json
    spec = csv_spec(cli.parser().parse_args(["evaluate", "--weights", "w", "--dataset", "csv", "--data-dir", "r",
                                             "--val-csv", "val.csv"]))
    assert spec.val_csv == "val.csv" and spec.train_csv is None

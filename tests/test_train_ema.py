"""Model EMA and gradient accumulation in a whole run (in process, the tiny model on digits):
accumulating two batches of 64 trains as one batch of 128; a run with both stopped mid-accumulation
and resumed ends bit for bit where an uninterrupted one ends, EMA included; the average is
evaluated each epoch and written with the run's class names and preprocessing."""

import json

import numpy as np

import densenet_jax as dj
from densenet_jax.cli.train import held_out_summary, results_line
from densenet_jax.train.loop import Run
from densenet_jax.train.report import is_best
from densenet_jax.weights.format import read_safetensors, stored_class_names

# Head-only keeps the backbone's BatchNorm in eval mode, so that each example's gradient does not
# depend on the others in its batch: only then do two batches of 64 equal one of 128.
ACCUMULATED = dict(head_only=True, batch_size=64, grad_accum_steps=2, model_ema=True, model_ema_decay=0.5,
                   best_from="ema")


def weights(workdir, name="model.safetensors"):
    return read_safetensors(workdir / name)[0]


def test_ema_and_accumulation_resume_exactly_and_equal_the_larger_batch(tmp_path, tiny_run):
    whole, pieces, larger = tmp_path / "whole", tmp_path / "pieces", tmp_path / "larger"
    Run(tiny_run(whole, **ACCUMULATED)).fit()
    # The command's last line names every file and folder the run left, the average's included.
    line = results_line(whole, tiny_run(whole, **ACCUMULATED))
    left = sorted(p.name + "/" * p.is_dir() for p in whole.iterdir())
    assert [name for name in left if f" {name}" not in line] == [], line
    Run(tiny_run(pieces, **ACCUMULATED, max_steps=5)).fit()  # stops between an accumulation's two steps
    Run(tiny_run(pieces, **ACCUMULATED)).fit()
    for name in ("model.safetensors", "model_ema.safetensors", "best.safetensors"):
        a, b = weights(whole, name), weights(pieces, name)
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=f"{name} {key}")
    rows, resumed = ([json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
                     for w in (whole, pieces))
    for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "eval_loss_ema", "eval_acc_ema"):
        assert [r[key] for r in resumed] == [r[key] for r in rows], key
    assert 0 < rows[0]["eval_acc_ema"] <= 1 and rows[0]["eval_loss_ema"] != rows[0]["eval_loss"]

    # The average lags the model; best.safetensors is the average's (--best-from ema), and it
    # records what the model's file records.
    ema, final = weights(whole, "model_ema.safetensors"), weights(whole)
    assert not np.allclose(ema["classifier.kernel"], final["classifier.kernel"])
    np.testing.assert_array_equal(weights(whole, "best.safetensors")["classifier.kernel"], ema["classifier.kernel"])
    assert stored_class_names(whole / "model_ema.safetensors") == stored_class_names(whole / "model.safetensors")
    recorded = dj.load(whole / "model.safetensors").pretrained_cfg
    assert recorded is not None and dj.load(whole / "model_ema.safetensors").pretrained_cfg == recorded

    Run(tiny_run(larger, head_only=True, batch_size=128)).fit()
    reference = weights(larger)
    for key in ("classifier.kernel", "classifier.bias"):
        error = np.linalg.norm(final[key] - reference[key]) / np.linalg.norm(reference[key])
        assert error <= 1e-5, (key, error)


def test_the_summary_names_the_epoch_best_safetensors_holds(tiny_run, tmp_path):
    """best.safetensors is rewritten at each epoch as good as the best so far (is_best), so a tie
    goes to the later epoch; with --best-from ema it is the average's figures that decide. The
    command's summary must name that epoch, not the first of a tie or the model's best."""
    rows = [dict(epoch=1, eval_acc=0.5, eval_acc_ema=0.2), dict(epoch=2, eval_acc=0.7, eval_acc_ema=0.3),
            dict(epoch=3, eval_acc=0.7, eval_acc_ema=0.1), dict(epoch=4, eval_acc=0.6, eval_acc_ema=0.3)]
    for best_from, epoch, figure in (("model", 3, "0.7000"), ("ema", 4, "0.3000")):
        written = [r["epoch"] for i, r in enumerate(rows) if is_best(rows[:i + 1], best_from == "ema")]
        assert written[-1] == epoch, written  # the epoch whose weights the file holds at the end
        config = tiny_run(tmp_path, **({"model_ema": True, "best_from": "ema"} if best_from == "ema" else {}))
        summary = held_out_summary(rows, config)
        assert summary.endswith(f"(best {figure} at epoch {epoch})"), summary
    assert held_out_summary(rows, config).startswith("held-out accuracy of the EMA weights 0.3000")

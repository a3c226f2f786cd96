"""Training pieces: schedules, mixed precision, fine-tuning, head-only, the command's surface."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.train import optim, parallel
from densenet_jax.train.loop import Run, TrainConfig
from densenet_jax.weights import state_arrays


def tiny(**overrides):
    return dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), growth_rate=6, **overrides)


def test_schedules():
    cifar = optim.learning_rate("cifar", 0.1, total_steps=100, steps_per_epoch=10)
    assert [float(cifar(s)) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    imagenet = optim.learning_rate("imagenet", 0.1, total_steps=900, steps_per_epoch=10)
    assert [float(imagenet(s)) for s in (299, 300, 599, 600)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    cosine = optim.learning_rate("cosine", 0.1, 100, 10, warmup_epochs=1)
    assert float(cosine(0)) == 0 and float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(55)) == pytest.approx(0.05, rel=1e-2) and float(cosine(100)) < 1e-6
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.learning_rate("step", 0.1, 10, 1)


def test_host_schedules_and_lr_argument_equal_optax_sgd_with_its_schedules():
    """The rate computed on the host and applied in the step gives optax.sgd's updates with optax's
    own schedule compiled in (the form it replaced, issue 16.3)."""
    references = {"cifar": optax.piecewise_constant_schedule(0.1, {50: 0.1, 75: 0.1}),
                  "imagenet": optax.piecewise_constant_schedule(0.1, {33: 0.1, 66: 0.1}),
                  "cosine": optax.warmup_cosine_decay_schedule(0.0, 0.1, 20, 100),
                  "constant": optax.constant_schedule(0.1)}
    for kind, reference in references.items():
        ours = optim.learning_rate(kind, 0.1, total_steps=100, steps_per_epoch=10, warmup_epochs=2)
        np.testing.assert_allclose([ours(s) for s in range(105)], [float(reference(s)) for s in range(105)],
                                   rtol=1e-6, atol=1e-8, err_msg=kind)  # optax: float32
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    schedule = optim.learning_rate("cosine", 0.1, 10, 1, warmup_epochs=2)
    tx = optim.sgd()
    reference = optax.chain(optax.add_decayed_weights(1e-4),
                            optax.sgd(optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10),
                                      momentum=0.9, nesterov=True))
    ours, theirs, state, ref_state = params, params, tx.init(params), reference.init(params)
    for step in range(6):
        grads = {"w": jnp.cos(ours["w"] * (step + 1))}
        updates, state = tx.update(grads, state, ours)
        ours = optim.apply_learning_rate(ours, updates, jnp.float32(schedule(step)))
        updates, ref_state = reference.update({"w": jnp.cos(theirs["w"] * (step + 1))}, ref_state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-6)
    assert not np.allclose(ours["w"], params["w"])  # it moved


def batch(rng, n=8, size=16):
    return (rng.standard_normal((n, size, size, 3), dtype=np.float32),
            rng.integers(0, 10, n).astype(np.int32))


def run_steps(model, tx, rng, steps=2, **options):
    runner = parallel.make("mesh", model, tx, **options)
    state = runner.place_state(runner.steps.initial)
    for _ in range(steps):
        state, metrics = runner.train(state, *runner.place_batch(*batch(rng)), 0.05)
    return runner, state, runner.fetch(metrics)


def test_bf16_computes_in_bfloat16_and_keeps_fp32_state(rng):
    model = tiny(num_classes=10)
    runner, state, metrics = run_steps(model, optim.sgd(), rng, compute_dtype=jnp.bfloat16)
    assert np.isfinite(metrics["loss"])
    assert {x.dtype for x in jax.tree.leaves((state.params, state.batch_stats))} == {jnp.dtype(jnp.float32)}
    hlo = runner._train.lower(state, runner.rest, *runner.place_batch(*batch(rng)), np.float32(0.05)).as_text()
    assert "bf16" in hlo and "convolution" in hlo


def test_head_only_changes_only_the_classifier(rng):
    model = tiny(num_classes=10)
    before = {k: np.asarray(v) for k, v in state_arrays(model).items()}
    tx = optim.head_only(optim.sgd())
    runner, state, _ = run_steps(model, tx, rng, freeze_features=True)
    after = {k: np.asarray(v) for k, v in state_arrays(runner.steps.model(runner.host_state(state))).items()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"classifier.kernel", "classifier.bias"}


def test_fine_tune_from_weights_with_a_new_head(tmp_path, capsys):
    source = tiny(num_classes=1000, rngs=nnx.Rngs(4))
    dj.save(source, tmp_path / "pretrained.safetensors")
    config = TrainConfig(init_from=str(tmp_path / "pretrained.safetensors"), epochs=1, batch_size=448,
                         workdir=str(tmp_path / "run"), progress=False, lr=0.01)
    result = Run(config).fit()
    assert result["step"] == 3 and 0 <= result["metrics"][0]["eval_acc"] <= 1
    tuned = dj.load(tmp_path / "run" / "model.safetensors")
    assert tuned.config.num_classes == 10
    assert tuned.config.block_config == (2, 2, 2)
    cli.main(["evaluate", "--weights", str(tmp_path / "run" / "model.safetensors"), "--dataset", "digits"])
    out = capsys.readouterr().out
    accuracy = float(out.rsplit("accuracy ", 1)[1])
    assert accuracy == pytest.approx(result["metrics"][0]["eval_acc"], abs=5e-5)  # printed to 4 places


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size", "--workdir",
                   "--init-from", "--precision", "--parallel", "--seed", "--coordinator"):
        assert option in text


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no such folder" in err[0]

"""A run stopped and rerun ends bit for bit where an uninterrupted run ends; reruns reuse the
compiled programs (README, Training: checkpoints and the compilation cache)."""

import json

import jax

from densenet_jax import cli
from densenet_jax.train.report import PARTIAL
from torch_twins import cifar_bc_model
from train_cli import MODEL, RUN, assert_same_weights, train


def rows(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_stopped_run_resumes_exactly(tmp_path, uninterrupted):
    whole, pieces, cache = uninterrupted, tmp_path / "pieces", tmp_path / "cache"
    assert not (whole / PARTIAL).exists()  # what only a resume within an epoch reads is gone once done
    out = train(pieces, *RUN, "--max-steps", "2", cache=cache)  # stops mid-epoch 1, at a checkpoint
    assert not (pieces / "model.safetensors").exists() and (pieces / PARTIAL).exists()
    assert ("stopped by --max-steps at step 2 of 6 (epoch 1, 2 of its 3 steps), checkpoint saved; "
            "run the same command again to continue") in out
    stored = sorted((cache / "densenet-jax-steps").glob("*.jaxexport"))
    assert len(stored) == 1 and len(list(cache.iterdir())) > 1  # the traced step, and XLA's programs
    out = train(pieces, *RUN, "--max-steps", "3", cache=cache)  # resumes at 2, stops mid-epoch 2
    assert f"work directory: {pieces}; resuming at step 2 (epoch 1, 2 of its 3 steps done)" in out
    train(pieces, *RUN, cache=cache)  # the same command again finishes the run
    assert sorted((cache / "densenet-jax-steps").glob("*.jaxexport")) == stored  # loaded, not traced again
    assert_same_weights(pieces, whole)
    rows_a, rows_b = rows(whole), rows(pieces)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    # Both epochs were resumed mid-way, yet their figures are the uninterrupted run's, train ones included.
    for key in ("eval_acc", "eval_loss", "train_loss", "train_acc"):
        assert [r[key] for r in rows_b] == [r[key] for r in rows_a], key
    kept = sorted(int(p.name) for p in (pieces / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == 6 and len(kept) <= 3  # the last K=3 kept
    assert not (pieces / PARTIAL).exists()
    for name in ("best.safetensors", "curves.png"):
        assert (pieces / name).stat().st_size > 0


def test_a_run_says_what_it_runs_and_how_each_epoch_went(uninterrupted):
    """The start-up block, and one line per epoch (with --no-progress too) that metrics.jsonl matches;
    images/s leaves out the first step, which compiles or loads the compiled step."""
    out = uninterrupted.with_name(f"{uninterrupted.name}.out").read_text()
    count = sum(p.numel() for p in cifar_bc_model(16, 12).parameters())  # train_cli.MODEL's torch twin
    assert f"model: {MODEL}, {count:,} parameters, 10 classes" in out
    assert "data: digits, 1,437 training and 360 held-out images, 8x8" in out
    assert "devices: 1 cpu device in 1 process (mesh)" in out
    assert ("batch 448 (448 per device), 3 steps per epoch, 2 epochs = 6 steps; lr 0.1, cifar schedule; "
            "precision fp32") in out
    assert f"work directory: {uninterrupted}; starting at step 0" in out
    first, second = rows(uninterrupted)
    assert (f"epoch 1/2: train loss {first['train_loss']:.4f} acc {first['train_acc']:.4f}, held-out loss "
            f"{first['eval_loss']:.4f} acc {first['eval_acc']:.4f}, {first['images_per_sec']:.0f} images/s, "
            f"{first['seconds']:.0f} s (first step {first['first_step_seconds']:.1f} s: compiling") in out
    assert f"epoch 2/2: train loss {second['train_loss']:.4f}" in out and second["first_step_seconds"] is None
    # Two timed steps in a span that leaves out at least the first step's time.
    assert first["images_per_sec"] >= 2 * 448 / (first["seconds"] - first["first_step_seconds"])


def test_compilation_cache_folder(tmp_path, monkeypatch):
    """~/.cache/densenet-jax/xla by default; DENSENET_JAX_CACHE moves it, and empty turns it off."""
    previous = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        for value, expected in ((None, str(tmp_path / ".cache" / "densenet-jax" / "xla")),
                                (str(tmp_path / "elsewhere"), str(tmp_path / "elsewhere")), ("", None)):
            jax.config.update("jax_compilation_cache_dir", None)
            if value is None:
                monkeypatch.delenv("DENSENET_JAX_CACHE", raising=False)
            else:
                monkeypatch.setenv("DENSENET_JAX_CACHE", value)
            cli._enable_compilation_cache()
            assert jax.config.jax_compilation_cache_dir == expected, value
    finally:
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])

"""A run stopped and rerun ends bit for bit where an uninterrupted run ends; reruns reuse the
compiled programs (README, Training: checkpoints and the compilation cache)."""

import json

import jax

from densenet_jax import cli
from train_cli import RUN, assert_same_weights, train


def test_stopped_run_resumes_exactly(tmp_path, uninterrupted):
    whole, pieces, cache = uninterrupted, tmp_path / "pieces", tmp_path / "cache"
    train(pieces, *RUN, "--max-steps", "2", cache=cache)  # stops mid-epoch 1, at a checkpoint
    assert not (pieces / "model.safetensors").exists()
    stored = sorted((cache / "densenet-jax-steps").glob("*.jaxexport"))
    assert len(stored) == 1 and len(list(cache.iterdir())) > 1  # the traced step, and XLA's programs
    out = train(pieces, *RUN, "--max-steps", "3", cache=cache)  # resumes at 2, stops mid-epoch 2
    assert "resuming" in out and "step 2" in out
    train(pieces, *RUN, cache=cache)  # the same command again finishes the run
    assert sorted((cache / "densenet-jax-steps").glob("*.jaxexport")) == stored  # loaded, not traced again
    assert_same_weights(pieces, whole)
    rows_a = [json.loads(l) for l in (whole / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (pieces / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2]
    assert [r["eval_acc"] for r in rows_b] == [r["eval_acc"] for r in rows_a]
    assert [r["eval_loss"] for r in rows_b] == [r["eval_loss"] for r in rows_a]
    kept = sorted(int(p.name) for p in (pieces / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == 6 and len(kept) <= 3  # the last K=3 kept
    for name in ("best.safetensors", "curves.png"):
        assert (pieces / name).stat().st_size > 0


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

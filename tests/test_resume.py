"""A run stopped and rerun ends bit for bit where an uninterrupted run ends."""

import json

import numpy as np

from train_cli import train, weights

# Two epochs of 3 steps, dropout on (so the RNG must resume too), a checkpoint every 2 steps.
RUN = ["--epochs", "2", "--drop-rate", "0.2", "--checkpoint-every", "2"]


def test_interrupted_run_resumes_exactly(tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    train(whole, *RUN)
    train(pieces, *RUN, "--max-steps", "2")  # stops mid-epoch 1, at a checkpoint
    assert not (pieces / "model.safetensors").exists()
    out = train(pieces, *RUN, "--max-steps", "3")  # resumes at 2, stops mid-epoch 2
    assert "resuming" in out and "step 2" in out
    train(pieces, *RUN)  # the same command again finishes the run
    a, b = weights(whole), weights(pieces)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    rows_a = [json.loads(l) for l in (whole / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (pieces / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2]
    assert [r["eval_acc"] for r in rows_b] == [r["eval_acc"] for r in rows_a]
    assert [r["eval_loss"] for r in rows_b] == [r["eval_loss"] for r in rows_a]
    kept = sorted(int(p.name) for p in (pieces / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == 6 and len(kept) <= 3  # the last K=3 kept
    for name in ("best.safetensors", "curves.png"):
        assert (pieces / name).stat().st_size > 0

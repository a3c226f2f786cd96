"""A run stopped and rerun ends bit for bit where an uninterrupted run ends."""

import json

from train_cli import RUN, assert_same_weights, train


def test_stopped_run_resumes_exactly(tmp_path, uninterrupted):
    whole, pieces = uninterrupted, tmp_path / "pieces"
    train(pieces, *RUN, "--max-steps", "2")  # stops mid-epoch 1, at a checkpoint
    assert not (pieces / "model.safetensors").exists()
    out = train(pieces, *RUN, "--max-steps", "3")  # resumes at 2, stops mid-epoch 2
    assert "resuming" in out and "step 2" in out
    train(pieces, *RUN)  # the same command again finishes the run
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

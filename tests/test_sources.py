"""Hugging Face data sets (hfds/) and WebDataset shards (wds/) beside image folders: each host reads
its own share, exactly once an epoch, reproducibly and resumably; the same transforms and
unreadable-image rule as folders; a bad shard, row or sample named in one line."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sources
from densenet_jax import DataError, cli
from densenet_jax.data import load_dataset, train_batches
from densenet_jax.data.wds import expand_braces
from test_train_parallel import PORT_TAKEN, free_port

HERE = Path(__file__).resolve().parent
AUGMENT_SIZE = 16


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return sources.write_all(tmp_path_factory.mktemp("sources"))


def two_hosts(written, attempts: int = 3) -> list[dict]:
    """What processes 0 and 1, joined by jax.distributed on 127.0.0.1, read of each source."""
    for attempt in range(attempts):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, str(HERE / "read_share.py"), json.dumps(written), str(port),
                                   str(i), "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
                 for i in range(2)]
        outs = [p.communicate(timeout=240) for p in procs]
        if all(p.returncode == 0 for p in procs):
            return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
        errors = "\n".join(err for _, err in outs)
        if attempt + 1 == attempts or not PORT_TAKEN.search(errors):
            raise AssertionError(errors[-3000:])


def test_two_hosts_read_every_example_once_and_as_one_process_would(written):
    hosts = two_hosts(written)
    assert [h["host"] for h in hosts] == [[0, 2], [1, 2]]
    for short in written:
        for epoch in (0, 1):
            reads = [sum(h[short]["train"][epoch], []) for h in hosts]
            assert len(reads[0]) == len(reads[1]) == sources.COUNT // 2, (short, reads)
            assert sorted(reads[0] + reads[1]) == list(range(sources.COUNT)), (short, epoch, reads)
        assert hosts[0][short]["train"][0] != hosts[0][short]["train"][1], short  # reshuffled each epoch
        held_out = hosts[0][short]["eval"] + hosts[1][short]["eval"]
        assert sorted(held_out) == list(range(sources.COUNT)), (short, held_out)
    # Bit-reproducible: the same reads from the same seed, in another process without jax.distributed.
    for i, host in enumerate(hosts):
        assert sources.read_share(written, i, 2) == host


@pytest.mark.parametrize("short", ["hfds", "wds"])
def test_a_resumed_epoch_reads_what_the_uninterrupted_one_did(written, short):
    data = load_dataset(**written[short], image_size=AUGMENT_SIZE)
    whole = list(train_batches(data.train, data.augment, seed=1, epoch=2, global_batch=sources.BATCH))
    workers = 1 if short == "wds" else 0  # the batches do not depend on the worker processes
    resumed = list(train_batches(data.train, data.augment, seed=1, epoch=2, global_batch=sources.BATCH,
                                 start_step=1, workers=workers))
    assert len(whole) == 3 and len(resumed) == 2
    for a, b in zip(whole[1:], resumed):
        assert a["image"].dtype == np.float32 and a["image"].shape == (sources.BATCH, AUGMENT_SIZE, AUGMENT_SIZE, 3)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("samples, short", [(sources.COUNT, False), (sources.COUNT + 4, True)])
def test_shards_are_read_again_only_when_an_epoch_needs_more(written, samples, short, caplog):
    """An epoch of exactly the shards' samples reads them once and says nothing, however far
    ahead the decoding runs; one that needs more (a --train-num-samples above the real count)
    reads them again and says so."""
    args = {**written["wds"], "train_num_samples": samples}
    data = load_dataset(**args, image_size=AUGMENT_SIZE)
    with caplog.at_level(logging.INFO, logger="densenet_jax"):
        batches = list(train_batches(data.train, data.augment, seed=1, epoch=0, global_batch=sources.BATCH))
    assert len(batches) == samples // sources.BATCH
    assert ("ran short of this host's share of an epoch" in caplog.text) == short, caplog.text


def test_every_source_has_the_folders_transforms_and_the_class_names(written, tmp_path):
    folder = load_dataset(**written["folder"], image_size=AUGMENT_SIZE)
    saved = {"name": f"hfds/{sources.write_saved(tmp_path / 'saved')}"}
    for args in (written["hfds"], saved, written["wds"]):
        data = load_dataset(**args, image_size=AUGMENT_SIZE)
        assert data.num_classes == sources.COUNT and data.image_size == AUGMENT_SIZE
        if args["name"].startswith("hfds/"):
            assert data.class_names == sources.class_names()  # the ClassLabel's names
        # hfds' rows are read by index; a stream's examples are not: its transforms take the folder's.
        train, held_out = (data.train, data.eval) if args["name"].startswith("hfds/") else (folder.train, folder.eval)
        rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
        np.testing.assert_array_equal(data.augment(train[7], rng_a)["image"],
                                      folder.augment(folder.train[7], rng_b)["image"])
        np.testing.assert_array_equal(data.preprocess(held_out[7])["image"], folder.preprocess(folder.eval[7])["image"])


def test_an_unreadable_row_or_sample_is_named_and_replaced_by_the_next(tmp_path, caplog):
    images = [sources.png(sources.LEVEL * i) for i in range(sources.COUNT)]
    images[3] = b"\x89PNG\r\n\x1a\n truncated"
    hf = load_dataset(f"hfds/{sources.write_parquet(tmp_path / 'pq', images=images)}", image_size=8)
    shard = sources.write_shard(tmp_path / "s-0.tar", [
        {"__key__": f"k{i}", "png": images[i], "cls": str(i).encode()} for i in range(sources.COUNT)])
    wds = load_dataset(f"wds/{shard}", val_split=str(shard), image_size=8)
    with caplog.at_level(logging.WARNING, logger="densenet_jax"):
        row = hf.train[3]
        examples = [ex for batch in train_batches(wds.train, sources.identity, seed=0, epoch=0, global_batch=12)
                    for ex in zip(batch["label"], batch["skipped"], batch["image"][:, 0, 0, 0])]
    assert row["skipped"] == 1 and row["label"] == 4
    assert f"{tmp_path / 'pq'}[train] row 3: unreadable image, skipped (" in caplog.text
    assert f"{shard}:k3.png: unreadable image, skipped (" in caplog.text
    skipped = [i for i, (_, skip, _) in enumerate(examples) if skip]
    assert len(skipped) == 1 and 0 <= skipped[0] < len(examples) - 1  # with seed 0
    stand_in, after = examples[skipped[0]], examples[skipped[0] + 1]  # the next of the stream
    assert stand_in[0] == after[0] and stand_in[2] == after[2] == sources.LEVEL * after[0]
    assert 3 not in [label for label, _, _ in examples]


def test_bytes_that_are_no_image_are_named_by_where_they_came_from():
    """Pillow's own message names its in-memory buffer (``<_io.BytesIO object at 0x...>``), which
    means nothing to the user: the line names the sample, and the reason without the buffer."""
    from densenet_jax.data.images import UnreadableImage, decode_image

    with pytest.raises(UnreadableImage) as refused:
        decode_image(b"no image", "s-0.tar:k3.png")
    assert str(refused.value) == "s-0.tar:k3.png: unreadable image (UnidentifiedImageError: cannot identify image file)"


def test_bad_shards_samples_and_columns_are_named_in_one_line(tmp_path, capsys):
    good = sources.write_shard(tmp_path / "good-0.tar", [{"__key__": "a", "png": sources.png(0), "cls": b"0"}])
    (tmp_path / "junk-0.tar").write_bytes(b"not a tar file at all" * 40)
    nolabel = sources.write_shard(tmp_path / "nolabel-0.tar", [{"__key__": "b", "png": sources.png(0)}])
    cases = {f"wds/{tmp_path}/junk-{{0..0}}.tar": f"{tmp_path}/junk-0.tar: not a readable tar shard",
             f"wds/{tmp_path}/good-{{0..1}}.tar": f"{tmp_path}/good-1.tar: no such shard",
             f"hfds/{sources.write_parquet(tmp_path / 'pq', 2)}": "[train]: no column 'img' (--input-key"}
    for dataset, message in cases.items():
        extra = ["--val-split", dataset[4:], "--train-num-samples", "1"]
        if dataset.startswith("hfds/"):
            extra = ["--input-key", "img"]
        with pytest.raises(SystemExit) as stop:
            cli.main(["train", "--dataset", dataset, *extra, "--workdir", str(tmp_path / "run"), "--no-progress"])
        err = capsys.readouterr().err
        assert stop.value.code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    # Found when read: a stream is not scanned ahead.
    data = load_dataset(f"wds/{nolabel}", val_split=str(good), train_num_samples=1)
    with pytest.raises(DataError, match=f"^{nolabel}:b: sample has no label"):
        next(train_batches(data.train, data.augment, seed=0, epoch=0, global_batch=1))


def test_brace_patterns_expand_as_webdataset_expands_them():
    from braceexpand import braceexpand  # webdataset's own expansion, the reference

    for pattern in ("a-{008..011}.tar", "{x,y}/{1..2}", "s-{9..11}.tar", "plain.tar", "{a,b}-{00..02}-{7..8}",
                    "{3..1}"):
        assert expand_braces(pattern) == list(braceexpand(pattern)), pattern


def test_train_options_name_columns_splits_and_sample_count(tmp_path):
    import datasets

    from densenet_jax.cli.train import train_config
    from densenet_jax.train.config import source_options

    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b", "c"])})
    splits = {name: datasets.Dataset.from_dict({"img": [{"bytes": sources.png(0), "path": None}] * n,
                                                "fine": [i % 3 for i in range(n)]}, features=features)
              for name, n in (("tr", 5), ("te", 2))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    sources.write_shard(tmp_path / "j-0.tar", [
        {"__key__": f"k{i}", "jpg": sources.png(0), "json": json.dumps({"lab": i}).encode()} for i in range(4)])

    def loaded(*argv):
        config = train_config(cli.parser().parse_args(["train", *argv]))
        return load_dataset(config.dataset, config.data_dir, image_size=8, **source_options(config))

    hf = loaded("--dataset", f"hfds/{tmp_path / 'saved'}", "--input-key", "img", "--target-key", "fine",
                "--train-split", "tr", "--val-split", "te")
    assert (len(hf.train), len(hf.eval), hf.class_names) == (5, 2, ["a", "b", "c"])
    shards = loaded("--dataset", "wds/j-{0..0}.tar", "--data-dir", str(tmp_path), "--val-split", "j-0.tar",
                    "--target-key", "lab", "--train-num-samples", "3")
    assert (len(shards.train), len(shards.eval), shards.num_classes) == (3, 4, 4)
    batch = next(train_batches(shards.train, sources.identity, seed=0, epoch=0, global_batch=3))
    assert len(set(batch["label"].tolist())) == 3 and set(batch["label"].tolist()) <= {0, 1, 2, 3}  # json "lab"


def test_evaluate_reads_each_source_as_the_folder(written, tmp_path, capsys):
    """``evaluate`` takes timm's source options: the same weights score the same images the same
    whether they come from the folder, the Parquet files or the shards' held-out pattern."""
    import densenet_jax as dj
    from flax import nnx

    weights = tmp_path / "w.safetensors"
    dj.save(dj.create_model("densenet_bc_16_k12", num_classes=sources.COUNT, rngs=nnx.Rngs(0)), weights)

    def evaluated(*argv):
        cli.main(["evaluate", "--weights", str(weights), "--image-size", str(AUGMENT_SIZE), "--json", *argv])
        return json.loads(capsys.readouterr().out)

    folder = evaluated("--dataset", "folder", "--data-dir", written["folder"]["data_dir"])
    hfds = evaluated("--dataset", written["hfds"]["name"], "--input-key", "image", "--target-key", "label",
                     "--train-split", "train", "--val-split", "validation")
    wds = evaluated("--dataset", written["wds"]["name"], "--val-split", written["wds"]["val_split"],
                    "--train-num-samples", str(sources.COUNT))
    assert folder["count"] == hfds["count"] == wds["count"] == sources.COUNT
    for other in (hfds, wds):
        assert other["loss"] == pytest.approx(folder["loss"], rel=1e-5)
        assert other["accuracy"] == folder["accuracy"]


def test_a_streamed_run_resumes_only_on_as_many_hosts(written, tmp_path):
    """wds/ shards are split across hosts by shard, so where a resume would read from depends on
    the host count: the run records it, and a resume on another count is refused in one line."""
    from densenet_jax.errors import WorkdirError
    from densenet_jax.model.registry import get_config
    from densenet_jax.train.config import TrainConfig
    from densenet_jax.train.workdir import check, describe, write

    source = written["wds"]
    config = TrainConfig(dataset=source["name"], val_split=source["val_split"],
                         train_num_samples=sources.COUNT, workdir=str(tmp_path))
    data = load_dataset(source["name"], image_size=AUGMENT_SIZE, val_split=source["val_split"],
                        train_num_samples=sources.COUNT)
    here = describe(config, get_config("densenet_40_k12", num_classes=sources.COUNT), data)
    assert here["identity"]["hosts"] == 1
    there = {**here, "identity": {**here["identity"], "hosts": 2}}
    write(tmp_path, there)
    with pytest.raises(WorkdirError, match=r"hosts \(wds/ shards are split by host\) 2 there, 1 here"):
        check(tmp_path, here, has_checkpoints=True)

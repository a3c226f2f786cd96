"""Multi-label data (docs/xray.md): CSV sources, AUROC/AUPRC against scikit-learn, the best epoch
chosen on the mean AUROC, predict and evaluate for multi-label weights, grey images at 224 and 512."""

import json
import re

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import densenet_jax as dj
from densenet_jax import cli
from densenet_jax.data.csv_source import CsvSpec, held_out_rows, read_table, split_tables
from densenet_jax.train import TrainConfig
from densenet_jax.train.loop import Run
from densenet_jax.train.losses import auto_pos_weight
from densenet_jax.train.ranking import auroc, average_precision, mean_defined, per_label
from densenet_jax.train.report import is_best
from densenet_jax.weights.format import stored_class_names, stored_multi_label, stored_pretrained_cfg
from fixtures import SHAPES, draw_shapes, write_shapes_csv


def test_auroc_and_average_precision_equal_sklearns_ties_included():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(2, 80))
        scores = np.round(rng.random(n), int(rng.integers(0, 3)))  # 0 decimals: nearly all tied
        targets = rng.integers(0, 2, n)
        if targets.min() == targets.max():
            continue
        assert auroc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12), trial
        assert average_precision(scores, targets) == pytest.approx(
            average_precision_score(targets, scores), abs=1e-12), trial


def test_a_label_with_one_class_is_undefined_not_one_half():
    scores = np.array([[0.9, 0.2], [0.1, 0.8], [0.4, 0.3], [0.7, 0.6]])
    targets = np.array([[1, 0], [0, 0], [np.nan, 0], [1, np.nan]])  # label b: negatives only
    rocs = per_label(auroc, scores, targets, ["a", "b"])
    assert rocs == {"a": 1.0, "b": None}
    assert per_label(average_precision, scores, targets, ["a", "b"])["b"] is None
    assert mean_defined(rocs) == 1.0 and mean_defined({"b": None}) is None


def test_auto_pos_weight_is_negatives_over_positives_per_label():
    targets = np.array([[1, 0, 1], [0, 0, 1], [0, np.nan, 1], [0, 1, np.nan]], np.float32)
    assert auto_pos_weight(targets, ["a", "b", "c"]) == (3.0, 2.0, 1.0)  # c: no negatives -> 1


def test_best_epoch_is_chosen_on_mean_auroc_not_accuracy():
    rows = [{"eval_acc": 0.2, "eval_auroc": 0.9}, {"eval_acc": 0.6, "eval_auroc": 0.8}]
    assert not is_best(rows)
    assert is_best(rows[:1] + [{"eval_acc": 0.1, "eval_auroc": 0.95}])
    assert not is_best(rows[:1] + [{"eval_acc": 0.9, "eval_auroc": None}])  # undefined ranks last


def _csv(root, text, images=("a.png", "b.png", "c.png", "d.png")):
    for name in images:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(root / name)
    (root / "labels.csv").write_text(text)
    return root


CHEXPERT_LIKE = ("Image,Patient,Effusion,Nodule\n"
                 "a.png,p1,1,-1\n"
                 "b.png,p1,0.0,\n"
                 "c.png,p2,NaN,-1.0\n"
                 "d.png,p3,1.0,0\n")


@pytest.mark.parametrize("policy, nodule", [("ignore", [np.nan, np.nan, np.nan, 0]),
                                            ("zeros", [0, np.nan, 0, 0]), ("ones", [1, np.nan, 1, 0])])
def test_csv_labels_missing_and_uncertain_policies(tmp_path, policy, nodule):
    root = _csv(tmp_path, CHEXPERT_LIKE)
    table = read_table(root, "labels.csv", CsvSpec(patient_column="Patient", uncertain=policy))
    assert table.multi_label and table.names == ["Effusion", "Nodule"]  # Patient is no label
    assert table.paths == [str(root / n) for n in ("a.png", "b.png", "c.png", "d.png")]
    np.testing.assert_array_equal(table.labels[:, 0], [1, 0, np.nan, 1])
    np.testing.assert_array_equal(table.labels[:, 1], nodule)
    assert table.labels.dtype == np.float32 and table.patients == ["p1", "p1", "p2", "p3"]


def test_csv_path_column_and_single_label_class_names(tmp_path):
    root = _csv(tmp_path, "finding,file\nnodule,a.png\nnormal,b.png\neffusion,c.png\nnormal,d.png\n")
    table = read_table(root, "labels.csv", CsvSpec(path_column="file"))
    assert not table.multi_label and table.names == ["effusion", "nodule", "normal"]
    np.testing.assert_array_equal(table.labels, [1, 2, 0, 2])
    assert table.labels.dtype == np.int32
    (tmp_path / "labels.csv").write_text("file,grade\na.png,10\nb.png,2\nc.png,1\nd.png,2\n")
    assert read_table(tmp_path, "labels.csv", CsvSpec()).names == ["1", "2", "10"]  # integers: as numbers


def test_val_fraction_holds_out_whole_patients_the_same_way_each_time(tmp_path):
    names = [f"{i}.png" for i in range(40)]
    rows = "".join(f"{n},p{i // 4},{i % 2}\n" for i, n in enumerate(names))  # 10 patients of 4 images
    root = _csv(tmp_path, "Path,Patient,Finding\n" + rows, names)
    spec = CsvSpec(train_csv="labels.csv", patient_column="Patient", val_fraction=0.3)
    train, val = split_tables(root, spec)
    assert len(val.paths) == 12 and len(train.paths) == 28  # 3 of 10 patients
    assert not set(train.patients) & set(val.patients)
    assert split_tables(root, spec)[1].paths == val.paths  # evaluate draws the same rows again
    table = read_table(root, "labels.csv", CsvSpec(patient_column="Patient"))
    assert held_out_rows(table, 0.5).sum() == 20


@pytest.mark.parametrize("row, options, expected", [
    ("c.png,p2,yes,0", [], "labels.csv, row 3 (line 4): column 'Effusion': 'yes' is no label value"),
    ("c.png,p2,2,0", [], "labels.csv, row 3 (line 4): column 'Effusion': '2' is no label value"),
    ("missing.png,p2,1,0", [], "labels.csv, row 3 (line 4): "),
    ("c.png,p2,1", [], "labels.csv, row 3 (line 4): 3 fields, the header has 4"),
    ("c.png,p2,1,0", ["--label-columns", "Effusion", "Edema"], "labels.csv: no column 'Edema' (--label-columns)"),
    ("c.png,p2,1,0", ["--patient-column", "Subject"], "labels.csv: no column 'Subject' (--patient-column)"),
])
def test_a_bad_row_is_named_in_one_line(tmp_path, capsys, row, options, expected):
    lines = CHEXPERT_LIKE.splitlines()
    root = _csv(tmp_path, "\n".join(lines[:3] + [row] + lines[4:]) + "\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--dataset", "csv", "--data-dir", str(root), "--train-csv", "labels.csv",
                  "--val-fraction", "0.3", "--patient-column", "Patient", "--workdir", str(tmp_path / "run"),
                  "--no-progress", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and expected in err[0], err
    if "missing" in row:
        assert "missing.png: no such image file" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, tiny_weights):
    """A tiny DenseNet trained on grey shapes (SHAPES decide the labels, 15% of labels missing),
    16 px, from the session's tiny weights (conv0 adapted to one channel, a new 3-label head)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_csv(root, rows=160, size=16, seed=0, name="train.csv")
    write_shapes_csv(root, rows=64, size=16, seed=1, name="val.csv")
    config = TrainConfig(init_from=str(tiny_weights), dataset="csv", data_dir=str(root), train_csv="train.csv",
                         val_csv="val.csv", patient_column="Patient", in_chans=1, image_size=16, epochs=4,
                         batch_size=32, lr=0.2, schedule="constant", pos_weight="auto", progress=False,
                         workdir=str(root / "run"))
    return root, Run(config).fit()


def test_multilabel_training_reaches_a_mean_auroc_of_090_on_drawn_shapes(shapes_run):
    root, result = shapes_run
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and max(r["eval_auroc"] for r in rows) >= 0.9
    for row in rows:  # eval_auroc is the mean of the labels'
        assert row["eval_auroc"] == pytest.approx(np.mean(list(row["eval_auroc_labels"].values())))
        assert list(row["eval_auroc_labels"]) == list(SHAPES)
    best = root / "run" / "best.safetensors"
    assert stored_class_names(best) == list(SHAPES) and stored_multi_label(best)
    assert dj.load(best).multi_label and dj.load(best).class_names == list(SHAPES)


def test_predict_and_evaluate_multilabel_weights_agree_with_sklearn(shapes_run, capsys):
    """evaluate --json's AUROC per label is sklearn's on predict --json's probabilities for the same
    images against the CSV's known labels; the best weights are the best epoch's (metrics.jsonl)."""
    root, _ = shapes_run
    best = str(root / "run" / "best.safetensors")
    lines = (root / "val.csv").read_text().splitlines()[1:]
    files = [str(root / line.split(",")[0]) for line in lines]
    cli.main(["predict", "--weights", best, "--json", "--no-progress", *files])
    predicted = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in predicted] == files and list(predicted[0]["probabilities"]) == list(SHAPES)
    cli.main(["evaluate", "--weights", best, "--dataset", "csv", "--data-dir", str(root), "--val-csv", "val.csv",
              "--json"])
    evaluation = json.loads(capsys.readouterr().out)
    for j, label in enumerate(SHAPES):
        cells = [line.split(",")[2 + j] for line in lines]
        known = [i for i, c in enumerate(cells) if c]
        truth = [int(cells[i]) for i in known]
        scores = [predicted[i]["probabilities"][label] for i in known]
        assert evaluation["auroc"][label] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6), label
        assert evaluation["auprc"][label] == pytest.approx(average_precision_score(truth, scores), abs=1e-6)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert evaluation["mean_auroc"] == pytest.approx(max(r["eval_auroc"] for r in rows), abs=1e-6)
    cli.main(["predict", "--weights", best, "--threshold", "0.5", files[0]])
    shown = capsys.readouterr().out.splitlines()[1:]
    assert {line.split()[-1] for line in shown} == {k for k, p in predicted[0]["probabilities"].items() if p >= 0.5}


def test_grey_images_train_and_predict_at_512(tmp_path, capsys):
    """One channel end to end: a CSV of grey images trains (imagenet stem, tiny) and predict gives
    the sigmoid of the model on the image read as one channel, normalised as the weights record.
    (224: test_xray_pretrained.py, from a pretrained tag.)"""
    size = 512
    rng = np.random.default_rng(size)
    (tmp_path / "images").mkdir()
    lines = ["Path," + ",".join(SHAPES)]
    for i in range(3):
        present = rng.random(3) < 0.5
        Image.fromarray(draw_shapes(present, size, rng)).save(tmp_path / f"images/{i}.png")
        lines.append(f"images/{i}.png," + ",".join(str(int(v)) for v in present))
    (tmp_path / "train.csv").write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(lines[:1] + lines[3:]) + "\n")
    start = tmp_path / "start.safetensors"
    dj.save(dj.create_model("densenet121", growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                            num_classes=3, in_chans=1, rngs=nnx.Rngs(0)), start)
    Run(TrainConfig(init_from=str(start), dataset="csv", data_dir=str(tmp_path), train_csv="train.csv",
                    val_csv="val.csv", in_chans=1, image_size=size, epochs=1, batch_size=2, lr=0.01,
                    progress=False, workdir=str(tmp_path / "run"))).fit()
    weights = tmp_path / "run" / "model.safetensors"
    cfg = stored_pretrained_cfg(weights)
    assert cfg.input_size == (1, size, size) and stored_multi_label(weights)
    cli.main(["predict", "--weights", str(weights), "--json", str(tmp_path / "images/2.png")])
    probabilities = json.loads(capsys.readouterr().out)[0]["probabilities"]
    model = dj.load(weights)
    model.eval()
    grey = np.asarray(Image.open(tmp_path / "images/2.png").convert("L"), np.float32) / 255
    x = ((grey - cfg.mean[0]) / cfg.std[0])[None, :, :, None]
    expected = 1 / (1 + np.exp(-np.asarray(model(x), np.float64)[0]))
    np.testing.assert_allclose([probabilities[k] for k in SHAPES], expected, atol=1e-5)


@pytest.mark.parametrize("options, expected", [
    (dict(dataset="csv", data_dir="x", val_csv="v.csv"), "--dataset csv needs --train-csv FILE"),
    (dict(dataset="csv", data_dir="x", train_csv="t.csv"), "--dataset csv needs --val-csv FILE, or --val-fraction"),
    (dict(dataset="csv", data_dir="x", train_csv="t.csv", val_csv="v.csv", val_fraction=0.2),
     "--val-fraction splits the training CSV; leave it out with --val-csv"),
    (dict(dataset="csv", data_dir="x", train_csv="t.csv", val_fraction=1.0), "--val-fraction 1.0: must be between 0 and 1"),
    (dict(dataset="csv", data_dir="x", train_csv="t.csv", val_fraction=0.2, uncertain="maybe"),
     "--uncertain 'maybe': must be one of ignore, zeros, ones"),
    (dict(train_csv="t.csv"), "--train-csv is read by --dataset csv, not digits"),
    (dict(pos_weight="2,-1"), "--pos-weight '2,-1': 'auto' or positive numbers separated by commas"),
])
def test_csv_and_pos_weight_options_are_refused_at_construction(options, expected):
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        TrainConfig(**options)

"""Every option of ``densenet-jax`` is run by a test that checks what it does.

OPTION_TESTS maps each subcommand's options to the tests that run them and check their effect.
``test_every_option_has_a_test`` walks the parser and fails for an option without an entry (or an
entry for an option that is gone); ``test_option_tests_exist_and_pass_the_option`` fails when a
named test does not exist or never passes that option string. Adding an option: add a test that
runs it and checks its effect, then its line here.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision.transforms as TT
from flax import nnx
from PIL import Image

import densenet_jax as dj
from densenet_jax import DataError, cli
from densenet_jax.cli.train import train_config
from densenet_jax.data import load_dataset
from densenet_jax.train import parallel
from densenet_jax.train.loop import Run
from densenet_jax.train.optimizers import set_learning_rate
from densenet_jax.weights.format import read_safetensors, state_arrays, write_safetensors
from fixtures import write_cifar10, write_cifar100, write_image_folder

HERE = Path(__file__).resolve().parent

_RUN = "test_cli.py::test_train_options_build_the_run"
_PARITY = "test_train_parity.py::test_trainer_matches_torch_sgd_in_float64"
_EVALUATE = "test_cli.py::test_evaluate_options"
_PREDICT = "test_cli.py::test_predict_options"
_HUB_PREDICT = "test_hub.py::test_predict_model_tag_gives_timms_probabilities"
_EXPORT_ONNX = "test_export.py::test_onnx_densenet121_nchw_from_the_cli"
_EXPLAIN = "test_explain.py::test_explain_writes_the_overlay_and_the_map"
_EXPLAIN_XRV = "test_xrv.py::test_explain_xrv_weights_by_pathology_name"
_SOURCES = "test_sources.py::test_train_options_name_columns_splits_and_sample_count"
_AUGMENT = "test_augment.py::test_augment_flags_build_the_transform_mixer_and_loss"
_TIMM = "test_train_options.py::test_timm_options_set_their_fields"
_CSV = "test_train_options.py::test_csv_options_set_the_spec"
OPTION_TESTS: dict[str, dict[str, list[str]]] = {
    "train": {
        "--model": [_RUN],
        "--dataset": [_RUN],
        "--data-dir": [_RUN],
        "--workers": [_PARITY, "test_folder.py::test_train_cli_with_workers"],
        "--strict": [_RUN, "test_folder.py::test_strict_stops_in_one_line_when_the_image_is_read"],
        "--image-size": [_RUN],
        "--input-key": [_SOURCES],
        "--target-key": [_SOURCES],
        "--train-split": [_SOURCES],
        "--val-split": [_SOURCES, "test_sources.py::test_bad_shards_samples_and_columns_are_named_in_one_line"],
        "--train-num-samples": [_SOURCES],
        "--no-progress": [_PARITY],
        "--epochs": [_RUN, _PARITY],
        "--batch-size": [_RUN, _PARITY],
        "--lr": [_PARITY],
        "--schedule": [_PARITY],
        "--warmup-epochs": [_PARITY],
        "--momentum": [_PARITY],
        "--weight-decay": [_PARITY],
        "--workdir": [_RUN, _PARITY],
        "--init-from": [_RUN, _PARITY],
        "--head-only": [_RUN, _PARITY],
        "--precision": [_RUN, _PARITY, "test_train_parallel.py::test_eight_devices_match_one"],
        "--parallel": [_RUN, "test_train_parallel.py::test_eight_devices_match_one"],
        "--seed": [_RUN],
        "--drop-rate": [_RUN],
        "--memory-efficient": [_RUN],
        "--checkpoint-every": [_PARITY, "test_resume.py::test_stopped_run_resumes_exactly"],
        "--keep": [_PARITY],
        "--max-steps": ["test_resume.py::test_stopped_run_resumes_exactly"],
        "--coordinator": ["test_train_parallel.py::test_two_processes_match_one"],
        "--num-processes": ["test_train_parallel.py::test_two_processes_match_one"],
        "--process-id": ["test_train_parallel.py::test_two_processes_match_one"],
        "--distributed-timeout": [
            "test_train_messages.py::test_batch_not_divisible_by_the_devices_and_a_process_left_alone"],
        "--pretrained": ["test_hub.py::test_train_pretrained_fine_tunes_with_a_new_head_on_grey_images"],
        "--in-chans": ["test_hub.py::test_train_pretrained_fine_tunes_with_a_new_head_on_grey_images"],
        "--opt": [_TIMM],
        "--opt-eps": [_TIMM],
        "--opt-betas": [_TIMM],
        "--filter-bias-and-bn": [_TIMM],
        "--clip-grad": [_TIMM],
        "--clip-mode": [_TIMM],
        "--grad-accum-steps": [_TIMM],
        "--layer-decay": [_TIMM],
        "--sched": [_TIMM],
        "--decay-epochs": [_TIMM],
        "--decay-milestones": [_TIMM],
        "--decay-rate": [_TIMM],
        "--warmup-lr": [_TIMM],
        "--min-lr": [_TIMM],
        "--cooldown-epochs": [_TIMM],
        "--patience-epochs": [_TIMM],
        "--lr-base": [_TIMM],
        "--lr-base-size": [_TIMM],
        "--lr-base-scale": [_TIMM],
        "--model-ema": [_TIMM],
        "--model-ema-decay": [_TIMM],
        "--model-ema-warmup": [_TIMM],
        "--best-from": [_TIMM],
        "--recipe": ["test_train_options.py::test_a_recipe_fills_what_the_command_left_out"],
        "--train-csv": [_CSV],
        "--val-csv": [_CSV],
        "--path-column": [_CSV],
        "--label-columns": [_CSV],
        "--patient-column": [_CSV],
        "--uncertain": [_CSV],
        "--val-fraction": [_CSV],
        "--pos-weight": [_CSV],
        "--aa": [_AUGMENT],
        "--color-jitter": [_AUGMENT],
        "--reprob": [_AUGMENT],
        "--remode": [_AUGMENT],
        "--recount": [_AUGMENT],
        "--scale": [_AUGMENT],
        "--ratio": [_AUGMENT],
        "--hflip": [_AUGMENT],
        "--vflip": [_AUGMENT],
        "--train-interpolation": [_AUGMENT],
        "--mixup": [_AUGMENT],
        "--cutmix": [_AUGMENT],
        "--cutmix-minmax": [_AUGMENT],
        "--mixup-prob": [_AUGMENT],
        "--mixup-switch-prob": [_AUGMENT],
        "--mixup-mode": [_AUGMENT],
        "--smoothing": [_AUGMENT],
        "--bce-loss": [_AUGMENT],
    },
    "evaluate": {
        "--input-key": ["test_sources.py::test_evaluate_reads_each_source_as_the_folder"],
        "--target-key": ["test_sources.py::test_evaluate_reads_each_source_as_the_folder"],
        "--train-split": ["test_sources.py::test_evaluate_reads_each_source_as_the_folder"],
        "--val-split": ["test_sources.py::test_evaluate_reads_each_source_as_the_folder"],
        "--train-num-samples": ["test_sources.py::test_evaluate_reads_each_source_as_the_folder"],
        "--weights": [_EVALUATE, "test_train.py::test_fine_tune_from_weights_with_a_new_head"],
        "--dataset": [_EVALUATE],
        "--data-dir": [_EVALUATE],
        "--workers": [_EVALUATE],
        "--strict": [_EVALUATE],
        "--image-size": [_EVALUATE],
        "--batch-size": [_EVALUATE],
        "--precision": [_EVALUATE],
        "--json": ["test_xray.py::test_predict_and_evaluate_multilabel_weights_agree_with_sklearn"],
        "--train-csv": ["test_train_options.py::test_evaluate_takes_the_same_csv_options"],
        "--val-csv": ["test_train_options.py::test_evaluate_takes_the_same_csv_options"],
        "--path-column": ["test_train_options.py::test_evaluate_takes_the_same_csv_options"],
        "--label-columns": ["test_train_options.py::test_evaluate_takes_the_same_csv_options"],
        "--patient-column": ["test_train_options.py::test_evaluate_takes_the_same_csv_options"],
        "--uncertain": ["test_train_options.py::test_evaluate_takes_the_same_csv_options"],
        "--val-fraction": ["test_train_options.py::test_evaluate_takes_the_same_csv_options"],
    },
    "predict": {
        "--threshold": ["test_xray.py::test_predict_and_evaluate_multilabel_weights_agree_with_sklearn"],
        "--weights": [_PREDICT, "test_predict.py::test_predict_gives_torchvision_top5"],
        "--labels": [_PREDICT, "test_predict.py::test_predict_text_output_and_errors"],
        "--top": [_PREDICT, "test_predict.py::test_predict_text_output_and_errors"],
        "--batch-size": [_PREDICT],
        "--resize": [_PREDICT],
        "--crop": [_PREDICT],
        "--json": [_PREDICT, "test_predict.py::test_predict_gives_torchvision_top5"],
        "--strict": [_PREDICT],
        "--no-progress": [_PREDICT],
        "--model": [_HUB_PREDICT, "test_hub.py::test_offline_without_a_cached_copy_says_what_to_fetch"],
        "--preprocess": [_HUB_PREDICT],
        "--test-size": [_HUB_PREDICT],
        "--in-chans": [_HUB_PREDICT],
    },
    "explain": {
        "--weights": [_EXPLAIN, _EXPLAIN_XRV],
        "--label": [_EXPLAIN_XRV, "test_xrv.py::test_unknown_label_is_one_line"],
        "--out": [_EXPLAIN, _EXPLAIN_XRV],
        "--json": [_EXPLAIN, _EXPLAIN_XRV],
        "--preprocess": [_EXPLAIN],
        "--force": [_EXPLAIN],
    },
    "models": {
        "--pretrained": ["test_hub.py::test_models_command_lists_names_params_tags_and_top1"],
    },
    "convert": {
        "--to": ["test_torch_files.py::test_a_checkpoint_without_classifier_converts_as_a_backbone",
                 "test_torch_files.py::test_conversions_give_the_same_bytes_every_time"],
        "--prefix": ["test_torch_files.py::test_prefix_picks_the_ema_copy_and_safetensors_need_no_container"],
        "--preprocess": ["test_xrv.py::test_convert_preprocess_xrv_records_the_pipeline_alone"],
        "--xrv-weights": ["test_xrv.py::test_bad_xrv_conversions_are_one_line"],
        "--force": ["test_bad_input.py::test_outputs_are_never_clobbered_or_half_written"],
    },
    "export": {
        "--opset": ["test_export.py::test_bad_input_is_one_line_exit_1_and_no_output"],
        "--platforms": ["test_export.py::test_force_replaces_an_existing_output", "test_export.py::test_the_default_image_size_is_the_weights_own"],
        "--weights": [_EXPORT_ONNX, "test_export.py::test_stablehlo_runs_without_densenet_jax_bit_for_bit"],
        "--format": [_EXPORT_ONNX, "test_export.py::test_timm_loads_the_folder_as_pretrained"],
        "--image-size": [_EXPORT_ONNX, "test_export.py::test_bad_input_is_one_line_exit_1_and_no_output"],
        "--layout": [_EXPORT_ONNX],
        "--force": ["test_export.py::test_force_replaces_an_existing_output"],
    },
}


def subcommand_options() -> dict[str, set[str]]:
    """Each subcommand's options, by their long name, from the parser itself."""
    subparsers = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {max(a.option_strings, key=len) for a in sub._actions
                   if a.option_strings and not isinstance(a, argparse._HelpAction)}
            for name, sub in subparsers.choices.items()}


def test_every_option_has_a_test():
    options = subcommand_options()
    assert options.keys() == OPTION_TESTS.keys()
    for command, found in options.items():
        listed = set(OPTION_TESTS[command])
        assert not found - listed, f"{command}: options no test runs: {sorted(found - listed)}"
        assert not listed - found, f"{command}: listed options the parser lacks: {sorted(listed - found)}"


class _Module:
    """A test file's module-level functions, assignments and ``from x import y`` names."""

    def __init__(self, name: str):
        self.definitions, self.imports = {}, {}
        for node in ast.parse((HERE / f"{name}.py").read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                self.definitions[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        self.definitions[target.id] = node
            elif isinstance(node, ast.ImportFrom) and (HERE / f"{node.module}.py").is_file():
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (node.module, alias.name)


@functools.lru_cache(maxsize=None)
def _module(name: str) -> _Module:
    return _Module(name)


def _strings(module_name: str, name: str, seen: set) -> set[str]:
    """The string constants of a definition and of the test-folder definitions it names, followed
    through helper functions, constants and imports from other test modules (such as train_cli)."""
    if (module_name, name) in seen:
        return set()
    seen.add((module_name, name))
    module = _module(module_name)
    if name in module.imports:
        return _strings(*module.imports[name], seen)
    node = module.definitions.get(name)
    if node is None:
        return set()
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            found.add(child.value)
        elif isinstance(child, ast.Name) and child.id != name:
            found |= _strings(module_name, child.id, seen)
    return found


@functools.lru_cache(maxsize=None)
def passed_strings(test: str) -> frozenset[str]:
    """The strings that ``file.py::test_name`` (and what it calls or reads in tests/) can pass."""
    file, name = test.split("::")
    assert (HERE / file).is_file() and name in _module(file.removesuffix(".py")).definitions, test
    return frozenset(_strings(file.removesuffix(".py"), name, set()))


@pytest.mark.parametrize("command", OPTION_TESTS)
def test_option_tests_exist_and_pass_the_option(command):
    for option, tests in OPTION_TESTS[command].items():
        for test in tests:
            strings = passed_strings(test)
            assert any(option == s or s.startswith(option + "=") for s in strings), \
                f"{test} never passes {option} ({command})"


def parse_train(*argv) -> Run:
    return Run(train_config(cli.parser().parse_args(["train", *map(str, argv)])))


def test_train_options_build_the_run(tmp_path):
    """Options of ``train`` reach the run they build: model, data, steps, precision, runner, seed."""
    root = write_image_folder(tmp_path / "images")
    broken = root / "train" / "dog" / "0.jpg"
    broken.write_bytes(b"not an image")
    strict = parse_train("--dataset", "folder", "--data-dir", root, "--strict", "--batch-size", 4,
                         "--workdir", tmp_path / "strict")
    with pytest.raises(DataError, match="dog/0.jpg: unreadable image"):  # found when read
        strict.data.train[4]
    run = parse_train("--model", "densenet_bc_100_k12", "--dataset", "folder", "--data-dir", root,
                      "--image-size", 40, "--drop-rate", 0.1, "--memory-efficient", "--seed", 7,
                      "--epochs", 4, "--batch-size", 4, "--parallel", "pmap", "--precision", "bf16",
                      "--workdir", tmp_path / "run")
    expected = dj.create_model("densenet_bc_100_k12", num_classes=3, drop_rate=0.1,
                               memory_efficient=True, rngs=nnx.Rngs(7))
    assert run.model.config == expected.config
    ours, seeded = state_arrays(run.model), state_arrays(expected)
    assert all(np.array_equal(ours[k], seeded[k]) for k in seeded)  # --seed 7 made the weights
    assert len(run.data.train) == 12 and run.total_steps == 4 * (12 // 4)  # the broken one is replaced when read
    image = run.data.augment(run.data.train[0], np.random.default_rng(0))["image"]
    assert image.shape == (40, 40, 3)
    assert isinstance(run.runner, parallel.Pmap) and run.runner.steps.compute_dtype == jnp.bfloat16
    assert run.workdir == tmp_path / "run"

    # --init-from with another class count: the file's backbone, a new head of the data's classes.
    start = dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), rngs=nnx.Rngs(1))
    dj.save(start, tmp_path / "start.safetensors")
    run = parse_train("--dataset", "cifar100", "--data-dir", write_cifar100(tmp_path / "c100"),
                      "--init-from", tmp_path / "start.safetensors", "--head-only", "--batch-size", 8)
    assert run.data.num_classes == 100 and run.model.config.num_classes == 100
    assert run.model.config.block_config == (2, 2, 2)
    loaded, saved = state_arrays(run.model), read_safetensors(tmp_path / "start.safetensors")[0]
    assert all(np.array_equal(loaded[k], saved[k]) for k in saved if not k.startswith("classifier"))
    initial = run.runner.steps.initial
    ones = jax.tree.map(jnp.ones_like, initial.params)
    opt_state = set_learning_rate(initial.opt_state, 1.0)  # each step sets it; 0 before the first
    updates, _ = run.runner.steps.tx.update(ones, opt_state, initial.params)
    moving = {".".join(str(k.key) for k in path) for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]
              if np.any(np.asarray(leaf) != 0)}
    assert moving == {"classifier.kernel", "classifier.bias"}  # --head-only: only the head moves


def evaluate(capsys, *argv, expect: int = 0) -> tuple[float, float, str]:
    """``densenet-jax evaluate``: (loss, accuracy, the line) or, for ``expect`` 1, the error line."""
    if expect:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["evaluate", *map(str, argv)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == expect and len(err) == 1
        return 0.0, 0.0, err[0]
    cli.main(["evaluate", *map(str, argv)])
    line = capsys.readouterr().out.strip()
    loss, accuracy = line.rsplit("loss ", 1)[1].split(", accuracy ")
    return float(loss), float(accuracy), line


def direct(model, data) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over ``data``'s held-out split, in one batch."""
    # An unreadable image's stand-in counts for nothing in evaluation (weight 0).
    examples = [data.preprocess(e) for e in (data.eval[i] for i in range(len(data.eval))) if not e.get("skipped")]
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    model.eval()
    logits = np.asarray(model(jnp.asarray(images)), np.float64)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return float(loss), float(np.mean(logits.argmax(-1) == labels))


def test_evaluate_options(tmp_path, capsys):
    """``evaluate`` gives what the model gives on the held-out split, whatever the batch and the
    workers; bf16 a little different; folder data at --image-size; --strict stops at a bad image."""
    weights = tmp_path / "w.safetensors"
    dj.save(dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), growth_rate=6,
                            rngs=nnx.Rngs(2)), weights)
    cifar = write_cifar10(tmp_path / "c10")
    reference = direct(dj.load(weights), load_dataset("cifar10", cifar))
    loss, accuracy, line = evaluate(capsys, "--weights", weights, "--dataset", "cifar10",
                                    "--data-dir", cifar, "--batch-size", 7, "--workers", 1)
    assert "held-out, 20 images" in line
    assert loss == pytest.approx(reference[0], abs=5e-5) and accuracy == pytest.approx(reference[1], abs=5e-5)
    bf16_loss, _, _ = evaluate(capsys, "--weights", weights, "--dataset", "cifar10", "--data-dir", cifar,
                               "--precision", "bf16")
    assert bf16_loss != loss and bf16_loss == pytest.approx(loss, rel=2e-2)

    folder = write_image_folder(tmp_path / "images")
    three = tmp_path / "three.safetensors"
    dj.save(dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), growth_rate=6, num_classes=3,
                            rngs=nnx.Rngs(2)), three)
    (folder / "val" / "cat" / "0.png").write_bytes(b"not an image")
    _, _, error = evaluate(capsys, "--weights", three, "--dataset", "folder", "--data-dir", folder,
                           "--strict", expect=1)
    assert "val/cat/0.png: unreadable image" in error
    reference = direct(dj.load(three), load_dataset("folder", folder, image_size=36))
    loss, accuracy, line = evaluate(capsys, "--weights", three, "--dataset", "folder", "--data-dir", folder,
                                    "--image-size", 36)
    assert "held-out, 11 images, 1 unreadable skipped" in line  # the stand-in is weighed 0
    assert loss == pytest.approx(reference[0], abs=5e-5) and accuracy == pytest.approx(reference[1], abs=5e-5)


def test_predict_options(tmp_path, capsys):
    """``predict``: --resize and --crop are torchvision's Resize and CenterCrop, --top the count,
    --labels over the names stored in the weights, --strict and --no-progress."""
    model = dj.create_model("densenet_bc_100_k12", block_config=(2, 2, 2), growth_rate=6, num_classes=3,
                            rngs=nnx.Rngs(3))
    weights = tmp_path / "w.safetensors"
    write_safetensors({k: np.asarray(v) for k, v in state_arrays(model).items()}, model.config, weights,
                      class_names=["cat", "dog", "fox"])
    folder = write_image_folder(tmp_path / "images")
    photos = sorted((folder / "train" / "dog").iterdir())[:3]
    cli.main(["predict", "--weights", str(weights), *map(str, photos), "--resize", "40", "--crop", "32",
              "--top", "2", "--batch-size", "2", "--json"])
    results = json.loads(capsys.readouterr().out)
    preprocess = TT.Compose([TT.Resize(40), TT.CenterCrop(32), TT.ToTensor(),
                             TT.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    batch = np.stack([preprocess(Image.open(p).convert("RGB")).numpy().transpose(1, 2, 0) for p in photos])
    model.eval()
    probabilities = np.asarray(torch.softmax(torch.from_numpy(np.asarray(model(jnp.asarray(batch)))), -1))
    for result, p in zip(results, probabilities):
        assert [e["class"] for e in result["top"]] == np.argsort(-p)[:2].tolist()
        assert [e["name"] for e in result["top"]] == [["cat", "dog", "fox"][i] for i in np.argsort(-p)[:2]]
        assert all(abs(e["probability"] - p[e["class"]]) <= 1e-5 for e in result["top"])

    labels = tmp_path / "labels.txt"
    labels.write_text("kitten\npuppy\ncub\n")
    two = [str(p) for p in photos[:2]]  # (one image never shows a bar)
    cli.main(["predict", "--weights", str(weights), *two, "--labels", str(labels), "--no-progress"])
    captured = capsys.readouterr()
    assert any(name in captured.out for name in ("kitten", "puppy", "cub")) and "cat (" not in captured.out
    assert "%|" not in captured.err
    cli.main(["predict", "--weights", str(weights), *two])
    assert "%|" in capsys.readouterr().err  # the bar that --no-progress turns off

    photos[1].write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--weights", str(weights), *map(str, photos), "--strict", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "dog/1.jpg: unreadable image" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nope"], "densenet-jax train: error: argument --model: unknown model 'nope'"),
    (["train", "--epochs", "1e9"], "densenet-jax train: error: argument --epochs: invalid int value"),
    (["models", "--nope"], "densenet-jax: error: unrecognized arguments: --nope"),
    (["convert"], "densenet-jax convert: error: the following arguments are required"),
])
def test_what_the_command_line_refuses_is_one_line(argv, message, capsys):
    """argparse's refusals are one line naming the option, exit status 2, not the usage block."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(message), err

"""Today's options in whole runs of the script: every option trains on TensorFlow, JAX and PyTorch and its saved
model evaluates (in a plain-Keras loader) to the history's last figure; a run killed with SIGKILL and resumed with
every option on gives the uninterrupted run's history; --init-seed and --data-seed each own their part."""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from resnet_cifar import cifar_data, training
import common
import train_resnet32
from conftest import NO_TENSORFLOW, ROOT, parse, run_script
from test_recipe_behaviour import KILL_IN_SECOND_STATE_WRITE
from test_reproduce import session_hparams

# every option: the mixing one either mixup or CutMix (they exclude each other)
WITH_MIXUP = ["--cutout", "16", "--mixup", "1", "--label-smoothing", "0.1", "--lr-schedule", "cosine",
              "--warmup-epochs", "1", "--ema", "0.9", "--tta", "flip", "--init-seed", "3", "--data-seed", "4"]
WITH_CUTMIX = ["--cutout", "8", "--cutmix", "1", "--label-smoothing", "0.1", "--lr-schedule", "0:0.05,2:0.01",
               "--warmup-epochs", "1", "--ema", "0.8", "--tta", "flip", "--data-seed", "2"]
OPTION_SETS = {"mixup": WITH_MIXUP, "cutmix": WITH_CUTMIX}


def tiny(cifar_dir, out, *extra, epochs=2):
    return ["--data-dir", cifar_dir, "--stack-n", "1", "--batch-size", "32", "--epochs", epochs, "--run-name", "r",
            "--log-dir", out / "logs", "--checkpoint-dir", out / "checkpoints", *extra]


def history(out):
    with open(out / "checkpoints" / "r.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_every_option_trains_and_its_saved_model_evaluates_to_the_history(cifar_dir, tmp_path, backend, options):
    flags = OPTION_SETS[options]
    result = run_script("train_resnet32.py", *tiny(cifar_dir, tmp_path, *flags), backend=backend,
                        block_tensorflow=backend != "tensorflow")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = history(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("loss", "test_loss"))
    ema = flags[flags.index("--ema") + 1]
    assert {r["evaluation"] for r in rows} == {f"ema{ema}+tta_flip"}  # the history says how it evaluated
    saved = json.loads((tmp_path / "checkpoints" / "r.json").read_text())
    expected = parse(train_resnet32, flags).saved()
    hparams = session_hparams(tmp_path / "logs" / "r")  # TensorBoard's HParams name the options too
    for key in ("cutout", "mixup", "cutmix", "label_smoothing", "lr_schedule", "lr_decay", "warmup_epochs", "ema",
                "tta", "init_seed", "data_seed"):
        assert saved[key] == expected[key], key
        if expected[key] is not None:
            value = hparams[key]
            assert (value.string_value if isinstance(expected[key], str) else value.number_value) == expected[key], key
    # the final model is the average the last row was evaluated with: --evaluate (plain Keras's loader) agrees
    evaluated = run_script("train_resnet32.py", "--evaluate", tmp_path / "checkpoints" / "r.keras", "--tta", "flip",
                           "--data-dir", cifar_dir, backend=backend, block_tensorflow=backend != "tensorflow")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    accuracy = float(evaluated.stdout.split("test_acc=")[1].split()[0])
    assert accuracy == pytest.approx(float(rows[-1]["test_accuracy"]), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_killed_and_resumed_with_every_option_equals_the_uninterrupted_run(cifar_dir, tmp_path, options):
    """SIGKILL while the state of epoch 2 of 3 is written, then --resume: the history of an uninterrupted run (the
    mixing's draws, the schedule's position and the weights' average are all in the resumed state)."""
    flags = OPTION_SETS[options]
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    args = [*map(str, tiny(cifar_dir, killed_dir, *flags, epochs=3))]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_STATE_WRITE, os.path.join(ROOT, "train_resnet32.py"),
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [int(r["epoch"]) for r in history(killed_dir)] == [0]
    resumed = run_script("train_resnet32.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_script("train_resnet32.py", *tiny(cifar_dir, straight_dir, *flags, epochs=3))
    assert straight.returncode == 0, straight.stderr[-3000:]
    rows, expected = history(killed_dir), history(straight_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key in ("loss", "accuracy", "test_loss", "test_accuracy", "learning_rate"):
        np.testing.assert_allclose([float(r[key]) for r in rows], [float(r[key]) for r in expected], rtol=1e-6,
                                   err_msg=key)


def test_init_seed_owns_the_weights_and_data_seed_the_order():
    """--init-seed fixed, two --data-seeds: the same initial weights, other batches; and the other way round."""
    def weights(*flags):
        config = parse(train_resnet32, ["--stack-n", "1", *flags])
        return config, common.initial_model(config, train_resnet32.build_model, 10).get_weights()

    a, wa = weights("--init-seed", "7", "--data-seed", "1")
    b, wb = weights("--init-seed", "7", "--data-seed", "2")
    c, wc = weights("--init-seed", "8", "--data-seed", "1")
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not all(np.array_equal(x, y) for x, y in zip(wa, wc))
    orders = {config.data_seed: training.epoch_order(config.data_seed, 0, 320, 320) for config in (a, b)}
    assert not np.array_equal(orders[1], orders[2])
    np.testing.assert_array_equal(training.epoch_order(c.data_seed, 0, 320, 320), orders[1])
    # --seed alone sets both, as before these flags existed
    d = parse(train_resnet32, ["--seed", "5"])
    assert (d.init_seed, d.data_seed) == (5, 5)


@pytest.mark.parametrize("flags, words", [
    (["--mixup", "1", "--cutmix", "1"], ["--mixup and --cutmix", "choose one"]),
    (["--lr-schedule", "cosine", "--epochs", "3", "--warmup-epochs", "3"], ["--warmup-epochs 3", "cosine"]),
    (["--cutout", "33"], ["--cutout", "at most 32"]),
    (["--ema", "1"], ["--ema", "below 1"]),
    (["--label-smoothing", "-0.1"], ["--label-smoothing", ">= 0"]),
    (["--tta", "crop"], ["--tta", "invalid choice"]),
    (["--lr-schedule", "cosine:-1"], ["--lr-schedule", "finite number"]),
])
def test_impossible_options_are_one_line_before_anything_starts(tmp_path, flags, words):
    result = run_script("train_resnet32.py", *flags, "--checkpoint-dir", tmp_path / "c", "--log-dir", tmp_path / "l")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("vary, expected", [
    ("init", lambda s: ["--seed", "0", "--init-seed", str(s)]),
    ("data", lambda s: ["--seed", "0", "--data-seed", str(s)]),
    ("both", lambda s: ["--seed", str(s)]),
])
def test_reproduce_varies_one_part_of_the_seed_holding_the_other(tmp_path, vary, expected):
    import shlex
    result = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "experiments/he2015_table6_depth.toml",
                             "--seeds", "0-2", "--vary", vary, "--out", str(tmp_path), "--print"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    rows = len(commands) // 3
    assert rows >= 1 and len(commands) == 3 * rows
    names = set()
    for i, command in enumerate(commands):  # seed by seed, every row each time
        flags = expected(i // rows)
        start = command.index(flags[0])
        assert command[start:start + len(flags)] == flags, command
        names.add(command[command.index("--run-name") + 1])
    assert len(names) == len(commands)  # each (row, seed) its own run

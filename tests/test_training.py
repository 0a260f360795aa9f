"""End to end: real training runs of the CLI on tiny data in the official format, on TensorFlow and JAX."""
import csv
import glob
import json
import os

import numpy as np
import pytest

from resnet_cifar import checkpoints, cifar_data, units
import train_resnet32
import train_resnet_v2
import train_resnet_variants
import train_resnext
from conftest import ROOT, compile_for, final_fields, parse, run_script

from conftest import EPOCHS, TINY_RUN


def read_history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_final_line_and_outputs(trained):
    backend, out, result = trained
    fields = final_fields(result.stdout)
    run = "resnet8_e_cifar10"
    assert fields["run"] == run and fields["epochs"] == str(EPOCHS) and fields["params"] == "78666"
    assert 0 <= float(fields["test_acc"]) <= 1 and len(fields["test_acc"]) == 6
    assert float(fields["train_images_per_s"]) > 0 and float(fields["seconds"]) > 0
    assert os.path.getsize(out / "checkpoints" / f"{run}.h5") > 100_000
    assert os.path.getsize(out / "checkpoints" / f"{run}.keras") > 100_000
    for split in ("train", "test"):
        assert glob.glob(str(out / "logs" / run / split / "events.out.tfevents.*"))
    config = json.loads((out / "checkpoints" / f"{run}.json").read_text())
    assert config["backend"] == backend and config["epochs"] == EPOCHS and config["params"] == 78666
    assert config["lr_schedule"] == "0:0.05,2:0.02" and config["steps_per_epoch"] == 320 // 32
    assert config["precision"] == "float32"  # the default on every device: the papers' numerics
    assert json.loads((out / "logs" / run / "config.json").read_text()) == config


def test_first_lines_say_where_it_trains(trained):
    backend, _, result = trained
    lines = [line for line in result.stdout.splitlines() if line.startswith(("training on:", "no GPU visible"))]
    fields = dict(item.split("=", 1) for item in lines[0].split()[2:] if "=" in item)
    assert fields["backend"] == backend and fields["devices"] == "1" and fields["precision"] == "float32"
    assert fields["xla"] == ("on" if backend == "jax" else "off") and fields["steps_per_execution"].isdigit()
    # this machine has no GPU: the second line says so and how to get one on each backend
    assert lines[1].startswith("no GPU visible: training on the CPU") and 'pip install "jax[cuda12]"' in lines[1]
    assert 'pip install "tensorflow[and-cuda]"' in lines[1] and "PyTorch" in lines[1]
    assert result.stdout.index(lines[0]) < result.stdout.index("Epoch 1/")


def test_quiet_start(trained):
    """Nothing of the framework's start-up reaches the terminal on a machine without a GPU."""
    _, _, result = trained
    for noise in ("cuInit", "absl::InitializeLog", "Could not find cuda drivers", "oneDNN custom operations"):
        assert noise not in result.stdout + result.stderr, noise
    assert result.stderr.strip() == "", result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_steps_per_execution_gives_the_same_history(cifar_dir, tmp_path, backend):
    """Four steps per compiled call (10 steps an epoch: 4 + 4 + 2) train like one: on TensorFlow Keras's
    multi-step loop, on JAX our fused one (speedups.fuse_steps: four steps as one XLA program)."""
    histories = {}
    for spe in (1, 4):
        out = tmp_path / f"spe{spe}"
        result = run_script("train_resnet32.py", "--data-dir", cifar_dir, *TINY_RUN, "--steps-per-execution", spe,
                            "--log-dir", out / "logs", "--checkpoint-dir", out / "checkpoints",
                            backend=backend, block_tensorflow=backend != "tensorflow")
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"steps_per_execution={spe}" in result.stdout
        assert json.loads((out / "checkpoints" / "resnet8_e_cifar10.json").read_text())["steps_per_execution"] == spe
        histories[spe] = read_history(out / "checkpoints" / "resnet8_e_cifar10.csv")
    assert len(histories[1]) == len(histories[4]) == EPOCHS
    # TensorFlow runs the very same step either way. XLA compiles JAX's fused steps as one program whose
    # float rounding differs (weights within 1e-6 after 10 steps, training loss 2e-5 relative after the first
    # epoch); 30 steps at this learning rate amplify it, the test loss most (0.4 % after 3 epochs)
    rtol = 1e-5 if backend == "tensorflow" else 1e-2
    for key in ("loss", "accuracy", "test_loss", "test_accuracy", "learning_rate"):
        np.testing.assert_allclose([float(r[key]) for r in histories[4]], [float(r[key]) for r in histories[1]],
                                   rtol=rtol, err_msg=key)


def test_short_run_lowers_the_training_loss(trained):
    _, out, result = trained
    history = read_history(out / "checkpoints" / "resnet8_e_cifar10.csv")
    assert [int(row["epoch"]) for row in history] == list(range(EPOCHS))
    losses = [float(row["loss"]) for row in history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert [float(row["learning_rate"]) for row in history] == [0.05, 0.05, 0.02]
    assert f"{float(history[-1]['test_accuracy']):.4f}" == final_fields(result.stdout)["test_acc"]
    assert read_history(out / "logs" / "resnet8_e_cifar10" / "history.csv") == history


@pytest.mark.parametrize("extension", [".h5", ".keras"])
def test_evaluate_reproduces_the_final_test_accuracy(trained, cifar_dir, extension):
    backend, out, result = trained
    evaluation = run_script("train_resnet32.py", "--data-dir", cifar_dir, "--stack-n", "1",
                            "--evaluate", out / "checkpoints" / f"resnet8_e_cifar10{extension}", backend=backend,
                            block_tensorflow=backend != "tensorflow")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    trained_fields, evaluated = final_fields(result.stdout), final_fields(evaluation.stdout)
    assert evaluated["test_acc"] == trained_fields["test_acc"]
    assert abs(float(evaluated["test_loss"]) - float(trained_fields["test_loss"])) < 1e-3
    assert evaluated["epochs"] == str(EPOCHS) and evaluated["params"] == "78666"


def tiny_data(cifar_dir, classes=10):
    args = parse(train_resnet32, ["--data-dir", cifar_dir])
    (x, y), (xt, yt), _ = cifar_data.load_data(args)
    return (x[:64], y[:64] % classes), (xt[:32], yt[:32] % classes)


def test_saved_h5_reloads_to_identical_predictions(cifar_dir, tmp_path):
    import keras
    (x, y), (xt, _) = tiny_data(cifar_dir)
    model = train_resnet32.resnet(1)
    compile_for(model, parse(train_resnet32, []), 2)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "model.h5")
    checkpoints.save_model(model, path)
    reloaded = keras.models.load_model(path, compile=False)  # Keras's own classes (test_fast_path.py)
    np.testing.assert_allclose(reloaded.predict(xt, verbose=0), model.predict(xt, verbose=0), rtol=1e-5, atol=1e-6)
    # with the kernels training used (what --evaluate does), the very same numbers
    same_kernels = checkpoints.as_trained(reloaded)
    np.testing.assert_array_equal(same_kernels.predict(xt, verbose=0), model.predict(xt, verbose=0))
    assert [l.name for l in reloaded.layers] == [l.name for l in model.layers]


# One tiny epoch of every unit and small depth of each family (the big networks are only built).
TINY_MODELS = [
    *[(train_resnet_variants, ["--unit", u, "--stack-n", "1"]) for u in units.UNITS],
    (train_resnet_variants, ["--unit", "e", "--stack-n", "1", "--plain"]),
    (train_resnet32, ["--model", "resnet34", "--stack-n", "1"]),
    (train_resnet_v2, ["--version", "1", "--depth", "8"]),
    (train_resnet_v2, ["--version", "2", "--depth", "11"]),
    (train_resnext, ["--cardinality", "2", "--width", "2", "--impl", "grouped"]),
    (train_resnext, ["--cardinality", "2", "--width", "2", "--impl", "split"]),
]


@pytest.mark.parametrize("module, argv", TINY_MODELS, ids=[f"{m.__name__}{''.join(a)}" for m, a in TINY_MODELS])
def test_one_tiny_epoch_without_nan(module, argv, cifar_dir):
    (x, y), (xt, yt) = tiny_data(cifar_dir)
    args = parse(module, argv)
    model = module.build_model(args, 10)
    compile_for(model, args, 2)
    history = model.fit(x, y, batch_size=32, epochs=1, validation_data=(xt, yt), verbose=0).history
    assert all(np.isfinite(history[key][0]) for key in ("loss", "val_loss")), history


NO_TENSORFLOW_AT_EXIT = """
import atexit, runpy, sys
sys.path.insert(0, {root!r})
atexit.register(lambda: print("tensorflow imported:", "tensorflow" in sys.modules))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch"])  # JAX's runs are the same code path (and run TensorFlow-blocked)
def test_no_tensorflow_import_on_other_backends(cifar_dir, tmp_path, backend):
    """With TensorFlow installed (not blocked), a PyTorch run and --evaluate of its .h5 and .keras never
    import it."""
    import subprocess
    import sys
    script = os.path.join(ROOT, "train_resnet32.py")
    env = {**os.environ, "KERAS_BACKEND": backend}
    runs = [[script, "--data-dir", cifar_dir, *TINY_RUN, "--epochs", "1", "--log-dir", tmp_path / "logs",
             "--checkpoint-dir", tmp_path / "checkpoints"],
            *([script, "--data-dir", cifar_dir, "--evaluate", tmp_path / "checkpoints" / f"resnet8_e_cifar10{ext}"]
              for ext in (".keras", ".h5"))]
    for argv in runs:
        result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW_AT_EXIT.format(root=ROOT), *map(str, argv)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "final: " in result.stdout and "tensorflow imported: False" in result.stdout, result.stdout[-2000:]
        assert result.stderr.strip() == "", result.stderr[-2000:]

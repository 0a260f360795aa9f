"""--distribute on two CPU devices (JAX: XLA host devices; TensorFlow: two logical CPUs)."""
import csv
import importlib.util
import json

import pytest

from conftest import EPOCHS, TINY_RUN, assert_refused, final_fields, run_script

pytestmark = pytest.mark.slow  # whole training runs on clusters or sweeps: the full suite only

RUN = "resnet8_e_cifar10"


def losses(folder):
    with open(folder / "checkpoints" / f"{RUN}.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("trained", ["tensorflow", "jax"], indirect=True)  # PyTorch refuses --distribute (below)
def test_two_devices_train_like_one(trained, cifar_dir, tmp_path):
    backend, single, _ = trained
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, *TINY_RUN, "--distribute", "--cpu-devices", 2,
                        "--log-dir", tmp_path / "logs", "--checkpoint-dir", tmp_path / "checkpoints",
                        backend=backend, block_tensorflow=backend != "tensorflow")
    assert result.returncode == 0, result.stderr[-3000:]
    fields = final_fields(result.stdout)
    assert fields["devices"] == "2" and fields["epochs"] == str(EPOCHS)
    assert json.loads((tmp_path / "checkpoints" / f"{RUN}.json").read_text())["devices"] == 2
    two, one = losses(tmp_path), losses(single)
    assert two[-1] < 0.6 * two[0], two  # it learns ...
    # ... like the single-device run: same global batch, synchronized BatchNorm statistics
    assert abs(two[0] - one[0]) < 0.1 * one[0], (two, one)
    assert 0.5 < two[-1] / one[-1] < 2, (two, one)
    assert final_fields(trained[2].stdout)["devices"] == "1"


def test_batch_that_does_not_split_is_refused(cifar_dir, tmp_path):
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, "--stack-n", "1", "--batch-size", "33",
                        "--distribute", "--cpu-devices", "2", "--checkpoint-dir", tmp_path, "--log-dir", tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "--batch-size 33 does not split over 2 devices" in line


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_torch_backend_refuses_distribute(cifar_dir, tmp_path):
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, "--stack-n", "1", "--distribute",
                        "--checkpoint-dir", tmp_path, "--log-dir", tmp_path, backend="torch")
    assert result.returncode == 2
    assert_refused(result, "--distribute is not supported on the PyTorch backend")
    assert not list(tmp_path.iterdir())  # refused before the data is read or anything is written


def test_multi_step_execution_with_tensorflow_distribute_is_refused(cifar_dir, tmp_path):
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, "--stack-n", "1", "--batch-size", "32",
                        "--distribute", "--cpu-devices", "2", "--steps-per-execution", "4",
                        "--checkpoint-dir", tmp_path, "--log-dir", tmp_path, backend="tensorflow")
    assert_refused(result, "--steps-per-execution 4", "MirroredStrategy", "--steps-per-execution 1")
    assert not list(tmp_path.iterdir())  # refused before anything was written

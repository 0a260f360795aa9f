"""--plain-keras: every speed patch of resnet_cifar/speedups.py off, stock Keras underneath. The same run trains to
the same numbers to float rounding. Measured (2-core AMD EPYC, TensorFlow 2.21, this test's run): training loss
within 6e-4 relative, test loss within 1.4e-3 relative, accuracies equal; the tolerances below are about 8x that."""
import csv
import json

import pytest

from conftest import TINY_RUN, run_script

LOSS_RTOL = 5e-3
TEST_LOSS_RTOL = 1e-2
ACCURACY_ATOL = 0.02  # two of the 100 test images


def rows(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["tensorflow"], indirect=True)
def test_plain_keras_trains_to_the_same_numbers(trained, cifar_dir, tmp_path):
    backend, out, _ = trained
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, *TINY_RUN, "--plain-keras",
                        "--log-dir", tmp_path / "logs", "--checkpoint-dir", tmp_path / "checkpoints", backend=backend)
    assert result.returncode == 0, result.stderr[-2000:]
    ours, plain = rows(out / "checkpoints" / "resnet8_e_cifar10.csv"), rows(tmp_path / "checkpoints" /
                                                                          "resnet8_e_cifar10.csv")
    assert len(ours) == len(plain) == 3
    for a, b in zip(ours, plain):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=TEST_LOSS_RTOL)
        assert abs(b["accuracy"] - a["accuracy"]) <= ACCURACY_ATOL
        assert abs(b["test_accuracy"] - a["test_accuracy"]) <= ACCURACY_ATOL
    # ... by another path: Keras's own BatchNormalization and SGD update round differently
    assert [a["loss"] for a in ours] != [b["loss"] for b in plain]
    with open(tmp_path / "checkpoints" / "resnet8_e_cifar10.json") as f:
        assert json.load(f)["plain_keras"] is True

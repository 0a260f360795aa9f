"""Bad input: one line on stderr naming the problem, exit code 2, no traceback, nothing written."""
import os
import pickle
import subprocess

import pytest

from cifar_fixture import batch_dict, write_cifar
from conftest import assert_refused, run_script


BAD_FLAGS = [
    ("train_resnet32.py", ["--epoch", "2"], ["unrecognized argument '--epoch'", "did you mean --epochs?"]),
    ("train_resnet32.py", ["--stack-n", "0"], ["--stack-n", "6n+2", "20, 32, 44, 56, 110"]),
    ("train_resnet32.py", ["--stack-n", "two"], ["--stack-n"]),
    ("train_resnet32.py", ["--epochs", "-1"], ["--epochs", "at least 1"]),
    ("train_resnet32.py", ["--batch-size", "0"], ["--batch-size"]),
    ("train_resnet32.py", ["--lr-schedule", "0:0.1,oops"], ["--lr-schedule", "EPOCH:LR", "0:0.1,81:0.01,122:0.001"]),
    ("train_resnet32.py", ["--lr-schedule", "5:0.1"], ["--lr-schedule", "start at 0"]),
    ("train_resnet32.py", ["--lr-schedule", "0:0.1,9:-1"], ["--lr-schedule", "positive"]),
    ("train_resnet32.py", ["--weight-decay", "-1e-4"], ["--weight-decay"]),
    ("train_resnet32.py", ["--steps-per-execution", "0"], ["--steps-per-execution", "'auto' or an integer from 1"]),
    ("train_resnet32.py", ["--steps-per-execution", "many"], ["--steps-per-execution", "'auto'"]),
    ("train_resnet32.py", ["--precision", "float8"], ["--precision", "'float32'"]),
    ("train_resnet32.py", ["--model", "resnet33"], ["--model", "resnet32", "resnet34"]),
    ("train_resnet32.py", ["--dataset", "mnist"], ["--dataset", "cifar10", "cifar100"]),
    ("train_resnet32.py", ["--no-such-flag"], ["--no-such-flag"]),
    ("train_resnet_variants.py", ["--unit", "f"], ["--unit", "'a', 'b', 'c', 'd', 'e', 'd-v2', 'e-v2'"]),
    ("train_resnet_variants.py", ["--arch", "huge"], ["--arch", "'cifar', 'wide'"]),
    ("train_resnet_v2.py", ["--version", "1", "--depth", "21"], ["v1 depth must be 6n+2: 20, 32, 44, 56, 110"]),
    ("train_resnet_v2.py", ["--version", "2", "--depth", "21"], ["v2 depth must be 9n+2: 56, 110, 164"]),
    ("train_resnet_v2.py", ["--version", "2", "--depth", "2"], ["v2 depth must be 9n+2"]),
    ("train_resnet_v2.py", ["--version", "3"], ["--version"]),
    ("train_resnet_v2.py", ["--layout", "paper", "--depth", "100"], ["9n+2", "164, 1001", "--depth 100"]),
    ("train_resnet_v2.py", ["--layout", "paper", "--depth", "32"], ["9n+2", "164, 1001"]),
    ("train_resnet_v2.py", ["--layout", "paper", "--version", "1"], ["--layout paper", "--version 2"]),
    ("train_resnet_v2.py", ["--layout", "wide"], ["--layout", "'keras', 'paper'"]),
    ("train_resnet_bottleneck.py", ["--depth", "34"], ["--depth", "50, 101, 152"]),
    ("train_resnext.py", ["--cardinality", "3", "--bottleneck-width", "128"],
     ["--cardinality 3 does not divide --bottleneck-width 128", "1, 2, 4, 8, 16, 32, 64, 128"]),
    ("train_resnext.py", ["--cardinality", "0"], ["--cardinality must be at least 1"]),
    ("train_resnext.py", ["--depth", "101"], ["--depth", "29, 50"]),
]


@pytest.mark.parametrize("script, argv, words", BAD_FLAGS, ids=[" ".join([s] + a) for s, a, _ in BAD_FLAGS])
def test_bad_flag_values(script, argv, words):
    assert_refused(run_script(script, *argv), *words)


def refused_run(tmp_path, *args):
    """The default ResNet-32 run with `args`, its outputs in tmp_path: never in the checkout's checkpoints/ and
    logs/, which may hold a real run of that name (the README's first command)."""
    flags = {"--checkpoint-dir": tmp_path / "outputs" / "checkpoints", "--log-dir": tmp_path / "outputs" / "logs"}
    defaults = [item for flag, folder in flags.items() if flag not in args for item in (flag, folder)]
    return run_script("train_resnet32.py", *args, *defaults)


def test_missing_data_dir(tmp_path):
    assert_refused(refused_run(tmp_path, "--data-dir", tmp_path / "nowhere"), "does not exist", "--data-dir")


def test_data_dir_without_cifar(tmp_path):
    assert_refused(refused_run(tmp_path, "--data-dir", tmp_path), "cifar-10-batches-py", "cifar-10-python.tar.gz")


def test_evaluate_missing_file(cifar_dir, tmp_path):
    assert_refused(refused_run(tmp_path, "--data-dir", cifar_dir, "--evaluate", tmp_path / "none.h5"),
                   "--evaluate", "no such file")


def broken_copy(tmp_path, name, content):
    root = write_cifar(str(tmp_path), per_file=8, test_images=8)
    path = os.path.join(root, "cifar-10-batches-py", name)
    with open(path, "wb") as f:
        f.write(content)
    return root, path


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    root, path = broken_copy(tmp_path / "data", "data_batch_2", pickle.dumps({b"data": Hostile(str(marker))}))
    line = assert_refused(run_script("train_resnet32.py", "--data-dir", root, "--epochs", "1",
                                     "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "logs"),
                          path, "refusing to load", "only numpy arrays")
    assert "open" in line
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "ck" / "resnet32_e_cifar10.h5")


def test_truncated_batch(tmp_path):
    root = write_cifar(str(tmp_path), per_file=8, test_images=8)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_3")
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])
    assert_refused(refused_run(tmp_path, "--data-dir", root), path)


def test_images_of_the_wrong_shape(tmp_path):
    import numpy as np
    batch = batch_dict(np.zeros((4, 16, 16, 3), np.uint8), [0, 1, 2, 3], b"labels", "x")
    root, path = broken_copy(tmp_path, "data_batch_1", pickle.dumps(batch, protocol=2))
    assert_refused(refused_run(tmp_path, "--data-dir", root), path, "3072")


def test_labels_out_of_range(tmp_path):
    import numpy as np
    batch = batch_dict(np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 10], b"labels", "x")
    root, path = broken_copy(tmp_path, "test_batch", pickle.dumps(batch, protocol=2))
    assert_refused(refused_run(tmp_path, "--data-dir", root), path, "labels must be 0..9")


def test_cifar100_labels_read_as_cifar10_are_refused(cifar100_dir, tmp_path):
    # a CIFAR-100 folder is not a CIFAR-10 one: the message says which files are expected
    assert_refused(refused_run(tmp_path, "--data-dir", cifar100_dir), "cifar-10-batches-py")


def test_unwritable_checkpoint_dir_under_a_regular_file(cifar_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert_refused(refused_run(tmp_path, "--data-dir", cifar_dir, "--checkpoint-dir", blocker / "ck"),
                   "--checkpoint-dir")
    assert blocker.read_text() == "keep me"


def test_read_only_log_dir(cifar_dir, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    if os.geteuid() == 0:  # root writes through permissions, not into a read-only file system
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(logs)], capture_output=True,
                                 text=True)
        if mounted.returncode:
            pytest.skip(f"root, and no read-only mount here ({mounted.stderr.strip()})")
    else:
        logs.chmod(0o500)
    try:
        assert_refused(refused_run(tmp_path, "--data-dir", cifar_dir, "--log-dir", logs), "--log-dir")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(logs)], capture_output=True)


def test_log_dir_that_is_a_file(cifar_dir, tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("keep me")
    assert_refused(refused_run(tmp_path, "--data-dir", cifar_dir, "--log-dir", blocker), "--log-dir")
    assert blocker.read_text() == "keep me"

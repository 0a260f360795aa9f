"""Files written by an earlier version still work: tests/data/v91feba7/ holds a ResNet-8 run (one epoch, batch 32,
on the fixture data of tests/cifar_fixture.write_cifar with its defaults) saved by commit 91feba7, before the
library moved into the resnet_cifar package: its .h5 and .keras evaluate to the accuracy that version measured,
and its resume state continues to a second epoch."""
import csv
import json
import shutil

import pytest

from cifar_fixture import write_cifar
from conftest import ROOT, final_fields, run_script

SAVED = f"{ROOT}/tests/data/v91feba7"
RUN = "v91feba7"


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(str(root))  # the defaults 91feba7's run trained on
    return root


def history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("ending", [".h5", ".keras"])
def test_a_model_file_of_91feba7_evaluates_to_its_own_accuracy(fixture_data, ending):
    result = run_script("train_resnet32.py", "--data-dir", str(fixture_data), "--evaluate", f"{SAVED}/{RUN}{ending}")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = history(f"{SAVED}/{RUN}.csv")[-1]
    fields = final_fields(result.stdout)
    assert fields["epochs"] == "1" and fields["params"] == "78666"
    assert abs(float(fields["test_acc"]) - float(saved["test_accuracy"])) < 1e-4, (fields, saved)


@pytest.mark.slow
def test_a_resume_state_of_91feba7_continues_to_the_next_epoch(fixture_data, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for ending in (".h5", ".keras", ".csv", ".json", ".state.weights.h5"):
        shutil.copy(f"{SAVED}/{RUN}{ending}", checkpoints / f"{RUN}{ending}")
    with open(f"{SAVED}/{RUN}.json") as f:
        saved = json.load(f)
    result = run_script("train_resnet32.py", "--data-dir", str(fixture_data), "--stack-n", "1", "--batch-size",
                        str(saved["batch_size"]), "--epochs", "2", "--run-name", RUN, "--resume", "--checkpoint-dir",
                        str(checkpoints), "--log-dir", str(tmp_path / "logs"), "--verbose", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {RUN} after epoch 1" in result.stdout
    rows = history(checkpoints / f"{RUN}.csv")
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert rows[0] == history(f"{SAVED}/{RUN}.csv")[0]  # the saved epoch kept as it was, the second one trained
    assert float(rows[1]["loss"]) > 0

"""compare.py on two tiny real runs: a figure and a table whose parameter counts are the models'."""
import os
import re

import pytest

import train_resnet_variants
from conftest import build, run_script

pytestmark = pytest.mark.xdist_group("compare")  # one worker: the two runs are made once

RUNS = {"resnet8_e_cifar10_e2_b32": ["--unit", "e"], "plain8_e_cifar10_e2_b32": ["--unit", "e", "--plain"]}


@pytest.fixture(scope="module")
def two_runs(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    for argv in RUNS.values():
        result = run_script("train_resnet_variants.py", "--data-dir", cifar_dir, "--stack-n", "1", "--epochs", "2",
                            "--batch-size", "32", "--log-dir", out / "logs", "--checkpoint-dir", out / "ck", *argv)
        assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_figure_and_table(two_runs):
    figure = two_runs / "runs.png"
    result = run_script("compare.py", *RUNS, "--log-dir", two_runs / "logs", "--out", figure)
    assert result.returncode == 0, result.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(figure) > 30_000
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and "_cifar10" in line}
    assert set(rows) == set(RUNS)
    for run, argv in RUNS.items():
        model = build(train_resnet_variants, argv + ["--stack-n", "1"])
        name, model_name, params, size_mb, final, best, epochs, seconds = rows[run]
        assert int(params.replace(",", "")) == model.count_params()
        assert model_name == model.name and epochs == "2"
        assert float(size_mb) > 0.1 and 0 <= float(final) <= float(best) <= 1


def test_run_folder_path_works_too(two_runs):
    result = run_script("compare.py", two_runs / "logs" / "resnet8_e_cifar10_e2_b32", "--out", two_runs / "one.png")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\| resnet8_e_cifar10_e2_b32 \| resnet8_e \| 78,666 \|", result.stdout)


def test_missing_run_is_refused(two_runs):
    result = run_script("compare.py", "resnet8_e_cifar10_e2_b32", "no_such_run", "--log-dir", two_runs / "logs",
                        "--out", two_runs / "x.png")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "no_such_run" in result.stderr and "Traceback" not in result.stderr
    assert not (two_runs / "x.png").exists()


def test_a_history_without_configuration_is_drawn_too(two_runs):
    """The article recipe writes history.csv alone (same columns): it is overlaid on our runs."""
    seed = two_runs / "logs" / "seedrecipe_run"
    seed.mkdir()
    ours = (two_runs / "logs" / "resnet8_e_cifar10_e2_b32" / "history.csv").read_text()
    (seed / "history.csv").write_text(ours)
    figure = two_runs / "with_seed.png"
    result = run_script("compare.py", "resnet8_e_cifar10_e2_b32", "seedrecipe_run", "--log-dir", two_runs / "logs",
                        "--out", figure)
    assert result.returncode == 0, result.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^\| seedrecipe_run \| - \| - \| - \| ", result.stdout, re.M), result.stdout

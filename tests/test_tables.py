"""The tables of reproduce.py and compare.py: the interval of the mean and Welch's test equal scipy's, one run per
row has no interval, a published figure is set beside the same statistic of ours, a sweep that changes the
experiment's scale says so and prints no difference, and the data a run used is known (its fingerprint, and
whether the files are the official archives: checked with stand-in files, never a download)."""
import os

import numpy as np
import pytest
import scipy.stats

import reproduce
from resnet_cifar import cifar_data, provenance, statistics
from cifar_fixture import write_cifar
from conftest import ROOT, parse
import train_resnet32

A = [0.912, 0.905, 0.917, 0.9085]
B = [0.921, 0.918, 0.925]


def rows_of(**accuracies):
    return [{"label": label, "accuracies": values, "minutes": [1.0] * len(values), "published": None}
            for label, values in accuracies.items()]


def cells(table, label):
    return [c.strip() for c in next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
            .split("|")[2:-1]]


def test_the_interval_and_the_p_value_are_scipys():
    table = statistics.markdown_table(rows_of(a=A, b=B))
    low, high = scipy.stats.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=scipy.stats.sem(A))
    assert cells(table, "a")[2] == f"{100 * low:.2f} to {100 * high:.2f}"
    against = statistics.against_table(rows_of(a=A, b=B), "a")
    difference, interval, p = cells(against, "b")
    result = scipy.stats.ttest_ind(B, A, equal_var=False)
    ci = result.confidence_interval(0.95)
    assert difference == f"{100 * (np.mean(B) - np.mean(A)):+.2f}"
    assert interval == f"{100 * ci.low:+.2f} to {100 * ci.high:+.2f}"
    assert p == f"{result.pvalue:.3g}"
    assert "| a |" not in against  # the reference row is not compared with itself


def test_one_run_per_row_has_no_interval_and_no_test():
    table = statistics.markdown_table(rows_of(a=[0.91], b=B))
    assert cells(table, "a")[2] == "undefined (n = 1)"
    assert cells(statistics.against_table(rows_of(a=[0.91], b=B), "a"), "b")[1] == "undefined (fewer than 2 runs)"


@pytest.mark.parametrize("published, ours, shown", [
    (93.03, f"{100 * np.mean(A):.2f} (mean of 4)", "93.03 (one run)"),
    ({"value": 93.57, "statistic": "best", "n": 5, "mean": 93.39, "std": 0.16}, f"{100 * max(A):.2f} (best of 4)",
     "93.57 (best of 5; 93.39 ± 0.16, 95 % CI {} to {})"),
    ({"value": 95.08, "statistic": "median", "n": 5}, f"{100 * np.median(A):.2f} (median of 4)", "95.08 (median of 5)"),
])
def test_a_published_figure_is_set_beside_the_same_statistic_of_ours(published, ours, shown):
    figure = statistics.published_figure(published)
    row = {**rows_of(a=A)[0], "published": figure}
    if figure["std"]:
        low, high = scipy.stats.t.interval(0.95, 4, loc=93.39, scale=0.16 / 5 ** 0.5)
        shown = shown.format(f"{low:.2f}", f"{high:.2f}")
    table_cells = cells(statistics.markdown_table([row]), "a")
    assert table_cells[6:9] == [shown, ours, f"{float(ours.split()[0]) - figure['value']:+.2f}"]
    # at a reduced scale the same row prints no difference
    assert cells(statistics.markdown_table([row], reduced=["--epochs 3 instead of 200"]), "a")[8] == "-"


def test_a_sweep_that_changes_the_experiment_says_reduced_scale_and_prints_no_difference(tmp_path):
    experiment = reproduce.load_experiment(os.path.join(ROOT, "experiments", "he2016_table2_units.toml"))
    extra = ["--stack-n", "1", "--epochs", "3", "--train-limit", "2000"]
    reduced_runs = [reproduce.Run(row, 0, extra, str(tmp_path)) for row in experiment["rows"]]
    differences = reproduce.scale_differences(experiment, reduced_runs)
    assert differences == ["--epochs 3 instead of 200", "--stack-n 1 instead of 18", "--train-limit 2000 instead of all"]
    rows = [{"label": row["label"], "published": row["published"], "accuracies": A, "minutes": [1.0] * 4,
             "configs": []} for row in experiment["rows"]]
    text = reproduce.report(experiment, "both", rows, differences)
    assert "Reduced scale: --epochs 3 instead of 200, --stack-n 1 instead of 18" in text
    assert all(cells(text, row["label"])[8] == "-" for row in experiment["rows"])
    # at the experiment's own settings: the difference, like for like (unit a: our mean beside the paper's mean)
    own_runs = [reproduce.Run(row, 0, [], str(tmp_path)) for row in experiment["rows"]]
    assert reproduce.scale_differences(experiment, own_runs) == []
    text = reproduce.report(experiment, "both", rows, [])
    assert "Reduced scale" not in text
    assert cells(text, "a, original")[6:9] == [
        "93.39 (mean of 5; 93.39 ± 0.16, 95 % CI 93.19 to 93.59)", f"{100 * np.mean(A):.2f} (mean of 4)",
        f"{100 * np.mean(A) - 93.39:+.2f}"]


def test_a_flag_that_changes_only_speed_or_outputs_is_not_a_reduced_scale(tmp_path):
    experiment = reproduce.load_experiment(os.path.join(ROOT, "experiments", "he2016_table2_units.toml"))
    extra = ["--precision", "mixed_bfloat16", "--steps-per-execution", "4", "--data-dir",
             write_cifar(str(tmp_path), per_file=8, test_images=8)]
    runs = [reproduce.Run(row, 1, extra, str(tmp_path)) for row in experiment["rows"][:1]]
    assert reproduce.scale_differences(experiment, runs) == []


def test_official_data_from_the_published_checksums_with_stand_in_files(tmp_path, monkeypatch):
    folder = write_cifar(str(tmp_path / "folder"), per_file=8, test_images=8)
    archive = write_cifar(str(tmp_path / "archive"), per_file=8, test_images=8, tar=True)
    assert provenance.is_official(folder, "cifar10") is False
    assert provenance.is_official(archive, "cifar10") is False
    spec = cifar_data.DATASETS["cifar10"]
    stand_in = {name: provenance.md5_of(os.path.join(folder, spec.folder, name))
                for name in (*spec.train_files, *spec.test_files)}
    stand_in[spec.archive] = provenance.md5_of(os.path.join(archive, spec.archive))
    monkeypatch.setitem(provenance.OFFICIAL_MD5, "cifar10", stand_in)  # these files' checksums as the published ones
    assert provenance.is_official(folder, "cifar10") is True
    assert provenance.is_official(archive, "cifar10") is True
    with open(os.path.join(folder, spec.folder, "data_batch_3"), "r+b") as f:  # one byte of one file changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert provenance.is_official(folder, "cifar10") is False
    assert provenance.is_official(None, "cifar10") is True  # keras.datasets checks the official archive's hash


JPEG_COPY = os.path.join(ROOT, "data")


@pytest.mark.skipif(not os.path.isdir(os.path.join(JPEG_COPY, "cifar-10-batches-py")),
                    reason="this project's JPEG-derived copy of CIFAR-10 is not in data/ (see docs/fidelity.md)")
def test_this_projects_jpeg_copy_is_not_the_official_data():
    assert provenance.is_official(JPEG_COPY, "cifar10") is False


def test_the_fingerprint_is_of_the_data_as_loaded(tmp_path):
    root = write_cifar(str(tmp_path / "a"), per_file=8, test_images=8)
    same = write_cifar(str(tmp_path / "b"), per_file=8, test_images=8, tar=True)  # other files, the same data
    other = write_cifar(str(tmp_path / "c"), per_file=8, test_images=8, seed=1)

    def fingerprint(data_dir, *flags):
        config = parse(train_resnet32, ["--data-dir", data_dir, *flags])
        return provenance.fingerprint(cifar_data.load_data(config))
    assert fingerprint(root) == fingerprint(same) != fingerprint(other)
    assert fingerprint(root, "--train-limit", "20") != fingerprint(root)
    assert len(fingerprint(root)) == provenance.FINGERPRINT_DIGITS


def test_a_table_of_runs_on_mixed_data_says_so():
    official = {"data_fingerprint": "aaaa", "official_data": True}
    copy = {"data_fingerprint": "bbbb", "official_data": False}
    line = statistics.data_sources([{"label": "x", "config": official}, {"label": "y", "config": copy}])
    assert "mix data sources" in line and "aaaa, the official archive (x)" in line and "bbbb" in line
    assert statistics.data_sources([{"label": "x", "config": official}] * 2) == \
        "Data: fingerprint aaaa, the official archive."

"""reproduce.py on a tiny two-row, two-seed sweep through submitit's local executor: every run once, the table's
figures computed independently from the runs' histories, idempotent reruns, kill -9 mid-sweep, the SLURM
submission and a job's requeue-with-resume, and bad input. tests/test_slurm.py runs sweeps on a real cluster."""
import csv
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import scipy.stats

from conftest import ROOT, assert_refused, run_script

pytestmark = pytest.mark.slow  # whole training runs on clusters or sweeps: the full suite only

EXPERIMENT = """
title = "tiny units"
paper = "a test"
table = "none"
seeds = [0, 1, 2]

[[rows]]
label = "unit a"
script = "train_resnet_variants.py"
flags = ["--unit", "a"]
published = 93.39

[[rows]]
label = "unit e"
script = "train_resnet_variants.py"
flags = ["--unit", "e"]
"""
TINY = ["--stack-n", "1", "--batch-size", "32", "--epochs", "2", "--lr-schedule", "0:0.05,1:0.02"]


def sweep(tmp_path, cifar_dir, *flags, seeds="0-1", timeout=900):
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(EXPERIMENT)
    return run_script("reproduce.py", experiment, "--seeds", seeds, "--out", tmp_path / "out", *flags,
                      "--", *TINY, "--data-dir", cifar_dir, timeout=timeout)


def histories(out):
    found = {}
    for name in sorted(os.listdir(out / "logs")):
        with open(out / "logs" / name / "history.csv") as f:
            found[name] = list(csv.DictReader(f))
    return found


def table_rows(stdout, cells=9):
    """The rows of the table (cells=9) or of the --against table (cells=3), by label."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in stdout.splitlines() if line.startswith("| unit") and len(line.split("|")) == cells + 3}


# the tests of one sweep run on one pytest-xdist worker (--dist loadgroup), so the sweep is made once
ONE_SWEEP = pytest.mark.xdist_group("swept")


@pytest.fixture(scope="module")
def swept(cifar_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    result = sweep(tmp_path, cifar_dir, "--against", "unit a")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, result


@ONE_SWEEP
def test_every_run_once_and_the_table_from_the_histories(swept):
    tmp_path, result = swept
    runs = histories(tmp_path / "out")
    assert len(runs) == 4 and all([int(r["epoch"]) for r in rows] == [0, 1] for rows in runs.values())
    assert result.stdout.count("done] ") == 4 and "[4/4 done]" in result.stdout
    table = table_rows(result.stdout)
    finals = {label: [float(rows[-1]["test_accuracy"]) * 100 for name, rows in runs.items() if unit in name]
              for label, unit in (("unit a", "_a_"), ("unit e", "_e_"))}
    for label, values in finals.items():
        n, mean_std, interval, median, span, minutes, published, ours, difference = table[label]
        assert int(n) == 2
        mean, std = (float(v) for v in mean_std.split(" ± "))
        assert mean == pytest.approx(statistics.fmean(values), abs=0.006)
        assert std == pytest.approx(statistics.stdev(values), abs=0.006)
        low, high = scipy.stats.t.interval(0.95, 1, loc=statistics.fmean(values), scale=scipy.stats.sem(values))
        assert [float(v) for v in interval.split(" to ")] == pytest.approx([low, high], abs=0.006)  # scipy's
        assert float(median) == pytest.approx(statistics.median(values), abs=0.006)
        assert span == f"{min(values):.2f}-{max(values):.2f}"
        seconds = [sum(float(r["seconds"]) for r in rows) / 60 for name, rows in runs.items()
                   if name.split("_")[1] == label[-1]]
        assert float(minutes.split(" ± ")[0]) == pytest.approx(statistics.fmean(seconds), abs=0.06)
        if label == "unit a":  # the sweep's flags shrink the experiment: no difference from the published figure
            assert published == "93.39 (one run)" and ours == f"{mean:.2f} (mean of 2)" and difference == "-"
    assert "Reduced scale: " in result.stdout and "--stack-n 1 instead of 5" in result.stdout
    assert "--epochs 2 instead of 200" in result.stdout
    against = table_rows(result.stdout, cells=3)
    difference, interval, p = against["unit e"]
    welch = scipy.stats.ttest_ind(finals["unit e"], finals["unit a"], equal_var=False)  # scipy's, from the histories
    assert float(difference) == pytest.approx(statistics.fmean(finals["unit e"]) - statistics.fmean(finals["unit a"]),
                                              abs=0.011)
    ci = welch.confidence_interval(0.95)
    assert [float(v) for v in interval.split(" to ")] == pytest.approx([ci.low, ci.high], abs=0.011)
    assert float(p) == pytest.approx(welch.pvalue, rel=1e-2)
    assert "Data: fingerprint " in result.stdout and "not the official archive" in result.stdout
    assert (tmp_path / "out" / "table.md").read_text().count("| unit") == 3  # two rows, one against unit a
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"


@ONE_SWEEP
def test_a_second_invocation_starts_no_run_and_prints_the_same_table(swept, cifar_dir):
    tmp_path, first = swept
    before = {name: rows for name, rows in histories(tmp_path / "out").items()}
    again = sweep(tmp_path, cifar_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stdout and "done]" not in again.stdout
    assert table_rows(again.stdout) == table_rows(first.stdout)
    assert histories(tmp_path / "out") == before


@ONE_SWEEP
def test_print_gives_one_command_per_pending_run(swept, cifar_dir):
    tmp_path, _ = swept
    result = sweep(tmp_path, cifar_dir, "--print", seeds="0-2")  # seeds 0 and 1 are done: only seed 2's two runs
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all("train_resnet_variants.py" in line and "--seed 2" in line for line in lines)


def test_kill_9_mid_sweep_then_rerun_runs_each_once(cifar_dir, tmp_path):
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(EXPERIMENT.split("[[rows]]")[0] + "[[rows]]" + EXPERIMENT.split("[[rows]]")[1])  # row a
    command = [sys.executable, os.path.join(ROOT, "reproduce.py"), str(experiment), "--seeds", "0-1", "--out",
               str(tmp_path / "out"), "--", *TINY, "--epochs", "3", "--data-dir", str(cifar_dir)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 600
    logs = tmp_path / "out" / "logs"
    while time.time() < deadline and process.poll() is None:  # the second run in its first or second epoch
        started = [d for d in (logs.iterdir() if logs.exists() else []) if (d / "history.csv").exists()]
        if len(started) >= 2:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the sweep ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # reproduce.py and its current run
    process.wait()
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    runs = histories(tmp_path / "out")
    assert len(runs) == 2
    for name, rows in runs.items():
        assert [int(r["epoch"]) for r in rows] == [0, 1, 2], name  # each epoch exactly once


DRIVER = """
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from resnet_cifar import sweep_jobs

command, files = json.loads(sys.argv[2]), json.loads(sys.argv[3])
job = sweep_jobs.TrainingJob(command, files, 3)

def checkpoint_and_requeue(signum, frame):  # what submitit's handler does, in the same thread as job()
    start = time.monotonic()
    requeued = job.checkpoint()
    print(json.dumps({"seconds": time.monotonic() - start, "code": job.process.returncode}), flush=True)
    os._exit(0)

signal.signal(signal.SIGUSR2, checkpoint_and_requeue)
job()
"""


def test_the_time_limit_warning_requeues_within_seconds_and_the_requeued_job_resumes(cifar_dir, tmp_path):
    """SLURM's USR2 reaches the job's wrapper and its script at once; the wrapper's handler (submitit's, calling
    checkpoint() in the thread that waits for the script) returns as soon as the script has stopped, not after a
    stalled wait; the requeued job, the same command, continues the run with --resume, each epoch once."""
    import json

    from resnet_cifar import sweep_jobs
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(ROOT, "train_resnet32.py"), "--data-dir", str(cifar_dir), "--stack-n", "1",
               "--batch-size", "8", "--steps-per-execution", "1", "--epochs", "3", "--run-name", "r",
               "--log-dir", str(out / "logs"), "--checkpoint-dir", str(out / "checkpoints")]
    files = {"model": str(out / "checkpoints" / "r.h5"), "state": str(out / "checkpoints" / "r.state.weights.h5"),
             "saved": str(out / "checkpoints" / "r.json"), "history": str(out / "logs" / "r" / "history.csv")}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ROOT, json.dumps(command), json.dumps(files)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    history = out / "checkpoints" / "r.csv"
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None and not (
            history.exists() and len(history.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    assert driver.poll() is None, driver.communicate()[1][-3000:]
    os.killpg(driver.pid, signal.SIGUSR2)  # as SLURM signals every process of the job step
    stdout, stderr = driver.communicate(timeout=300)
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["code"] == 128 + signal.SIGUSR2 and "stopped by SIGUSR2" in stderr, stderr[-3000:]
    assert report["seconds"] < 30, report  # a wait on Popen's lock would last CHILD_STOP_S (120 s)
    assert sweep_jobs.run_status(files, 3) == "interrupted"
    assert sweep_jobs.TrainingJob(command, files, 3)() == 0  # decides --resume by itself
    with open(history) as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    assert sweep_jobs.run_status(files, 3) == "finished"


def test_the_slurm_submission(tmp_path):
    """The sbatch script submitit writes for our flags (no cluster here: the submission itself is not run)."""
    import argparse

    from submitit.slurm.slurm import _make_sbatch_string

    import reproduce
    args = argparse.Namespace(executor="slurm", time=240, gpus_per_run=1, cpus_per_run=8, partition="gpu",
                              account="lab")
    text = _make_sbatch_string(command="python -m submitit.core._submit", folder=str(tmp_path),
                               **reproduce.slurm_parameters(args))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --account=lab", "#SBATCH --signal=USR2@300", "#SBATCH --cpus-per-task=8"):
        assert line in text, text
    short = argparse.Namespace(**{**vars(args), "time": 2, "account": None})  # the warning scaled to the job
    text = _make_sbatch_string(command="python -m submitit.core._submit", folder=str(tmp_path),
                               **reproduce.slurm_parameters(short))
    assert "#SBATCH --signal=USR2@30\n" in text and "--account" not in text, text


EXPERIMENT_ERRORS = [
    ("title = 'x'\n", ["needs a title and at least one [[rows]]"]),
    ("title = \n", ["not valid TOML"]),
    ("title = 'x'\n[[rows]]\nlabel = 'a'\nscript = 'train_nothing.py'\n", ["row 1", "script"]),
    ("title = 'x'\n[[rows]]\nlabel = 'a'\nscript = 'train_resnet32.py'\nflags = ['--stack-n', '0']\n",
     ["row 'a'", "--stack-n"]),
    ("title = 'x'\n[[rows]]\nlabel = 'a'\nscript = 'train_resnet32.py'\nflags = ['--no-such-flag']\n",
     ["row 'a'", "--no-such-flag"]),
]


@pytest.mark.parametrize("text, words", EXPERIMENT_ERRORS, ids=["no rows", "not toml", "bad script", "bad flag",
                                                                  "unknown flag"])
def test_a_bad_experiment_starts_nothing(tmp_path, text, words):
    experiment = tmp_path / "bad.toml"
    experiment.write_text(text)
    assert_refused(run_script("reproduce.py", experiment, "--out", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["--seeds", "4-1"], ["--seeds", "0-4"]),
    (["--seeds", "a"], ["--seeds"]),
    (["--executor", "kubernetes"], ["--executor", "local", "slurm"]),
    (["--executor", "slurm"], ["--partition"]),
])
def test_bad_sweep_flags(tmp_path, argv, words):
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(EXPERIMENT)
    assert_refused(run_script("reproduce.py", experiment, "--out", tmp_path / "out", *argv), *words)
    assert not (tmp_path / "out").exists()


def session_hparams(run_dir):
    """The HParams session-start values written into a run's folder, read back from its event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    found = {}
    for name in os.listdir(run_dir):
        if name.startswith("events.out.tfevents."):
            for event in EventFileLoader(os.path.join(run_dir, name)).Load():
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME:
                        data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                        if data.HasField("session_start_info"):
                            found.update({k: v for k, v in data.session_start_info.hparams.items()})
                        if data.HasField("session_end_info"):
                            found["_status"] = data.session_end_info.status
    return found


@ONE_SWEEP
def test_tensorboard_hparams_of_the_sweep(swept):
    from tensorboard.plugins.hparams import api_pb2
    tmp_path, _ = swept
    logs = tmp_path / "out" / "logs"
    seen = set()
    for name in os.listdir(logs):
        hparams = session_hparams(logs / name)
        assert hparams["_status"] == api_pb2.STATUS_SUCCESS
        assert hparams["dataset"].string_value == "cifar10" and hparams["epochs"].number_value == 2
        assert hparams["lr_schedule"].string_value == "0:0.05,1:0.02" and hparams["batch_size"].number_value == 32
        assert hparams["precision"].string_value == "float32" and hparams["weight_decay"].number_value == 1e-4
        assert hparams["official_data"].bool_value is False and len(hparams["data_fingerprint"].string_value) == 16
        seen.add((hparams["unit"].string_value, int(hparams["seed"].number_value)))
    assert seen == {("a", 0), ("a", 1), ("e", 0), ("e", 1)}


def test_val_split_holds_out_the_last_training_images(cifar_dir):
    import argparse

    from resnet_cifar import cifar_data
    config = argparse.Namespace(dataset="cifar10", data_dir=str(cifar_dir), train_limit=None, val_split=64)
    (x, y), (xt, yt), (xv, yv) = cifar_data.load_data(config)
    (x_all, _), _, _ = cifar_data.load_data(argparse.Namespace(dataset="cifar10", data_dir=str(cifar_dir),
                                                               train_limit=None))
    assert len(xv) == 64 and len(x) == len(x_all) - 64
    assert (xv == x_all[-64:]).all() and (x == x_all[:-64]).all()
    as_bytes = {image.tobytes() for image in xv}
    assert not as_bytes & {image.tobytes() for image in xt} and not as_bytes & {image.tobytes() for image in x}
    limited = argparse.Namespace(**{**vars(config), "train_limit": 100})
    (x_limited, _), _, (xv_limited, _) = cifar_data.load_data(limited)
    assert len(x_limited) == 100 and (xv_limited == xv).all()  # the hold-out comes first, then the limit


def test_a_val_split_run_logs_val_every_epoch_and_test_at_the_end(cifar_dir, tmp_path):
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, *TINY, "--val-split", "64",
                        "--log-dir", tmp_path / "logs", "--checkpoint-dir", tmp_path / "checkpoints")
    assert result.returncode == 0, result.stderr[-3000:]
    name = "resnet8_e_cifar10_e2_lr" + result.stdout.split("_lr")[1][:6] + "_b32_v64"
    assert f"final: run={name}" in result.stdout
    with open(tmp_path / "logs" / name / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["test_accuracy"] == "nan" for r in rows] == [True, False]
    assert all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    import json
    config = json.loads((tmp_path / "checkpoints" / f"{name}.json").read_text())
    assert config["train_images"] == 320 - 64 and config["val_images"] == 64 and config["val_split"] == 64
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    val = EventAccumulator(str(tmp_path / "logs" / name / "val")).Reload()
    assert [e.step for e in val.Scalars("epoch_accuracy")] == [0, 1]
    test = EventAccumulator(str(tmp_path / "logs" / name / "test")).Reload()
    assert [e.step for e in test.Scalars("epoch_accuracy")] == [1]

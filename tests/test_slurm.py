"""reproduce.py on a real single-node SLURM cluster (tests/slurm/start.sh; .ci/run starts it): a sweep, and every
way a scheduler stops a job mid-run (the time-limit warning USR2, scontrol requeue, pre-emption by a job in a
higher-priority partition, the time limit itself) ends with exit 0, no manual rerun and each epoch once; kill -9
of a job is detected; a rerun adopts the jobs still queued instead of submitting them again; impossible requests
are refused before anything is submitted, and one that can never start is cancelled with its reason.

Skipped where sbatch is absent or the cluster is not the test cluster (its name, below); CI fails instead."""
import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_refused, run_script

TEST_CLUSTER = "resnet-cifar-tests"  # ClusterName in tests/slurm/start.sh: never submit to anyone else's cluster
# one at a time (every job wants the node's 2 CPUs); minutes in all: outside the fast tier
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.slow]

EXPERIMENT = """
title = "one row"
[[rows]]
label = "unit a"
script = "train_resnet_variants.py"
flags = ["--unit", "a"]
"""
# ~0.8 s an epoch on a 2-core EPYC (40 steps of 8 images, one step per execution: a stop is taken within a step)
TINY = ["--stack-n", "1", "--batch-size", "8", "--steps-per-execution", "1", "--lr-schedule", "0:0.05,6:0.02"]
EPOCHS = 12
SLURM = ["--executor", "slurm", "--partition", "debug", "--gpus-per-run", "0", "--cpus-per-run", "2"]


def cluster_name():
    if shutil.which("sbatch") is None:
        return None
    done = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    return next((line.split("=", 1)[1].strip() for line in done.stdout.splitlines()
                 if line.startswith("ClusterName")), None)


@pytest.fixture(scope="module")
def slurm():
    name = cluster_name()
    if name != TEST_CLUSTER:
        why = ("sbatch not found" if name is None else f"this SLURM cluster is {name!r}, not {TEST_CLUSTER!r}") + \
              ": `bash tests/slurm/start.sh` (root) starts the test cluster"
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the SLURM tests: {why}")
        pytest.skip(why)


def job_ids():
    done = subprocess.run(["squeue", "--noheader", "--states=all", "--format", "%i"], capture_output=True, text=True,
                          timeout=60)
    return set(done.stdout.split())


def start_sweep(tmp_path, cifar_dir, *flags, epochs=EPOCHS):
    experiment = tmp_path / "one.toml"
    experiment.write_text(EXPERIMENT)
    command = [sys.executable, os.path.join(ROOT, "reproduce.py"), str(experiment), "--seeds", "0", "--out",
               str(tmp_path / "out"), *SLURM, *flags, "--", *TINY, "--epochs", str(epochs), "--data-dir",
               str(cifar_dir)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def epochs_of(out):
    [name] = os.listdir(out / "logs")
    with open(out / "logs" / name / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def wait_for_epochs(out, n, process, timeout=300):
    """Until the run's history holds n epochs (the job is running, inside epoch n + 1)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        logs = out / "logs"
        if logs.exists() and os.listdir(logs):
            history = logs / os.listdir(logs)[0] / "history.csv"
            if history.exists() and len(history.read_text().splitlines()) > n:
                return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach epoch {n}: " + (process.stdout.read() if process.poll() else ""))


def running_job():
    done = subprocess.run(["squeue", "--noheader", "--states=running", "--partition", "debug", "--format", "%i"],
                          capture_output=True, text=True, timeout=60)
    [job_id] = done.stdout.split()
    return job_id


def finish(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(slurm, cifar_dir, tmp_path_factory):
    """The sweep of one row with nothing in its way: its seconds, its output."""
    tmp_path = tmp_path_factory.mktemp("slurm_plain")
    start = time.monotonic()
    code, stdout, stderr = finish(start_sweep(tmp_path, cifar_dir))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return time.monotonic() - start, stdout, tmp_path / "out"


def test_a_sweep_runs_its_job(uninterrupted):
    seconds, stdout, out = uninterrupted
    assert "job " in stdout and "RUNNING" in stdout and "[1/1 done] unit a, seed 0: final test acc" in stdout
    assert epochs_of(out) == list(range(EPOCHS))
    assert "Bypassing sacct" not in stdout


def stop_by_usr2(job_id):
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)


def stop_by_requeue(job_id):
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def stop_by_preemption(job_id):
    # a job of the higher-priority partition that needs the whole node: SLURM requeues ours (SIGTERM first)
    subprocess.run(["srun", "--partition", "high", "--cpus-per-task", "2", "sleep", "5"], check=True, timeout=300)


@pytest.mark.parametrize("stop", [stop_by_usr2, stop_by_requeue, stop_by_preemption],
                         ids=["scancel --signal=USR2", "scontrol requeue", "pre-emption"])
def test_a_job_stopped_mid_run_finishes_by_itself(uninterrupted, cifar_dir, tmp_path, stop):
    started = time.monotonic()
    process = start_sweep(tmp_path, cifar_dir)
    wait_for_epochs(tmp_path / "out", 3, process)
    stop(running_job())
    code, stdout, stderr = finish(process)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "stopped by the scheduler and requeued" in stdout and "FAILED" not in stdout
    assert epochs_of(tmp_path / "out") == list(range(EPOCHS))  # each epoch exactly once
    if stop is stop_by_usr2:  # the requeue comes within seconds, not after a stalled wait
        assert time.monotonic() - started <= uninterrupted[0] + 60  # the whole sweep, against the one not stopped


def test_the_time_limit_requeues_and_the_run_finishes(slurm, cifar_dir, tmp_path):
    """--time 1: the warning (USR2) comes 15 s before the limit (SLURM may send it up to a minute early), the job
    is requeued and the run resumed, as often as it takes (--max-timeouts)."""
    process = start_sweep(tmp_path, cifar_dir, "--time", "1", "--max-timeouts", "10", epochs=50)
    code, stdout, stderr = finish(process)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "stopped by the scheduler and requeued" in stdout
    assert epochs_of(tmp_path / "out") == list(range(50))
    log = "".join(p.read_text() for p in (tmp_path / "out" / "submitit").glob("*_log.err"))
    assert "stopped by SIGUSR2" in log and "TIMEOUT" not in stdout


def test_kill_9_of_a_job_is_reported_and_a_rerun_finishes_the_run(slurm, cifar_dir, tmp_path):
    process = start_sweep(tmp_path, cifar_dir)
    wait_for_epochs(tmp_path / "out", 3, process)
    job_id = running_job()
    killed = time.monotonic()
    # every process of the job (srun, submitit's wrapper, the script: all name the sweep's folder), as the OOM
    # killer or a lost node would end them; not the sweep itself
    found = subprocess.run(["pgrep", "-f", str(tmp_path / "out")], capture_output=True, text=True).stdout.split()
    for pid in {int(p) for p in found} - {process.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    code, stdout, stderr = finish(process)
    assert code == 1 and f"FAILED (job {job_id}" in stdout, stdout[-3000:] + stderr[-3000:]
    assert time.monotonic() - killed < 120
    rerun = start_sweep(tmp_path, cifar_dir)
    code, stdout, stderr = finish(rerun)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert epochs_of(tmp_path / "out") == list(range(EPOCHS))


def test_a_rerun_follows_the_queued_job_instead_of_submitting_it_again(slurm, cifar_dir, tmp_path):
    before = job_ids()
    first = start_sweep(tmp_path, cifar_dir)
    wait_for_epochs(tmp_path / "out", 1, first)
    first.send_signal(signal.SIGKILL)  # the sweep's own process: its job goes on
    first.communicate()
    rerun = start_sweep(tmp_path, cifar_dir)
    code, stdout, stderr = finish(rerun)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    [job_id] = job_ids() - before  # one job in all
    assert f"following job {job_id}, submitted by an earlier invocation" in stdout
    assert epochs_of(tmp_path / "out") == list(range(EPOCHS))


def test_a_second_sweep_on_the_same_folder_is_refused_while_the_first_follows_its_jobs(slurm, cifar_dir, tmp_path):
    first = start_sweep(tmp_path, cifar_dir, epochs=4)
    deadline = time.time() + 60
    while not (tmp_path / "out" / "jobs.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    record = (tmp_path / "out" / "jobs.json").read_bytes()
    second = start_sweep(tmp_path, cifar_dir, epochs=4)
    code, stdout, stderr = finish(second)
    assert_refused(subprocess.CompletedProcess([], code, stdout, stderr), "in another process", "sweep.lock")
    assert (tmp_path / "out" / "jobs.json").read_bytes() == record
    assert finish(first)[0] == 0


@pytest.mark.parametrize("flags, words", [
    (["--partition", "nosuch"], ["--partition nosuch", "debug", "high"]),
    (["--cpus-per-run", "64"], ["--cpus-per-run 64", "2 CPUs"]),
    (["--gpus-per-run", "1"], ["--gpus-per-run 1", "--gpus-per-run 0"]),
], ids=["no such partition", "more CPUs than any node", "GPUs on a node without"])
def test_an_impossible_request_submits_nothing(slurm, cifar_dir, tmp_path, flags, words):
    before = job_ids()
    experiment = tmp_path / "one.toml"
    experiment.write_text(EXPERIMENT)
    result = run_script("reproduce.py", experiment, "--out", tmp_path / "out", *SLURM, *flags, "--", *TINY,
                        "--data-dir", cifar_dir)
    assert_refused(result, *words)
    assert not job_ids() - before and not (tmp_path / "out").exists()  # no new job (old ones age out of squeue)


def submitter(cifar_dir, tmp_path, **request):
    """One run of the experiment and reproduce.py's SLURM submitter for `request`, with no check before submission:
    what the sweep would submit if its check let the request through."""
    import argparse

    import reproduce
    row = {"label": "unit a", "script": "train_resnet_variants.py", "flags": ["--unit", "a"]}
    run = reproduce.Run(row, 0, [*TINY, "--data-dir", str(cifar_dir)], str(tmp_path / "out"))
    args = argparse.Namespace(executor="slurm", time=10, gpus_per_run=0, account=None, max_timeouts=3, **request)
    os.makedirs(tmp_path / "out")
    return run, reproduce.make_executor(args, str(tmp_path / "out" / "submitit"))


def test_a_job_that_can_never_start_is_cancelled_with_its_reason(slurm, cifar_dir, tmp_path):
    """What the check before submission prevents, submitted anyway: 8 CPUs on a 2-CPU node stay PENDING with
    reason PartitionConfig forever; the sweep cancels the job and says why in one line."""
    from resnet_cifar import sweep_jobs
    from resnet_cifar.errors import UsageError
    run, jobs = submitter(cifar_dir, tmp_path, partition="debug", cpus_per_run=8)
    with pytest.raises(UsageError, match="can never start: SLURM's pending reason is PartitionConfig") as refused:
        sweep_jobs.follow(jobs, [run], 1, 0, 1)
    job_id = str(refused.value).split()[1]
    deadline = time.time() + 30
    while time.time() < deadline:
        state = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format", "%T"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
        if state == "CANCELLED":
            break
        time.sleep(0.5)
    assert state == "CANCELLED"


def test_an_sbatch_refusal_is_one_line(slurm, cifar_dir, tmp_path, capsys):
    """sbatch's own refusal (here a partition the check before submission would have caught) as one line."""
    from resnet_cifar.errors import UsageError
    run, jobs = submitter(cifar_dir, tmp_path, partition="nosuch", cpus_per_run=1)
    with pytest.raises(UsageError) as refused:
        jobs.submit(run, 0, 0)
    message = str(refused.value)
    assert "\n" not in message and "sbatch refused the job of 'unit a', seed 0: invalid partition" in message
    assert capsys.readouterr().err == ""  # submitit prints sbatch's lines too: kept from the terminal
    assert not (tmp_path / "out" / "jobs.json").exists()


def test_a_job_unknown_to_squeue_and_sacct_is_reported_vanished(slurm, tmp_path, monkeypatch):
    """A job gone without a trace (no accounting, or forgotten): UNKNOWN at first, VANISHED after VANISHED_S."""
    from resnet_cifar import sweep_jobs
    monkeypatch.setattr(sweep_jobs, "VANISHED_S", 1)
    os.makedirs(tmp_path / "out")
    jobs = sweep_jobs.SlurmJobs(None, str(tmp_path / "out" / "submitit"), str(tmp_path / "out"))
    assert jobs.states(["999999"])["999999"][0] == "UNKNOWN"
    time.sleep(1.1)
    assert jobs.states(["999999"])["999999"][0] == "VANISHED"

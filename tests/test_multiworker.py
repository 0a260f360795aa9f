"""Beyond one machine: two worker processes on 127.0.0.1, TensorFlow (TF_CONFIG) and JAX (--coordinator),
one writer, no hang; and the one-line errors of the scale-out flags."""
import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import EPOCHS, NO_TENSORFLOW, ROOT, TINY_RUN, assert_refused, final_fields, free_ports, run_script

pytestmark = pytest.mark.slow  # whole training runs on clusters or sweeps: the full suite only

RUN = "resnet8_e_cifar10"
WAIT = 240  # --wait-timeout: a lost worker ends the test's run in minutes, never a hang


def start(args, env_extra, backend):
    env = {**os.environ, "KERAS_BACKEND": backend, **env_extra}
    if backend != "tensorflow":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [NO_TENSORFLOW, env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_resnet32.py"), *map(str, args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(processes, timeout=900):
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append((process.returncode, stdout, stderr))
    return results


def files_under(folder):
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def first_loss(folder):
    with open(folder / "checkpoints" / f"{RUN}.csv") as f:
        return float(next(csv.DictReader(f))["loss"])


def two_workers(backend, cifar_dir, tmp_path, extra=(), checkpoint_dirs=None):
    """The same command in two processes, each with its own output folders (or the given --checkpoint-dir
    each); returns their folders and results."""
    ports = free_ports(2)
    outs = [tmp_path / f"worker{i}" for i in range(2)]
    processes = []
    for i, out in enumerate(outs):
        args = ["--data-dir", cifar_dir, *TINY_RUN, "--distribute", "--wait-timeout", WAIT, *extra,
                "--log-dir", out / "logs",
                "--checkpoint-dir", checkpoint_dirs[i] if checkpoint_dirs else out / "checkpoints"]
        env = {}
        if backend == "tensorflow":
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                           "task": {"type": "worker", "index": i}})
        else:
            args += ["--coordinator", f"127.0.0.1:{ports[0]}", "--num-processes", 2, "--process-id", i]
        processes.append(start(args, env, backend))
    return outs, finish(processes)


@pytest.mark.parametrize("trained", ["tensorflow", "jax"], indirect=True)  # PyTorch refuses --distribute
def test_two_workers_train_like_one_process(cifar_dir, tmp_path, trained):
    """Once per backend with processes: TensorFlow through TF_CONFIG, JAX through --coordinator."""
    backend, one_process_run, _ = trained
    outs, results = two_workers(backend, cifar_dir, tmp_path)
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-3000:]
    chief, worker = outs
    assert (chief / "checkpoints" / f"{RUN}.h5").is_file() and (chief / "logs" / RUN / "history.csv").is_file()
    config = json.loads((chief / "checkpoints" / f"{RUN}.json").read_text())
    assert config["processes"] == 2 and config["devices"] == 2 and config["batch_size"] == 32
    assert files_under(worker) == []  # one writer
    for _, stdout, _ in results:
        assert final_fields(stdout)["epochs"] == str(EPOCHS) and final_fields(stdout)["devices"] == "2"
        assert "10/10 - " in stdout  # 320 images in global batches of 32: ten steps an epoch, in every process
    # the chief's first epoch, global batch 32 over two processes, against one process with batch 32
    one_process = first_loss(one_process_run)
    assert abs(first_loss(chief) - one_process) < 0.1 * one_process, (first_loss(chief), one_process)


@pytest.mark.slow  # three two-process clusters, one left to its --wait-timeout
def test_every_process_resumes_from_the_chiefs_state_on_a_shared_folder(cifar_dir, tmp_path):
    """JAX, two processes, one --checkpoint-dir they share: an interrupted run (here: one epoch) continues
    in every process from the chief's state; a process that cannot read that state stops in one line."""
    shared = tmp_path / "shared"
    _, results = two_workers("jax", cifar_dir, tmp_path / "first", ["--epochs", 1], [shared, shared])
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-3000:] + results[1][2][-3000:]
    outs, results = two_workers("jax", cifar_dir, tmp_path / "resumed", ["--epochs", 2, "--resume"],
                                [shared, shared])
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-3000:]
        assert f"resuming {RUN} after epoch 1 from {shared / RUN}.state.weights.h5" in stdout
        assert final_fields(stdout)["epochs"] == "2"
    with open(shared / f"{RUN}.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    assert files_under(outs[1]) == []  # the other process still writes nothing of its own
    # process 1 given a folder without the chief's state: one line, exit 2, before it joins; process 0,
    # left alone, ends after --wait-timeout (exit 1), never a hang
    _, results = two_workers("jax", cifar_dir, tmp_path / "unreadable", ["--epochs", 3, "--resume",
                             "--wait-timeout", 30], [shared, tmp_path / "elsewhere"])
    (chief_rc, _, chief_err), (rc, _, stderr) = results
    assert rc == 2 and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if "train_resnet32.py:" in line]
    assert len(lines) == 1 and "JAX process 1 of 2 cannot read the chief's state" in lines[0], lines
    assert chief_rc == 1 and "JAX process 0 of 2: processes 1 did not join" in chief_err, chief_err[-3000:]


def test_two_cpu_devices_at_batch_128_finish(cifar_dir, tmp_path):
    """The command that hung on a 2-core host (XLA's first all-reduce, batch 128) before XLA compiled the
    JAX step: with --wait-timeout it would now end in one line, but it finishes."""
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, "--stack-n", "1", "--epochs", "1",
                        "--distribute", "--cpu-devices", "2", "--wait-timeout", WAIT, "--log-dir", tmp_path / "logs",
                        "--checkpoint-dir", tmp_path / "checkpoints", backend="jax", block_tensorflow=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_fields(result.stdout)["devices"] == "2"


def test_a_worker_that_never_comes_ends_the_run_in_one_line(cifar_dir, tmp_path):
    """TF_CONFIG names two workers, only the first is started: it ends after --wait-timeout, in one line."""
    ports = free_ports(2)
    tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                            "task": {"type": "worker", "index": 0}})
    process = start(["--data-dir", cifar_dir, *TINY_RUN, "--distribute", "--wait-timeout", 20,
                     "--log-dir", tmp_path / "logs", "--checkpoint-dir", tmp_path / "checkpoints"],
                    {"TF_CONFIG": tf_config}, "tensorflow")
    (rc, _, stderr), = finish([process], timeout=300)
    assert rc == 1, stderr[-2000:]
    lines = [line for line in stderr.strip().splitlines() if "train_resnet32.py:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "TF_CONFIG worker 0 of 2: no answer from 127.0.0.1:" in lines[0] and "within 20 s" in lines[0]


def test_a_jax_process_alone_ends_in_one_line(cifar_dir, tmp_path):
    port, = free_ports(1)
    process = start(["--data-dir", cifar_dir, *TINY_RUN, "--distribute", "--wait-timeout", 10,
                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", 0,
                     "--log-dir", tmp_path / "logs", "--checkpoint-dir", tmp_path / "checkpoints"], {}, "jax")
    (rc, _, stderr), = finish([process], timeout=300)
    assert rc == 1, stderr[-2000:]
    lines = [line for line in stderr.strip().splitlines() if "train_resnet32.py:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "JAX process 0 of 2: processes 1 did not join" in lines[0] and "within 10 s" in lines[0], lines[0]


BAD_SCALE_OUT = [
    (["--distribute", "--coordinator", "127.0.0.1:1234"], ["--coordinator", "--num-processes", "--process-id"]),
    (["--distribute", "--num-processes", "2", "--process-id", "0"], ["--num-processes", "--coordinator"]),
    (["--distribute", "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     ["--process-id 2 is out of range", "0 to 1"]),
    (["--distribute", "--coordinator", "host0", "--num-processes", "2", "--process-id", "0"],
     ["--coordinator 'host0'", "port"]),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"], ["--distribute"]),
    (["--wait-timeout", "0"], ["--wait-timeout"]),
]


@pytest.mark.parametrize("argv, words", BAD_SCALE_OUT, ids=[" ".join(a) for a, _ in BAD_SCALE_OUT])
def test_bad_scale_out_flags(argv, words, tmp_path):
    assert_refused(run_script("train_resnet32.py", *argv, "--checkpoint-dir", tmp_path), *words)


@pytest.mark.parametrize("tf_config, words", [
    ("{not json", ["TF_CONFIG", "cluster description"]),
    ('{"cluster": {"worker": ["h:1"]}}', ["TF_CONFIG", "task"]),
    ('{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 3}}', ["TF_CONFIG", "worker 3"]),
])
def test_bad_tf_config(tf_config, words, tmp_path):
    env = {**os.environ, "TF_CONFIG": tf_config}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_resnet32.py"), "--distribute",
                             "--checkpoint-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert_refused(result, *words)


WATCHDOG = """
import sys, time
sys.path.insert(0, {root!r})
from resnet_cifar.distributed import Watchdog

with Watchdog(1, "the other devices (a test)"):
    time.sleep(30)  # a step that never finishes
"""


def test_the_watchdog_ends_a_stalled_run_in_one_line():
    result = subprocess.run([sys.executable, "-c", WATCHDOG.format(root=ROOT)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no step finished in 1 s, waiting for the other devices (a test)" in lines[0]

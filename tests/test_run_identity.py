"""Runs never clobber each other: run names, one process per run, resume checked before anything is written,
SIGTERM, full disks, and every bad input one line with the files that existed before byte-identical."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import types

import numpy as np
import pytest

import train_resnet32
from cifar_fixture import write_cifar
from conftest import (NO_TENSORFLOW, ROOT, final_fields, free_ports, history_rows, parse, run_script,
                      start_script, wait_until)

RUN = "r"


def snapshot(*folders):
    """Every file under the folders, with its bytes."""
    files = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[path] = f.read()
    return files


def written(folder):
    """What a run wrote under `folder`, its lock file aside (an empty file that only marks the run's lock)."""
    return {path: data for path, data in snapshot(folder).items() if not path.endswith(".lock")}


def tiny(cifar_dir, out, *extra, epochs=1):
    return ["--data-dir", cifar_dir, "--stack-n", "1", "--batch-size", "32", "--epochs", epochs, "--run-name", RUN,
            "--log-dir", out / "logs", "--checkpoint-dir", out / "checkpoints", *extra]


def history(out):
    with open(out / "checkpoints" / f"{RUN}.csv") as f:
        return list(csv.DictReader(f))


def refused(result, code, *words):
    """Exit `code`, at most two lines on stderr, no traceback, every word in the last line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert 1 <= len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def finished(cifar_dir, tmp_path_factory):
    """A finished one-epoch run named RUN (TensorFlow)."""
    out = tmp_path_factory.mktemp("finished")
    result = run_script("train_resnet32.py", *tiny(cifar_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_default_run_names_say_what_differs():
    def name(*argv):
        return parse(train_resnet32, list(argv)).run_name
    assert name() == "resnet32_e_cifar10"
    assert name("--stack-n", "3", "--train-limit", "2000", "--epochs", "2") == "resnet20_e_cifar10_e2_n2000"
    assert name("--seed", "1") == "resnet32_e_cifar10_s1"
    assert name("--lr-schedule", "0:0.1,81:0.01,122:0.001") == "resnet32_e_cifar10"  # the default, spelled out
    a, b = name("--lr-schedule", "0:0.1,5:0.01"), name("--lr-schedule", "0:0.1,6:0.01")
    assert a != b and a.startswith("resnet32_e_cifar10_lr") and a == name("--lr-schedule", "0:0.1,5:0.01")
    assert name("--batch-size", "256", "--lr-scale", "2").endswith("_b256")
    assert name("--weight-decay", "5e-4") == "resnet32_e_cifar10_wd0.0005"
    # today's options, each named when set; the seeds' parts when they differ from --seed
    assert name("--lr-schedule", "cosine", "--warmup-epochs", "5", "--cutout", "16", "--mixup", "1",
                "--label-smoothing", "0.1", "--ema", "0.999", "--tta", "flip") == \
        "resnet32_e_cifar10_cos_co16_mu1_ls0.1_wu5_ema0.999_ttaflip"
    assert name("--lr-schedule", "cosine:0.2", "--cutmix", "0.5") == "resnet32_e_cifar10_cos0.2_cm0.5"
    assert name("--init-seed", "3", "--data-seed", "4") == "resnet32_e_cifar10_i3_d4"
    assert name("--seed", "3", "--init-seed", "3") == "resnet32_e_cifar10_s3"
    assert name("--data-seed", "0") == "resnet32_e_cifar10"


def damage_state(kind):
    def damage(out):
        path = out / "checkpoints" / f"{RUN}.state.weights.h5"
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(path.read_bytes()[:2000])
        else:  # a record without the seed
            import h5py
            with h5py.File(path, "a") as f:
                record = json.loads(f.attrs["resume"])
                del record["seed"]
                f.attrs["resume"] = json.dumps(record)
    return damage


def malformed_json_beside(out):
    (out / "checkpoints" / f"{RUN}.json").write_text("{not json")


# (extra flags, a change made to the run's files first, expected words): all exit 2, files byte-identical
REFUSALS = [
    ([], None, ["already has files", "--resume", "--run-name", "--overwrite"]),
    (["--resume", "--seed", "1", "--epochs", "2"], None, ["cannot resume", "seed (0 vs 1 now)"]),
    (["--resume", "--epochs", "2", "--lr-schedule", "0:0.2"], None, ["cannot resume", "lr_schedule"]),
    (["--resume", "--epochs", "2", "--weight-decay", "5e-4"], None, ["cannot resume", "weight_decay"]),
    (["--resume", "--epochs", "2", "--batch-size", "16"], None, ["cannot resume", "batch_size"]),
    (["--resume", "--epochs", "2", "--data-seed", "5"], None,
     ["cannot resume", "data_seed (0 vs 5 now)"]),
    (["--resume", "--epochs", "2", "--init-seed", "5"], None, ["cannot resume", "init_seed"]),
    (["--resume", "--epochs", "2", "--cutout", "16"], None, ["cannot resume", "cutout"]),
    (["--resume", "--epochs", "2"], damage_state("empty"), ["cannot resume", "state.weights.h5"]),
    (["--resume", "--epochs", "2"], damage_state("truncated"), ["cannot resume", "state.weights.h5"]),
    (["--resume", "--epochs", "2"], damage_state("no seed"), ["cannot resume", "lacks seed"]),
    (["--evaluate", "checkpoints/r.h5"], malformed_json_beside, ["cannot read", "r.json"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, change, words", REFUSALS, ids=[" ".join(e) or "same name" for e, _, _ in REFUSALS])
def test_refusals_leave_every_file_byte_identical(cifar_dir, run_copy, extra, change, words):
    if change:
        change(run_copy)
    before = snapshot(run_copy)
    extra = [str(run_copy / e) if e.startswith("checkpoints/") else e for e in extra]
    result = run_script("train_resnet32.py", *tiny(cifar_dir, run_copy, *extra))
    refused(result, 2, *words)
    assert snapshot(run_copy) == before


# Bad flags and environments, refused before anything is read or written (flags, expected words, environment)
BAD_INPUT = [
    (["--seed", "-1"], ["--seed", "at least 0"], {}),
    (["--seed", str(2**32)], ["--seed", "at most 4294967295"], {}),
    (["--run-name", "a/b"], ["--run-name", "letters, digits"], {}),
    (["--run-name", "../../escaped"], ["--run-name"], {}),
    (["--run-name", "x" * 230], ["--run-name", "120 characters"], {}),
    (["--lr-schedule", f"0:0.1,{10**20}:0.01"], ["--lr-schedule", "beyond any run"], {}),
    (["--steps-per-execution", str(10**20)], ["--steps-per-execution", "from 1 to 10000"], {}),
    (["--wait-timeout", "1e19", "--cpu-devices", "2"], ["--wait-timeout", "at most"], {}),
    (["--distribute"], ["TF_CONFIG", "port from 1 to 65535"],
     {"TF_CONFIG": json.dumps({"cluster": {"worker": ["127.0.0.1:99999"]}, "task": {"type": "worker", "index": 0}})}),
]


@pytest.mark.parametrize("argv, words, env", BAD_INPUT, ids=[" ".join(a)[:40] for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_before_anything_is_written(cifar_dir, tmp_path, argv, words, env):
    out = tmp_path / "out"
    args = [*tiny(cifar_dir, out)]
    if "--run-name" in argv:  # the case's own --run-name replaces the helper's
        i = args.index("--run-name")
        del args[i:i + 2]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_resnet32.py"), *map(str, args), *argv],
                            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    refused(result, 2, *words)
    assert not written(out)


def test_a_run_name_that_is_not_utf8_is_refused(cifar_dir, tmp_path):
    result = subprocess.run([sys.executable.encode(), os.path.join(ROOT, "train_resnet32.py").encode(),
                             b"--run-name", b"\xff", b"--checkpoint-dir", str(tmp_path).encode()],
                            cwd=ROOT, capture_output=True, timeout=120)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2 and len(stderr.strip().splitlines()) == 1 and "--run-name" in stderr, stderr
    assert not os.listdir(tmp_path)


def write_bad_data(root, kind):
    """CIFAR-10 whose test batch is broken in one way."""
    import pickle
    write_cifar(str(root), per_file=8, test_images=10)
    folder = root / "cifar-10-batches-py"
    test = folder / "test_batch"
    batch = pickle.loads(test.read_bytes(), encoding="bytes")
    if kind == "ragged labels":
        batch[b"labels"] = [[1, 2], [3]] + batch[b"labels"][2:]
        test.write_bytes(pickle.dumps(batch, protocol=2))
    elif kind == "ragged images":
        batch[b"data"] = [[int(v) for v in row] for row in batch[b"data"][:3]] + [[1, 2]]
        test.write_bytes(pickle.dumps(batch, protocol=2))
    elif kind == "empty test batch":
        batch[b"data"], batch[b"labels"] = batch[b"data"][:0], []
        test.write_bytes(pickle.dumps(batch, protocol=2))
    elif kind in ("test_batch is a folder", "corrupt gzip"):
        if kind == "test_batch is a folder":
            test.unlink()
            test.mkdir()
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as archive:
            archive.add(folder, arcname="cifar-10-batches-py")
        shutil.rmtree(folder)
        if kind == "corrupt gzip":
            data = bytearray((root / "cifar-10-python.tar.gz").read_bytes())
            middle = len(data) // 2
            data[middle:middle + 64] = bytes(64)
            (root / "cifar-10-python.tar.gz").write_bytes(bytes(data))


@pytest.mark.parametrize("kind, words", [
    ("ragged labels", ["test_batch", "regular arrays"]),
    ("ragged images", ["test_batch", "regular arrays"]),
    ("empty test batch", ["test_batch", "no images"]),
    ("test_batch is a folder", ["test_batch", "not a file"]),
    ("corrupt gzip", ["cifar-10-python.tar.gz", "damaged"]),
])
def test_broken_data_files(tmp_path, kind, words):
    data = tmp_path / "data"
    write_bad_data(data, kind)
    before = snapshot(data)
    result = run_script("train_resnet32.py", *tiny(data, tmp_path / "out"))
    refused(result, 2, *words)
    assert snapshot(data) == before and not written(tmp_path / "out")
    assert not (tmp_path / "out" / "logs" / RUN).exists()  # no empty log folder for compare.py to trip on


def test_a_model_file_with_an_activation_object_is_refused(finished, cifar_dir, tmp_path):
    import zipfile
    source = finished / "checkpoints" / f"{RUN}.keras"
    path = tmp_path / "hostile.keras"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][-1]["config"]["activation"] = {"module": "os", "class_name": "system"}
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    result = run_script("train_resnet32.py", "--data-dir", cifar_dir, "--evaluate", path)
    refused(result, 2, "refusing to load", "hostile.keras")


def test_the_model_file_check_reads_a_bounded_amount(finished, tmp_path):
    """A .keras whose config.json inflates past the limit is refused from its header, without reading it."""
    import zipfile

    from resnet_cifar import checkpoints
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", b"[" * (checkpoints.MAX_MODEL_CONFIG + 10))
    assert os.path.getsize(path) < 2**20
    with pytest.raises(checkpoints.UsageError, match="larger than"):
        checkpoints.check_model_file(str(path))


@pytest.mark.slow
def test_a_second_process_on_the_same_run_stops_at_once(cifar_dir, tmp_path):
    first = start_script("train_resnet32.py", *tiny(cifar_dir, tmp_path, "--seed", "0", epochs=4))
    wait_until(first, (tmp_path / "checkpoints" / f"{RUN}.csv").exists)
    assert first.poll() is None, "the first run ended too early"
    start = time.monotonic()
    second = run_script("train_resnet32.py", *tiny(cifar_dir, tmp_path, "--seed", "1", "--overwrite"), timeout=60)
    assert time.monotonic() - start < 5 + 5  # its own Python start-up included; the refusal itself is instant
    refused(second, 2, "in progress in another process")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert [int(r["epoch"]) for r in history(tmp_path)] == [0, 1, 2, 3]
    config = json.loads((tmp_path / "checkpoints" / f"{RUN}.json").read_text())
    assert config["seed"] == 0 and config["epochs"] == 4
    assert len(os.listdir(tmp_path / "logs" / RUN / "train")) == 1


@pytest.mark.slow
def test_overwrite_starts_over(cifar_dir, run_copy):
    result = run_script("train_resnet32.py", *tiny(cifar_dir, run_copy, "--overwrite", "--seed", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_copy / "checkpoints" / f"{RUN}.json").read_text())["seed"] == 3
    assert len(history(run_copy)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_a_stop_signal_then_resume_equals_an_uninterrupted_run(cifar_dir, tmp_path, signum):
    """SIGTERM (or SLURM's warnings SIGUSR1, SIGUSR2) in the middle of epoch 2 of 3: one line naming the --resume
    command, exit 128 + the signal; the same command with --resume ends with 3 history rows equal to an
    uninterrupted run's."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    # batches of 8, one step per execution: 40 steps an epoch, each a moment where the signal is taken
    flags = ["--lr-schedule", "0:0.05,2:0.02", "--batch-size", "8", "--steps-per-execution", "1"]
    args = [*map(str, tiny(cifar_dir, stopped, *flags, epochs=3))]
    process = start_script("train_resnet32.py", *args)
    wait_until(process, lambda: history_rows(stopped / "checkpoints" / f"{RUN}.csv") >= 1)  # epoch 1 saved
    time.sleep(0.3)  # inside epoch 2
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert signal.Signals(signum).name in line and "--resume" in line
    assert [int(r["epoch"]) for r in history(stopped)] == [0]  # epoch 2 was under way: not saved

    if signum == signal.SIGUSR1:  # the same path from here on as the others: resumed and compared with them
        return
    resumed = run_script("train_resnet32.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = run_script("train_resnet32.py", *tiny(cifar_dir, straight, *flags, epochs=3))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    rows, expected = history(stopped), history(straight)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key in ("loss", "accuracy", "test_loss", "test_accuracy", "learning_rate"):
        np.testing.assert_allclose([float(r[key]) for r in rows], [float(r[key]) for r in expected], rtol=1e-4,
                                   err_msg=key)


def test_a_stray_connection_to_the_coordinator_is_ignored():
    """Process 0's rendezvous reads an index from each connection: anything else is dropped, not a crash."""
    import socket

    from resnet_cifar import distributed
    port = free_ports(1)[0]
    errors = []

    def process_zero():
        try:
            distributed.gather_processes(f"127.0.0.1:{port}", 2, 0, 30)
        except BaseException as error:  # noqa: B036 (reported below)
            errors.append(error)
    thread = threading.Thread(target=process_zero)
    thread.start()
    for message in (b"GET /\r\n", b"99", b""):
        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as stray:
                    stray.sendall(message)
                break
            except OSError:
                time.sleep(0.1)
    distributed.gather_processes(f"127.0.0.1:{port}", 2, 1, 30)  # the real process 1
    thread.join(timeout=60)
    assert not errors, errors


def mount_tmpfs(folder, megabytes):
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}): full-disk cases need root")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_checkpoint_dir_is_refused_before_training(cifar_dir, small_disk):
    mount_tmpfs(small_disk, 2)
    result = run_script("train_resnet32.py", *tiny(cifar_dir, small_disk))
    refused(result, 2, "is full", "MB free")


@pytest.mark.slow
def test_a_disk_that_fills_during_the_run_ends_it_in_one_line(cifar_dir, small_disk):
    """The disk fills after epoch 1: exit 1, one line naming the folder and the free space, and the state
    saved after epoch 1 still loads."""
    from resnet_cifar import checkpoints
    mount_tmpfs(small_disk, 40)
    process = start_script("train_resnet32.py", *tiny(cifar_dir, small_disk, epochs=6))
    state = small_disk / "checkpoints" / f"{RUN}.state.weights.h5"
    wait_until(process, state.exists)
    with open(small_disk / "filler", "wb") as filler:  # everything but a few kilobytes
        free = shutil.disk_usage(small_disk).free
        filler.write(b"\0" * max(free - 16 * 1024, 0))
    _, stderr = process.communicate(timeout=600)
    line = refused(types.SimpleNamespace(returncode=process.returncode, stderr=stderr), 1, "no space left", str(small_disk), "MB free", "--resume")
    assert "training failed" in line
    saved = checkpoints.SavedState.read(str(state))
    assert len(saved.history) >= 1


@pytest.mark.slow
def test_a_lost_jax_worker_ends_the_other_in_one_line(cifar_dir, tmp_path):
    """Two JAX processes; process 1 is killed after epoch 1: process 0 ends with exit 1 and one line."""
    port = free_ports(1)[0]
    env = {**os.environ, "KERAS_BACKEND": "jax",
           "PYTHONPATH": os.pathsep.join(filter(None, [NO_TENSORFLOW, os.environ.get("PYTHONPATH")]))}
    processes = []
    for i in range(2):
        out = tmp_path / f"p{i}"
        args = [*map(str, tiny(cifar_dir, out, "--distribute", "--wait-timeout", "60", "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), epochs=50))]
        processes.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "train_resnet32.py"), *args], cwd=ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    csv_path = tmp_path / "p0" / "checkpoints" / f"{RUN}.csv"
    deadline = time.time() + 300
    while time.time() < deadline and processes[0].poll() is None and history_rows(csv_path) < 1:  # epoch 1 done
        time.sleep(0.1)
    # the scenario itself: both processes up and an epoch trained together, the run still going
    assert processes[0].poll() is None and processes[1].poll() is None, processes[0].communicate()[1][-3000:]
    assert history_rows(csv_path) >= 1
    processes[1].kill()
    processes[1].communicate()
    _, stderr = processes[0].communicate(timeout=300)
    refused(types.SimpleNamespace(returncode=processes[0].returncode, stderr=stderr), 1, "training failed")
    assert history_rows(csv_path) < 50  # it ended early, on the loss of its peer


@pytest.mark.slow
def test_resume_with_more_epochs_continues_the_run_saved_with_fewer(cifar_dir, tmp_path):
    """The default run name holds --epochs (_e2): `--epochs 3 --resume` after a finished 2-epoch run trains
    exactly epoch 3, in that run's files, and says so."""
    common = ["--data-dir", cifar_dir, "--stack-n", "1", "--batch-size", "32", "--log-dir", tmp_path / "logs",
              "--checkpoint-dir", tmp_path / "checkpoints", "--verbose", "2"]
    first = run_script("train_resnet32.py", *common, "--epochs", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    name = final_fields(first.stdout)["run"]
    assert "_e2" in name
    before = (tmp_path / "checkpoints" / f"{name}.csv").read_text().splitlines()
    more = run_script("train_resnet32.py", *common, "--epochs", "3", "--resume")
    assert more.returncode == 0, more.stderr[-2000:]
    assert f"resuming run {name} (saved with other --epochs) to 3 epochs" in more.stdout
    assert "Epoch 3/3" in more.stdout and "Epoch 1/3" not in more.stdout and "Epoch 2/3" not in more.stdout
    after = (tmp_path / "checkpoints" / f"{name}.csv").read_text().splitlines()
    assert after[:3] == before and len(after) == 4 and after[3].startswith("2,")
    assert not list((tmp_path / "checkpoints").glob("*_e3.*"))  # no second run started

"""Resume after SIGKILL, atomic checkpoints, NaN stops, mismatched resumes."""
import csv
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from resnet_cifar import checkpoints, outputs
from conftest import ROOT, compile_for, final_fields, history_rows, parse, run_script, start_script, wait_until

RUN = "resnet8_e_cifar10"
EPOCHS = 4


def tiny_run(cifar_dir, out, *extra):
    return ["--data-dir", cifar_dir, "--stack-n", "1", "--batch-size", "32", "--epochs", EPOCHS,
            "--run-name", RUN, "--log-dir", out / "logs", "--checkpoint-dir", out / "checkpoints", *extra]


def history(out):
    with open(out / "checkpoints" / f"{RUN}.csv") as f:
        return list(csv.DictReader(f))


def tensorboard_steps(out):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    steps = {}
    for split in ("train", "test"):
        for path in glob.glob(str(out / "logs" / RUN / split / "events.out.tfevents.*")):
            for event in EventFileLoader(path).Load():
                for value in event.summary.value:
                    steps.setdefault((split, value.tag), []).append(event.step)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
def test_sigkill_mid_epoch_then_resume(cifar_dir, tmp_path, backend):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    process = start_script("train_resnet32.py", *tiny_run(cifar_dir, killed), backend=backend)
    wait_until(process, lambda: history_rows(killed / "checkpoints" / f"{RUN}.csv") >= 1)  # kill inside epoch 2
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(history(killed))
    assert 1 <= done_before < EPOCHS

    resumed = run_script("train_resnet32.py", *tiny_run(cifar_dir, killed, "--resume"), backend=backend)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {RUN} after epoch {done_before}" in resumed.stdout
    assert final_fields(resumed.stdout)["epochs"] == str(EPOCHS)
    rows = history(killed)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))  # none lost, none repeated
    for steps in tensorboard_steps(killed).values():
        assert steps == list(range(EPOCHS))
    assert not glob.glob(str(killed / "checkpoints" / ".tmp-*"))

    # the same run uninterrupted: same learning rates, same data order and augmentation, same numbers
    uninterrupted = run_script("train_resnet32.py", *tiny_run(cifar_dir, straight), backend=backend)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    for key in ("loss", "accuracy", "test_loss", "learning_rate"):
        np.testing.assert_allclose([float(r[key]) for r in rows], [float(r[key]) for r in history(straight)],
                                   rtol=1e-3, err_msg=key)


KILL_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from resnet_cifar import outputs
def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
outputs.atomic_write({path!r}, write)
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    import train_resnet32
    from resnet_cifar.cifar_resnet import resnet
    model = resnet(1)
    args = parse(train_resnet32, [])
    compile_for(model, args, 2)
    model.optimizer.build(model.trainable_variables)
    config = {"model": model.name, "params": model.count_params(), "dataset": "cifar10", "train_images": 64,
              "batch_size": 32, "seed": 0, "precision": "float32", "lr_schedule": "0:0.1", "weight_decay": 1e-4,
              "val_split": None, **checkpoints.OPTION_RESUME_KEYS, "init_seed": 0, "data_seed": 0, "epochs": 2}
    path = str(tmp_path / f"{RUN}.state.weights.h5")
    rows = [{"epoch": 0, "loss": 1.0}]
    checkpoints.save_state(model, path, rows, config)
    before = os.path.getsize(path)

    killed = subprocess.run([sys.executable, "-c", KILL_MID_WRITE.format(root=ROOT, path=path)])
    assert killed.returncode == -signal.SIGKILL
    assert glob.glob(str(tmp_path / ".tmp-*"))  # the half-written file exists, under another name
    assert os.path.getsize(path) == before

    fresh = resnet(1)
    compile_for(fresh, args, 2)
    saved = checkpoints.SavedState.read(path)
    saved.check(config)
    assert saved.restore(fresh) == rows
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    outputs.remove_stale_temporaries(str(tmp_path), {f"{RUN}0.state.weights.h5"})  # another run's: kept
    assert glob.glob(str(tmp_path / ".tmp-*"))
    outputs.remove_stale_temporaries(str(tmp_path), {f"{RUN}.state.weights.h5"})
    assert not glob.glob(str(tmp_path / ".tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_nan_loss_stops_with_the_epoch_and_last_checkpoint(cifar_dir, tmp_path, backend):
    """The async-safe NaN stop (training.StopOnNaN): on JAX its check runs on Keras's worker thread."""
    result = run_script("train_resnet32.py", *tiny_run(cifar_dir, tmp_path, "--lr-schedule", "0:0.05,1:1e30"),
                        backend=backend, block_tensorflow=backend != "tensorflow")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if "train_resnet32.py:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = lines[0]
    assert "training failed" in line and "in epoch 2" in line and f"{RUN}.state.weights.h5 (epoch 1)" in line
    assert [int(r["epoch"]) for r in history(tmp_path)] == [0]
    assert not os.path.exists(tmp_path / "checkpoints" / f"{RUN}.h5")


@pytest.mark.slow
def test_resume_refuses_another_configuration(cifar_dir, tmp_path):
    first = run_script("train_resnet32.py", *tiny_run(cifar_dir, tmp_path, "--epochs", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    state = tmp_path / "checkpoints" / f"{RUN}.state.weights.h5"
    before = state.read_bytes()
    result = run_script("train_resnet32.py", *tiny_run(cifar_dir, tmp_path, "--resume", "--seed", "7"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "cannot resume" in line and "seed (0 vs 7 now)" in line and "Traceback" not in result.stderr
    assert state.read_bytes() == before


BOUND_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import keras, numpy as np
import train_resnet32
from resnet_cifar import training
from conftest import compile_for, parse
args = parse(train_resnet32, ["--stack-n", "1", "--lr-schedule", "0:1e30", "--steps-per-execution", "1"])
model = train_resnet32.resnet(1)
compile_for(model, args, 100)
seen = []
counter = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: seen.append(batch))
x = np.random.default_rng(0).integers(0, 256, (100 * 8, 32, 32, 3)).astype("uint8")
model.fit(x, np.zeros(len(x), "int32"), batch_size=8, epochs=1, verbose=0,
          callbacks=[training._stop_on_nan_class()(), counter])
print("STEPS", len(seen), training.MAX_UNCHECKED_EXECUTIONS, model.stop_training)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_nan_stops_the_epoch_within_the_bound(backend):
    """Inside one fit() of 100 steps, the loss turns NaN at the second step (the first update, at a learning
    rate of 1e30): the epoch stops within MAX_UNCHECKED_EXECUTIONS + 2 steps, on TensorFlow (callbacks on
    the main thread) and on JAX (async dispatch, the check on Keras's worker thread)."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    code = BOUND_SCRIPT.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    _, steps, limit, stopped = result.stdout.strip().splitlines()[-1].split()
    assert stopped == "True" and 2 <= int(steps) <= int(limit) + 2, result.stdout

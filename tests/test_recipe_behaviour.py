"""The recipe checked by what it does, not by what it is configured to do: each residual unit's layers in the order
of the papers' figure (read from the built graph), the rate the optimizer actually uses at every step around
the schedule's boundaries, weight decay in the loss and in the gradients, a fresh training order every epoch
that the loop really feeds, CIFAR-100's fine labels from a file written here without the loader's table, and
the real script killed in the middle of writing its resume state on every backend."""
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

from resnet_cifar import cifar_data, recipe
import train_resnet32
import train_resnet_variants
from conftest import NO_TENSORFLOW, ROOT, build, parse, run_script

# He et al. 2016, Fig. 4: the layers of a residual unit from its input to its output, the branch then what
# follows the addition (written from the figure, not from units.UNITS).
FIGURE_4 = {
    "a": ["Conv2D", "BatchNormalization", "relu", "Conv2D", "BatchNormalization", "Add", "relu"],  # original
    "b": ["Conv2D", "BatchNormalization", "relu", "Conv2D", "Add", "BatchNormalization", "relu"],  # BN after add
    "c": ["Conv2D", "BatchNormalization", "relu", "Conv2D", "BatchNormalization", "relu", "Add"],  # ReLU before add
    "d": ["relu", "Conv2D", "BatchNormalization", "relu", "Conv2D", "BatchNormalization", "Add"],  # ReLU-only pre-act
    "e": ["BatchNormalization", "relu", "Conv2D", "BatchNormalization", "relu", "Conv2D", "Add"],  # full pre-act
}


def kind(layer):
    if type(layer).__name__ == "Activation":
        return layer.get_config()["activation"]
    return "BatchNormalization" if "BatchNormalization" in type(layer).__name__ else type(layer).__name__


def unit_path(model, prefix):
    """The layers of the unit named `prefix`, walked through the graph backwards from its last layer along the
    residual branch (at the addition, the input made inside the unit), then reversed."""
    inside = [layer for layer in model.layers if layer.name.startswith(prefix + "_")]
    layer, path = inside[-1], []
    while layer in inside:
        path.append(layer)
        parents = [t._keras_history.operation for t in layer._inbound_nodes[0].input_tensors]
        layer = next((p for p in parents if p in inside), None)
    return [kind(layer) for layer in reversed(path)]


@pytest.mark.parametrize("unit", sorted(FIGURE_4))
def test_each_unit_is_the_papers_figure(unit):
    model = build(train_resnet_variants, ["--unit", unit, "--stack-n", "2"])
    assert unit_path(model, "stage2_unit2") == FIGURE_4[unit]  # a unit with an identity shortcut


def tiny_model():
    import keras
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))


def test_the_optimizer_uses_each_rate_from_the_first_step_of_its_epoch():
    """The rate the optimizer applies at every step (read at the start of each step of a real fit, one step per
    execution): the schedule's epoch rate, switching exactly at the first step of the boundary epoch."""
    import keras
    schedule, steps_per_epoch = ((0, 0.1), (2, 0.01), (3, 0.001)), 5
    model = tiny_model()
    recipe.compile_model(model, schedule, steps_per_epoch, 1)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append((self.epoch, batch, float(np.asarray(self.model.optimizer.learning_rate))))

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
    x = np.random.default_rng(0).normal(size=(steps_per_epoch * 4, 4)).astype("float32")
    y = np.arange(len(x)) % 3
    model.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0, callbacks=[Record()])
    assert len(seen) == 5 * steps_per_epoch
    for epoch, batch, rate in seen:
        assert rate == pytest.approx(recipe.lr_at_epoch(schedule, epoch), rel=1e-6), (epoch, batch)
    assert int(model.optimizer.iterations) == 5 * steps_per_epoch


@pytest.mark.parametrize("decay", [1e-4, 0.0])
def test_weight_decay_is_in_the_loss_and_the_gradients(decay):
    """loss(decay) - loss(0) = decay * sum of squared kernels (every convolution and the classifier), and each
    kernel's gradient differs by 2 * decay * kernel; with --weight-decay 0, no term at all."""
    import tensorflow as tf
    models = [build(train_resnet32, ["--stack-n", "1", "--weight-decay", str(d)]) for d in (decay, 0.0)]
    models[1].set_weights(models[0].get_weights())
    for model in models:
        recipe.compile_model(model, ((0, 0.1),), 1, 1)
    x = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 3])
    losses, gradients = [], []
    for model in models:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=False), training=False)
        losses.append(float(loss))
        gradients.append(tape.gradient(loss, model.trainable_variables))
    kernels = [layer.kernel for layer in models[0].layers if type(layer).__name__ in ("Conv2D", "Dense")]
    assert len(kernels) == 1 + 3 * 2 + 2 + 1  # ResNet-8: the stem, two per unit, two projections, the classifier
    squares = sum(float(np.sum(np.square(k))) for k in kernels)
    assert losses[0] - losses[1] == pytest.approx(decay * squares, rel=1e-3, abs=1e-7)
    by_name = {v.path: (g0, g1) for v, g0, g1 in zip(models[0].trainable_variables, *gradients)}
    for k in kernels:
        g_decay, g_none = by_name[k.path]
        # float32 gradients of order 1 differ by their rounding (measured up to 2e-7) besides the decay term
        # (2e-4 * kernel: about 3e-5 for the classifier's he_normal kernel)
        np.testing.assert_allclose(np.asarray(g_decay) - np.asarray(g_none), 2 * decay * np.asarray(k),
                                   rtol=1e-3, atol=1e-6)


def test_the_training_order_is_fresh_every_epoch_and_a_function_of_seed_and_epoch():
    from resnet_cifar.training import epoch_order
    orders = {(s, e): epoch_order(s, e, 320, 320) for s in (0, 1) for e in (0, 1)}
    for order in orders.values():
        assert sorted(order) == list(range(320))
    assert not np.array_equal(orders[0, 0], orders[0, 1]) and not np.array_equal(orders[0, 0], orders[1, 0])
    np.testing.assert_array_equal(epoch_order(0, 1, 320, 320), orders[0, 1])


def test_the_loop_feeds_each_epoch_its_own_order(cifar_dir, tmp_path, monkeypatch):
    """What the training loop hands Keras, epoch by epoch: the training labels in epoch_order(seed, epoch)."""
    import signal as signals

    import common
    from resnet_cifar import training
    fed = []
    original = training.batches

    def recording(x, y, batch_size, plain=False):
        fed.append(np.array(y))
        return original(x, y, batch_size, plain)
    monkeypatch.setattr(training, "batches", recording)
    handlers = {s: signals.getsignal(s) for s in (signals.SIGTERM, signals.SIGUSR1, signals.SIGUSR2)}
    try:
        common.main(train_resnet32.FAMILY, argv=[  # the script's own entry, in this process
                        "--data-dir", str(cifar_dir), "--stack-n", "1", "--batch-size", "32", "--epochs", "2",
                        "--seed", "5", "--log-dir", str(tmp_path / "logs"),
                        "--checkpoint-dir", str(tmp_path / "checkpoints")])
    finally:
        for s, handler in handlers.items():
            signals.signal(s, handler)
    (_, y_train), _, _ = cifar_data.load_data(parse(train_resnet32, ["--data-dir", str(cifar_dir)]))
    train = [y for y in fed if len(y) == len(y_train)]
    assert len(train) == 2
    for epoch, y in enumerate(train):
        np.testing.assert_array_equal(y, y_train[training.epoch_order(5, epoch, len(y_train), len(y_train))])
    assert not np.array_equal(train[0], train[1])


def write_cifar100_by_hand(root, n=100):
    """CIFAR-100's python layout written from its published description, not from cifar_data.DATASETS: files
    train / test / meta in cifar-100-python, labels under b'fine_labels' (0-99) and b'coarse_labels' (0-19)."""
    rng = np.random.default_rng(7)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    fine = {}
    for name in ("train", "test"):
        fine[name] = rng.permutation(np.arange(n) % 100)
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"fine_labels": [int(v) for v in fine[name]], b"coarse_labels": [int(v) // 5 for v in fine[name]],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)], b"batch_label": name.encode()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [b"c%d" % i for i in range(100)],
                     b"coarse_label_names": [b"s%d" % i for i in range(20)]}, f, protocol=2)
    return fine


def test_cifar100_reads_the_fine_labels_of_an_independently_written_file(tmp_path):
    fine = write_cifar100_by_hand(str(tmp_path))
    config = parse(train_resnet32, ["--dataset", "cifar100", "--data-dir", str(tmp_path)])
    (_, y), (_, y_test), _ = cifar_data.load_data(config)
    np.testing.assert_array_equal(y.ravel(), fine["train"])
    np.testing.assert_array_equal(y_test.ravel(), fine["test"])


# Runs a family script with h5py's File patched to SIGKILL the process the moment the resume state of epoch 2
# is opened to add its record (the weights already written, the record not): a kill at a known point of the
# write, the same on every backend.
KILL_IN_SECOND_STATE_WRITE = """
import os, runpy, signal, sys
import h5py
opened = []
original = h5py.File.__init__

def init(self, name, mode="r", *args, **kwargs):
    if str(name).endswith(".state.weights.h5") and mode == "a":
        opened.append(name)
        if len(opened) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    original(self, name, mode, *args, **kwargs)

h5py.File.__init__ = init
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_the_script_killed_while_writing_its_state_resumes(cifar_dir, tmp_path, backend):
    args = ["--data-dir", cifar_dir, "--stack-n", "1", "--batch-size", "32", "--epochs", "3", "--run-name", "r",
            "--log-dir", tmp_path / "logs", "--checkpoint-dir", tmp_path / "checkpoints"]
    env = {**os.environ, "KERAS_BACKEND": backend}
    if backend != "tensorflow":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [NO_TENSORFLOW, env.get("PYTHONPATH")]))
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_STATE_WRITE, os.path.join(ROOT, "train_resnet32.py"),
                             *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_script("train_resnet32.py", *args, "--resume", backend=backend,
                         block_tensorflow=backend != "tensorflow")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(tmp_path / "checkpoints" / "r.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["0", "1", "2"]

"""The speed measures of the training path (README "Performance") change no numbers: the fused
BatchNormalization used on TensorFlow's CPU computes what Keras's does, checkpoints hold Keras's own
classes, and the tf.data pipeline feeds exactly the arrays, in order."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from resnet_cifar import recipe
import train_resnet32
from resnet_cifar import speedups, units
from conftest import build

TENSORFLOW_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend only")


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def forward_and_backward(layer, x, weights):
    import tensorflow as tf
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(tf.cast(x, layer.compute_dtype), training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") * weights)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [np.asarray(tf.cast(t, "float32")) for t in (y, *grads, layer.moving_mean, layer.moving_variance,
                                                           layer(x, training=False))]


@TENSORFLOW_ONLY
@pytest.mark.parametrize("precision, rtol", [("float32", 1e-5), ("mixed_bfloat16", 1e-2)])
def test_fused_batch_normalization_computes_what_keras_does(policy, precision, rtol):
    import tensorflow as tf
    fused = speedups.batch_normalization_class()
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("the fused class is used on TensorFlow's CPU only")
    assert fused is not keras.layers.BatchNormalization and issubclass(fused, keras.layers.BatchNormalization)
    policy(precision)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (8, 6, 6, 16)).astype("float32"))
    weights = tf.constant(rng.normal(0.0, 1.0, (8, 6, 6, 16)).astype("float32"))
    gamma = rng.normal(1.0, 0.2, 16).astype("float32")
    results = []
    for cls in (keras.layers.BatchNormalization, fused):
        layer = cls(momentum=recipe.BN_MOMENTUM, epsilon=recipe.BN_EPSILON)
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(gamma - 1.0)
        results.append(forward_and_backward(layer, x, weights))
    names = ["output", "input gradient", "gamma gradient", "beta gradient", "moving mean", "moving variance",
             "inference output"]
    for name, expected, got in zip(names, *results):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max(), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("extension", [".h5", ".keras"])
def test_saved_checkpoint_loads_in_plain_keras(trained, extension):
    """The .h5 and .keras of a real run load in a Python that cannot import this project, with Keras's own
    classes, on another backend than the one that trained it."""
    backend, out, _ = trained
    path = out / "checkpoints" / f"resnet8_e_cifar10{extension}"
    code = ("import sys, keras; m = keras.models.load_model(sys.argv[1], compile=False); "
            "print(sorted({type(l).__module__.split('.')[0] for l in m.layers}), m.count_params())")
    loader = {"tensorflow": "jax", "jax": "tensorflow", "torch": "jax"}[backend]
    env = {**os.environ, "KERAS_BACKEND": loader, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=out, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['keras'] 78666"


def test_model_converts_between_batch_norm_classes_keeping_weights():
    model = build(train_resnet32, ["--stack-n", "1"])
    plain = units.with_batch_normalization(model, keras.layers.BatchNormalization)
    norms = [layer for layer in plain.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(type(layer) is keras.layers.BatchNormalization for layer in norms)
    assert [layer.name for layer in plain.layers] == [layer.name for layer in model.layers]
    for a, b in zip(model.weights, plain.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert units.with_batch_normalization(plain, keras.layers.BatchNormalization) is plain


@TENSORFLOW_ONLY
def test_tf_data_batches_are_the_arrays_in_order():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 32, 32, 3)).astype("uint8")
    y = rng.integers(0, 10, 100).astype("int32")
    data = speedups.batches(x, y, 32)
    assert data.y is None and data.batch_size is None
    assert not data.x.options().autotune.enabled
    got = list(data.x.as_numpy_iterator())
    assert [len(b[0]) for b in got] == [32, 32, 32, 4] and got[0][0].dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), y)


@TENSORFLOW_ONLY
@pytest.mark.parametrize("nesterov", [True, False])
def test_fused_momentum_update_trains_to_the_same_weights(nesterov):
    """speedups.fused_momentum_update: TensorFlow's fused kernel gives Keras's SGD's weights bit for bit,
    with one update op per variable in the traced step instead of Keras's several."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (64, 8)).astype("float32"), rng.integers(0, 4, 64).astype("int32")
    results, update_ops = [], []
    for fused in (False, True):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
        optimizer = keras.optimizers.SGD(schedule, momentum=recipe.MOMENTUM, nesterov=nesterov)
        if fused:
            speedups.fused_momentum_update(optimizer)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append([w.numpy() for w in model.weights + optimizer.momentums])
        ones = [tf.ones_like(v) for v in model.trainable_variables]
        graph = tf.function(lambda: optimizer.apply(ones, model.trainable_variables)).get_concrete_function().graph
        update_ops.append(sorted(op.type for op in graph.get_operations()
                                 if "Variable" in op.type or "Apply" in op.type))
    assert update_ops[1].count("ResourceApplyKerasMomentum") == 4 and "ResourceApplyKerasMomentum" not in update_ops[0]
    assert len(update_ops[1]) < len(update_ops[0]) - 4, update_ops
    assert len(results[0]) == 8 and not np.array_equal(results[0][0], results[0][0] * 0)
    for expected, got in zip(*results):
        np.testing.assert_array_equal(got, expected)


START_AND_LIST = """
import importlib.util, sys
from resnet_cifar import devices, speedups
backend = devices.configure_backend()
installed = [n for n in speedups.UNUSED_AT_IMPORT
             if backend not in speedups.NEEDED_BY.get(n, ()) and importlib.util.find_spec(n)]
print(backend, installed, [n for n in installed if n in sys.modules])
import matplotlib.pyplot
print("importable after:", "matplotlib.pyplot" in sys.modules)
"""


def test_framework_start_leaves_out_unused_packages():
    """speedups.without_unused_imports: starting the framework imports none of the optional packages Keras
    would pull in (matplotlib, IPython, JAX unless it is the backend, scipy on TensorFlow), and they import
    normally afterwards."""
    result = subprocess.run([sys.executable, "-c", START_AND_LIST], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith(keras.backend.backend()) and "'matplotlib'" in lines[-2]  # matplotlib: requirements.txt
    assert lines[-2].endswith(" []"), lines[-2]
    assert lines[-1] == "importable after: True"


@TENSORFLOW_ONLY
def test_each_step_is_traced_once():
    """speedups.build_before_first_step: the training and the evaluation step each traced once (Keras alone
    traces the first step twice on TensorFlow, the compiled metrics' variables being created in its first trace)."""
    from resnet_cifar import training
    model = build(train_resnet32, ["--stack-n", "1"])
    recipe.compile_model(model, recipe.parse_lr_schedule("0:0.1"), 2, 2)
    traces = {"train": 0, "test": 0}

    def counting(kind, step):
        def counted(data):
            traces[kind] += 1
            return step(data)
        return counted
    model.train_step = counting("train", model.train_step)
    model.test_step = counting("test", model.test_step)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 32, 32, 3)).astype("uint8"), rng.integers(0, 10, 64).astype("int32")
    data = speedups.batches(x, y, 16)
    training.run_epoch(model, data, data, 0, 1)
    training.run_epoch(model, data, data, 1, 2)
    assert traces == {"train": 1, "test": 1}


RELEASE_ON_TORCH = """
import json, sys, weakref
import numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import keras, torch, train_resnext
from resnet_cifar import speedups
from conftest import build
from keras.src.models.functional import operation_fn
model = build(train_resnext, ["--cardinality", "2", "--width", "4"])
x = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32"))


def peak_alive():
    outputs, peak = [], 0

    def spy(operation):
        def run(*args, **kwargs):
            nonlocal peak
            y = operation_fn(operation, training=False)(*args, **kwargs)
            outputs.extend(weakref.ref(t) for t in keras.tree.flatten(y))
            peak = max(peak, sum(ref() is not None for ref in outputs))
            return y
        return run
    with torch.no_grad():
        y = model._run_through_graph([x], operation_fn=spy)
    return peak, y.numpy()


before, expected = peak_alive()
speedups.release_activations(model)
after, got = peak_alive()
with torch.no_grad():
    called = model(x, training=False).numpy()
print(json.dumps({{"layers": len(model.layers), "before": before, "after": after,
                  "same": bool(np.array_equal(got, expected) and np.array_equal(called, expected))}}))
"""


@pytest.mark.slow
def test_torch_forward_keeps_only_live_layer_outputs():
    """speedups.release_activations: on PyTorch a layer's output is dropped after its last reader (Keras
    alone keeps every one until the forward pass ends), with the same predictions."""
    code = RELEASE_ON_TORCH.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   tests=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KERAS_BACKEND": "torch"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert seen["same"]
    assert seen["before"] >= seen["layers"] - 1  # Keras alone: every layer's output alive at the end
    assert seen["after"] <= 6, seen  # a unit's input, its branch's current outputs, the shortcut


@pytest.mark.parametrize("script, argv", [(train_resnet32, ["--stack-n", "2"])])
def test_live_bytes_count_the_widest_moment_not_every_layer(script, argv):
    model = build(script, argv)
    every_layer = sum(4 * int(np.prod(layer.output.shape[1:])) for layer in model.layers)
    unit_output = 4 * 32 * 32 * 16
    live = speedups.live_bytes_per_image(model)
    assert 2 * unit_output <= live <= 6 * unit_output < every_layer / 4


def test_a_patch_outside_its_verified_versions_is_skipped_with_one_line(monkeypatch, capsys):
    """workarounds.verified: a Keras outside VERIFIED skips the entry (the stock path runs), one line once."""
    from resnet_cifar import workarounds
    workarounds.verified.cache_clear()
    monkeypatch.setitem(workarounds.VERIFIED, "keras", ((9, 0), (9, 1)))
    try:
        assert workarounds.verified("fuse_steps") is False
        assert workarounds.verified("fuse_steps") is False
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "fuse_steps skipped" in lines[0] and keras.__version__ in lines[0], lines
        if keras.backend.backend() == "tensorflow":  # and the patch is not applied: Keras's own class
            speedups.batch_normalization_class.cache_clear()
            assert speedups.batch_normalization_class() is keras.layers.BatchNormalization
    finally:
        monkeypatch.undo()
        workarounds.verified.cache_clear()
        speedups.batch_normalization_class.cache_clear()
    assert workarounds.verified("fuse_steps") is True

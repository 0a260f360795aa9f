"""The workarounds without which training breaks: limits or bugs of Keras, TensorFlow and tensorboard, one
entry each; the speed and memory patches are in speedups.py.

Each entry says the symptom, the versions it was seen with (Keras 3.15.1, TensorFlow 2.21.0, JAX 0.10.2 unless
said otherwise) and when to remove it. An entry that reaches into private Keras or TensorFlow API runs only on
the versions it was verified on (VERIFIED, checked through `verified`); elsewhere it is skipped, the stock path
runs, and one line on stderr names the entry and the version. Import-safe: the frameworks are imported inside
the functions.

1. prepare_multi_worker_fit  fit() fails under MultiWorkerMirroredStrategy (keras-team/keras#20585).
2. steps_per_execution_limit  the multi-step loop fails inside MirroredStrategy; torch refuses N > 1.
3. RECURSION_LIMIT       Keras walks the layer graph recursively: ResNet-1001 needs ~10,000 frames.
4. tensorboard_without_tensorflow  tensorboard's event writer imports TensorFlow when it is installed.
5. without_tensorflow    set_random_seed, the .h5 loader and serialization import TensorFlow on any backend.
6. keep_weights_after_fit  with EMA, every fit() ends by overwriting the weights with their average.
"""
import contextlib
import functools
import importlib.metadata
import re
import sys

# The versions every entry touching private API was verified on: [first, last) as (major, minor). Keras 3.14.0
# (CI's oldest-Keras environment, .ci/run) and 3.15.1; TensorFlow 2.21.0. Widen a range only after the full test
# suite passed on the new version (tests/test_fast_path.py holds each patch's own check).
VERIFIED = {"keras": ((3, 14), (3, 16)), "tensorflow": ((2, 21), (2, 22))}


def _minor_version(package):
    return tuple(int(part) for part in re.findall(r"\d+", importlib.metadata.version(package))[:2])


@functools.cache
def verified(entry, tensorflow=False):
    """True when the installed Keras (and TensorFlow, for an entry that patches it) is within VERIFIED; else
    False, after one line on stderr (once per entry) naming the entry and the version."""
    for package in ("keras", "tensorflow") if tensorflow else ("keras",):
        version = _minor_version(package)
        low, high = VERIFIED[package]
        if not low <= version < high:
            print(f"note: {entry} skipped: verified on {package} {low[0]}.{low[1]} to below {high[0]}.{high[1]}, "
                  f"found {importlib.metadata.version(package)} (the stock Keras path runs; see "
                  "resnet_cifar/workarounds.py)", file=sys.stderr)
            return False
    return True


# 1. Two bugs of Keras 3.15 with MultiWorkerMirroredStrategy (keras-team/keras#20585), worked around through
# two private hooks (model._symbolic_build, model._maybe_symbolic_build):
# - TensorFlow's fit() first reduces the first batch across replicas with strategy.reduce("MEAN") to build the
#   compile state, which MultiWorkerMirroredStrategy cannot do across workers ("Attempt to convert a value
#   (PerReplica...)"): the state is built once in the strategy's scope from the batch's shapes instead;
# - every step's logs are reduced with strategy.reduce("MEAN", axis=0), which fails on scalars ("Invalid
#   reduction dimension 0"): each replica's step returns its logs as 1-element vectors.
# Remove when tests/test_multiworker.py passes without it (the issue closed, or a Keras upgrade changes the
# hooks: that test then fails first).
def prepare_multi_worker_fit(model, batch_size, processes):
    import keras
    if processes == 1 or keras.backend.backend() != "tensorflow" or not verified("prepare_multi_worker_fit"):
        return
    model._symbolic_build(data_batch=(keras.KerasTensor((batch_size, 32, 32, 3), "uint8"),
                                      keras.KerasTensor((batch_size,), "int32")))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    for name in ("train_step", "test_step"):
        setattr(model, name, functools.partial(_logs_as_vectors, getattr(model, name)))


def _logs_as_vectors(step, data):
    import tensorflow as tf
    return tf.nest.map_structure(lambda value: tf.reshape(value, [1]), step(data))


# 2. Steps per execution the backend can run. Inside TensorFlow's MirroredStrategy, Keras 3.15's multi-step
# loop fails ("Detected at node while/cond/Placeholder"); Keras on PyTorch refuses anything but 1
# ("steps_per_execution must be 1 with the PyTorch backend"). Remove an entry when Keras lifts that limit
# (a two-device --distribute run with --steps-per-execution 4, or a torch run with 4, then succeeds).
def steps_per_execution_limit(backend, distribute):
    """(the most steps per execution, why) for this backend and mode; (None, None) when unlimited."""
    if backend == "torch":
        return 1, "Keras runs one step per execution on the PyTorch backend"
    if backend == "tensorflow" and distribute:
        return 1, "Keras's multi-step loop fails inside TensorFlow's MirroredStrategy"
    return None, None


# 3. Keras builds, saves and loads a functional model by walking its layer graph recursively, a few Python
# frames per layer: ResNet-1001's 3,000+ layers need about 10,000. Python's default limit is 1,000 and importing
# TensorFlow sets it to 3,000, so devices.configure_backend raises it after the framework is imported.
# Remove when Keras walks the graph iteratively (ResNet-1001 then saves and loads at the default limit).
RECURSION_LIMIT = 20_000


# 4. tensorboard's event writer (tensorboard.summary.writer) reaches the file system through tensorboard.compat.tf,
# which imports TensorFlow whenever it is installed (tensorboard 2.21): a JAX or PyTorch run then starts
# TensorFlow, prints its start-up lines and takes its memory. tensorboard's own switch for its pure-Python stub is
# the presence of a module named tensorboard.compat.notf (its "no_tensorflow" build target): registered here,
# before the writer is imported. Remove when tensorboard's writer stops importing TensorFlow.
def tensorboard_without_tensorflow():
    import types
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


# 5. Keras 3.15 imports TensorFlow whenever it is installed, whatever the backend, in set_random_seed (to seed
# tf.random too), in the .h5 loader's JSON decoding (to rebuild TensorShapes) and in serialize_keras_object (to
# test for a TensorShape: every get_config of a layer's dtype policy, so cloning or saving a model): a JAX or
# PyTorch run or --evaluate then starts TensorFlow (its start-up lines, its memory). On those backends they run
# with TensorFlow's import refused for the call (Keras then skips its TensorFlow part; nothing of it is used
# there; Keras remembers the refusal for the rest of the process). Remove when
# Keras asks for TensorFlow only on the TensorFlow backend (a torch run's sys.modules then never holds it:
# tests/test_training.py).
@contextlib.contextmanager
def without_tensorflow():
    import keras
    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        yield
        return
    sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError for the length of the call
    try:
        yield
    finally:
        del sys.modules["tensorflow"]


def set_random_seed(seed):
    import keras
    with without_tensorflow():
        keras.utils.set_random_seed(seed)


# 6. With the optimizer's EMA on (--ema), Keras's fit() ends by calling optimizer.finalize_variable_values, which
# overwrites the model's weights with their moving average (backend/*/trainer.py, Keras 3.15.1). Runs call fit()
# once per epoch, so every epoch would go on from the average instead of the trained weights. Off for this
# optimizer instance (public API, on every version); evaluation.averaged_weights and the final save call the
# class's method where the average is wanted. Remove when a run trains in one fit() call.
def keep_weights_after_fit(optimizer):
    optimizer.finalize_variable_values = lambda var_list: None

"""The speed and memory patches around Keras's own training path, one entry each: what they change, the
measured reason (docs/performance.md), the versions they were verified on and when to remove them. None changes
what is trained: the same numbers to float rounding (tests/test_fast_path.py checks each; tests/test_plain_keras.py
the whole run). `--plain-keras` turns every one of them off, for debugging against stock Keras. An entry that
reaches into private API runs only on the versions in workarounds.VERIFIED (else: skipped, one line).
Import-safe: the frameworks are imported inside the functions.

1. fuse_steps            Keras's JAX trainer dispatches every step of an execution separately.
2. FusedBatchNormalization  Keras 3's BatchNormalization is a dozen separate ops on TensorFlow's CPU.
3. fused_momentum_update  Keras's SGD makes TensorFlow trace up to eleven Keras operations per variable.
4. build_before_first_step  TensorFlow traces the first training and evaluation step twice.
5. batches               Keras's own tf.data pipeline autotunes, and tearing it down waits up to a minute.
6. release_activations   a functional model on PyTorch holds every layer's output until its forward pass ends.
7. without_unused_imports  importing Keras imports matplotlib, IPython and (through TensorFlow) JAX if installed.
8. resolve_jit_compile   RandomTranslation (in model files of earlier versions) turns XLA off, on JAX too.
9. cache_saving_skipsets  Keras's saving rebuilds reference objects for every object it walks (a cache key typo).
"""
import contextlib
import functools
import itertools
import sys
from typing import NamedTuple

from .workarounds import verified


# 1. Keras's JAX trainer runs an execution of N steps as a Python loop that dispatches the compiled step once
# per batch, so the host still pays a dispatch of the whole training state (every weight, BN statistic,
# momentum and metric) per step (bench.py overhead: docs/performance.md). Here the
# N steps are one XLA program (jax.lax.scan over the N batches, stacked on the device). Keras's fit() uses a
# train_function that is already set; compile() resets it. Remove when Keras's JAX trainer scans the steps
# of one execution itself.
def fuse_steps(model):
    """On JAX with XLA and steps_per_execution > 1 (not with --distribute): one compiled program per
    execution; a last, shorter execution of an epoch runs step by step."""
    import keras
    steps = model.steps_per_execution
    if (keras.backend.backend() != "jax" or steps == 1 or not model.jit_compile
            or keras.distribution.distribution() is not None or not verified("fuse_steps")):
        return
    import jax
    import jax.numpy as jnp

    def scan_steps(state, batches):
        stacked = jax.tree.map(lambda *parts: jnp.stack(parts), *batches)

        def one_step(state, data):
            logs, state = model.train_step(state, data)
            return state, logs
        state, logs = jax.lax.scan(one_step, state, stacked)
        return jax.tree.map(lambda values: values[-1], logs), state

    fused = jax.jit(scan_steps, donate_argnums=0)
    single = jax.jit(model.train_step, donate_argnums=0)

    def train_function(state, iterator):
        batches = list(itertools.islice(iterator, steps))
        if len(batches) == steps:
            return fused(state, batches)
        for data in batches:
            logs, state = single(state, data)
        return logs, state

    model.train_function = train_function


# 2. Keras 3 computes BatchNormalization from separate ops (moments, then the normalization: a dozen passes
# over memory with the backward pass); on TensorFlow's CPU the fused kernel tf.keras used (FusedBatchNormV3)
# trains ResNet-32 markedly faster (docs/performance.md). Same weights, names and numbers to float
# rounding (tests/test_fast_path.py); checkpoints are written with Keras's own class (checkpoints.save_model),
# so they load without this code. Remove when Keras's TensorFlow backend calls the fused kernel itself.
@functools.cache
def batch_normalization_class():
    """keras.layers.BatchNormalization, or on TensorFlow without a GPU its fused twin."""
    import keras
    if keras.backend.backend() != "tensorflow":
        return keras.layers.BatchNormalization  # XLA (JAX) and torch fuse or run it well already
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU") or not verified("FusedBatchNormalization", tensorflow=True):
        return keras.layers.BatchNormalization
    return _fused_batch_normalization_class()


def stock_layers(model):
    """`model` with Keras's own BatchNormalization in place of FusedBatchNormalization (--plain-keras)."""
    import keras

    from .units import with_batch_normalization
    return with_batch_normalization(model, keras.layers.BatchNormalization)


@functools.cache
def _fused_batch_normalization_class():
    import keras
    import numpy as np
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="resnet_cifar")
    class FusedBatchNormalization(keras.layers.BatchNormalization):
        """Keras's BatchNormalization computed by TensorFlow's one fused kernel (FusedBatchNormV3).
        Batch statistics, moving averages (biased batch variance, as Keras) and epsilon are Keras's."""

        def _fusable(self, inputs, mask):
            return (mask is None and not self.synchronized and not self.renorm and self.scale and self.center
                    and len(inputs.shape) == 4 and self.axis in (-1, 3) and self.variable_dtype == "float32")

        def call(self, inputs, training=None, mask=None):
            if not self._fusable(inputs, mask):
                return super().call(inputs, training=training, mask=mask)
            # TensorFlow's own ops on the float32 tf.Variables (Keras's variables here never autocast): the same
            # arithmetic as Keras's operators, traced without Keras's per-op dtype logic (a trace of ResNet-32
            # holds 31 of these layers)
            x = inputs if inputs.dtype in (tf.float16, tf.bfloat16, tf.float32) else tf.cast(inputs, "float32")
            train = bool(training and self.trainable)
            empty = tf.constant([], "float32")
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=self.gamma.value, offset=self.beta.value,
                mean=empty if train else self.moving_mean.value,
                variance=empty if train else self.moving_variance.value,
                epsilon=self.epsilon, data_format="NHWC", is_training=train)
            if train:
                if x.shape[:-1].is_fully_defined():
                    n = np.float32(x.shape[:-1].num_elements())
                else:  # the batch's size is known only when it runs
                    n = tf.cast(tf.size(x) // x.shape[-1], "float32")
                variance = variance * ((n - 1) / n)  # the kernel returns the unbiased variance; Keras's is biased
                for average, batch in ((self.moving_mean.value, mean), (self.moving_variance.value, variance)):
                    average.assign(average * self.momentum + batch * (1.0 - self.momentum))
            return y if y.dtype == self.compute_dtype else tf.cast(y, self.compute_dtype)

    return FusedBatchNormalization


# 3. Keras's SGD updates each variable with eleven Keras operations with Nesterov momentum, eight without
# (keras/src/optimizers/sgd.py, Keras 3.15.1), whose Python dtype logic made the optimizer a large part of the time
# TensorFlow takes to trace ResNet-32's training step (py-spy, docs/performance.md). On TensorFlow without a
# distribution strategy each update is instead TensorFlow's one kernel for exactly that arithmetic
# (ResourceApplyKerasMomentum: accum = accum * momentum - grad * lr; var += accum, or with Nesterov var += accum *
# momentum - grad * lr): the same weights bit for bit (tests/test_fast_path.py), one op per variable in the graph.
# An attribute of this optimizer instance only (nothing saved changes). Remove when Keras's TensorFlow SGD calls the
# kernel itself.
def fused_momentum_update(optimizer):
    """On TensorFlow (no distribution strategy), `optimizer` (Keras SGD with momentum) updates each variable
    with TensorFlow's fused momentum kernel."""
    import keras
    if keras.backend.backend() != "tensorflow" or not optimizer.momentum:
        return
    import tensorflow as tf
    if tf.distribute.has_strategy() or not verified("fused_momentum_update", tensorflow=True):
        return  # (with a strategy, Keras's own update handles the mirrored variables)

    def update_step(gradient, variable, learning_rate):
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=optimizer.momentums[optimizer._get_variable_index(variable)].handle,
            lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.cast(optimizer.momentum, dtype), use_nesterov=optimizer.nesterov)

    optimizer.update_step = update_step


# 4. Without a distribution strategy, Keras's TensorFlow trainer builds the compiled metrics (the accuracy's
# total and count) inside the first trace of the training step, and a tf.function whose first trace created
# variables is traced again (TensorFlow's rule for variable creation): the whole step, forward and backward,
# traced twice before the first step runs, and --evaluate's evaluation step likewise (Keras 3.15.1,
# TensorFlow 2.21.0).
# Built here from symbolic batches, as Keras's own _symbolic_build does under a strategy; one trace each
# (tests/test_fast_path.py counts them). _symbolic_build first traces the whole forward pass in a scratch graph
# for the output's shape (about half of compile_model's time: docs/performance.md), which a functional
# model already knows: here the metrics and the loss are built from the model's own output, then the optimizer, as
# _symbolic_build does (Keras 3.15.1, trainers/trainer.py). Remove when Keras builds the metrics before tracing
# on TensorFlow (that test's count is then 1 without this).
def build_before_first_step(model):
    """The model's compiled metrics, loss and optimizer built before fit() or evaluate() traces a step."""
    import keras
    if keras.backend.backend() != "tensorflow" or not verified("build_before_first_step"):
        return
    from keras.src import backend
    x = keras.KerasTensor((None, *model.input_shape[1:]), "uint8")
    y = keras.KerasTensor((None,), "int32")
    if not isinstance(model, keras.Model) or len(getattr(model, "outputs", None) or ()) != 1:
        model._symbolic_build(data_batch=(x, y))
        return
    y_pred = keras.KerasTensor((None, *model.outputs[0].shape[1:]), model.outputs[0].dtype)
    if model._compile_metrics is not None and not model._compile_metrics.built:
        backend.compute_output_spec(model.compute_metrics, x, y, y_pred, sample_weight=None)
    if model._compile_loss is not None and not model._compile_loss.built:
        backend.compute_output_spec(model._compute_loss, x, y, y_pred, sample_weight=None, training=False)
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model._post_build()


# 9. Keras's saving code (keras/src/saving/saving_lib.py, get_attr_skipset, Keras 3.15.1) caches the attribute
# names it skips per object type under one key ("saving_attr_skipset_...") and looks them up under another
# ("saving_attr_skiplist_..."): every save builds reference Layer, Operation and Optimizer objects again for
# every object it walks, a large part of every save_weights (py-spy). Here the lookup key is filled once with
# Keras's own sets: the same files. Remove when Keras reads the key it writes.
def cache_saving_skipsets():
    if not verified("cache_saving_skipsets"):
        return
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib
    for obj_type in ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss"):
        key = f"saving_attr_skiplist_{obj_type}"
        if global_state.get_global_attribute(key, None) is None:
            global_state.set_global_attribute(key, saving_lib.get_attr_skipset(obj_type))


# 5. Given arrays on TensorFlow, Keras builds a tf.data pipeline that autotunes, and destroying it at the end
# of a fit() waits for the autotuning thread, which sleeps up to a minute between rounds: 0-40 s added at
# random to every fit() (TensorFlow 2.21; gdb: RootDataset::Iterator::~Iterator). Same batches, same order,
# autotuning off. Remove when a fit() on arrays ends without that wait (time bench.py model before removing).
class Batches(NamedTuple):
    x: object  # an array, or on TensorFlow a batched tf.data.Dataset of (image, label)
    y: object  # labels, or None with a dataset
    batch_size: object  # the batch size, or None with a dataset


def batches(x, y, batch_size, plain=False):
    """What fit() and evaluate() are given, in order: on TensorFlow a tf.data pipeline over the arrays with
    autotuning off, elsewhere (and with plain=True, --plain-keras) the arrays themselves. The uint8 images stay
    uint8 until the model's first layer."""
    import keras
    if keras.backend.backend() != "tensorflow" or plain:
        return Batches(x, y, batch_size)
    import tensorflow as tf
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(2)
    return Batches(dataset.with_options(options), None, None)


# 6. Keras runs a functional model on PyTorch eagerly, node by node, and keeps every node's output in one dict
# until the forward pass ends (keras/src/ops/function.py, Function._run_through_graph, Keras 3.15.1): under
# evaluation's torch.no_grad that is the whole network's activations of the batch at once (ResNeXt-29 2x4d at
# 1000 test images: 23 GB, killed). Here the model's own graph runs in Keras's order, each output dropped after
# the last node that reads it, so evaluation holds a few layers' outputs (training holds what autograd keeps,
# as before). Keras's torch tree flattening of a list argument (an Add's inputs) leaves those tensors in a
# reference cycle, freed only by the garbage collector: collected after each such node. An attribute of this
# model instance only, never saved. Remove when Keras frees them itself: tests/test_fast_path.py's torch test
# counts the outputs alive under Keras's own method ("before"), the layer count today.
def _schedule(model):
    """The functional graph's nodes in Keras's execution order and, for each, the tensors it reads last."""
    order = [node for depth in sorted(model._nodes_by_depth, reverse=True)
             for node in model._nodes_by_depth[depth] if node.operation and not node.is_input]
    last_reader = {}
    for i, node in enumerate(order):
        for tensor in node.input_tensors:
            last_reader[id(tensor)] = i
    for i, node in enumerate(order):  # an output nobody reads goes at once
        for tensor in node.outputs:
            last_reader.setdefault(id(tensor), i)
    kept = {id(tensor) for tensor in model.outputs}
    dead = [[] for _ in order]
    for tensor, i in last_reader.items():
        if tensor not in kept:
            dead[i].append(tensor)
    return order, dead


def live_bytes_per_image(model):
    """The most float32 bytes of layer outputs one image keeps alive at once when release_activations runs
    the model (inputs and outputs included)."""
    import numpy as np
    order, dead = _schedule(model)
    tensors = [*model.inputs, *(t for node in order for t in node.outputs)]
    size = {id(t): 4 * int(np.prod(t.shape[1:])) for t in tensors}
    live = sum(size[id(t)] for t in model.inputs)
    peak = live
    for node, gone in zip(order, dead):
        live += sum(size[id(t)] for t in node.outputs)
        peak = max(peak, live)
        live -= sum(size[t] for t in gone)
    return peak


def release_activations(model):
    """On PyTorch, run this functional model dropping each layer's output after its last use."""
    import gc
    import types

    import keras
    if keras.backend.backend() != "torch" or not verified("release_activations"):
        return
    order, dead = _schedule(model)
    operations = [model._get_operation_for_node(node) for node in order]
    graph_run = type(model)._run_through_graph

    def run_through_graph(self, inputs, operation_fn=lambda op: op, call_fn=None):
        if call_fn is not None:  # symbolic runs (output shapes): Keras's own
            return graph_run(self, inputs, operation_fn, call_fn)
        tensors = {id(x): y for x, y in zip(self.inputs, keras.tree.flatten(inputs))}
        for node, operation, gone in zip(order, operations, dead):
            args, kwargs = node.arguments.fill_in(tensors)
            outputs = operation_fn(operation)(*args, **kwargs)
            for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
                tensors[id(x)] = y
            for tensor in gone:
                del tensors[tensor]
            if len(node.input_tensors) > 1:
                gc.collect(1)  # the cycle its list argument left (above)
        return keras.tree.pack_sequence_as(self._outputs_struct, [tensors[id(x)] for x in self.outputs])

    object.__setattr__(model, "_run_through_graph", types.MethodType(run_through_graph, model))


# 7. Importing Keras imports every optional package it finds installed, whatever the backend: matplotlib.pyplot
# (keras.src.visualization), IPython (keras.src.saving.file_editor) and, through TensorFlow's tf.lite, JAX:
# a second or more of the framework's start (docs/performance.md), for modules a training run never uses.
# Each is imported there under `try: ... except ImportError`, so devices.configure_backend imports Keras with
# them refused (JAX only when it is not the backend); afterwards they import normally. Keras's image
# gallery plot and TensorFlow Lite's JAX conversion stay off in this process. TensorFlow 2.21 also imports its
# legacy tf.keras, which tries scipy.sparse (`python -X importtime`) under `try`, for an input type this
# project never uses: refused likewise (requests is imported elsewhere without a `try`: kept). Remove when
# Keras and TensorFlow import them lazily (`python -X importtime -c "import keras"` then lists none of them).
UNUSED_AT_IMPORT = ("matplotlib", "IPython", "jax", "scipy")
NEEDED_BY = {"jax": ("jax",), "scipy": ("jax", "torch")}  # JAX imports scipy itself: refused on TensorFlow only


@contextlib.contextmanager
def without_unused_imports(backend, plain=False):
    """Within: importing UNUSED_AT_IMPORT (less what the backend needs) raises ImportError, unless already
    imported."""
    refused = [name for name in UNUSED_AT_IMPORT if backend not in NEEDED_BY.get(name, ())
               and name not in sys.modules and not plain]
    for name in refused:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in refused:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


# 8. Keras's RandomTranslation declares supports_jit=False, for TensorFlow's sake (XLA has no kernel for its
# ImageProjectiveTransformV3: "tf2xla conversion failed"), and Keras's jit_compile="auto" then turns XLA off for
# the whole model on every backend: JAX ran the step op by op, markedly slower than with XLA. The networks now
# augment with augmentation.PadAndCrop, but model files of earlier versions hold a
# RandomTranslation: on JAX, whose translation (map_coordinates) compiles, the flag is set on the instance (never
# saved). Remove when no such file needs evaluating, or when Keras decides supports_jit per backend.
def resolve_jit_compile(model, jit_compile="auto"):
    """XLA for the training step. "auto": on under JAX; on TensorFlow where a GPU is visible (Keras's own rule)
    unless the model holds a RandomTranslation, off on its CPU (XLA's CPU convolutions trained ResNet-32 slower:
    docs/performance.md); off on PyTorch."""
    import keras
    backend = keras.backend.backend()
    translations = [layer for layer in model.layers if isinstance(layer, keras.layers.RandomTranslation)]
    if backend == "jax" and jit_compile is not False:
        for layer in translations:
            layer.supports_jit = True  # an attribute of this instance only, never saved
    if jit_compile != "auto":
        return jit_compile
    if backend == "tensorflow":
        import tensorflow as tf
        return bool(tf.config.list_physical_devices("GPU")) and not translations
    return backend == "jax"

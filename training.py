"""The training loop: epoch by epoch on a shuffled order that is a function of (seed, epoch), the test set
evaluated after every epoch, the state saved after each so that --resume continues exactly, NaN stops.

`fit` is called by common.main with a compiled model (common.compile_model: the recipe's optimizer,
loss and step schedule); it writes the history and TensorBoard scalars through outputs and the resume
state through checkpoints.
"""
import functools
import itertools
import math
import os
import sys
import threading
import time
from typing import NamedTuple

import numpy as np

from checkpoints import restore_state, save_state
from distributed import Cluster, process_share
from errors import TrainingError
from outputs import ScalarLog, clear_old_events, write_history

EVAL_BATCH_SIZE = 1000  # evaluation keeps no activations for a backward pass: bigger batches, same numbers
# The host may run this many executions (of steps_per_execution steps) ahead of the last one whose loss was
# checked for NaN: enough to keep a GPU's queue full, and the bound on how far a NaN run goes on.
MAX_UNCHECKED_EXECUTIONS = 8
CHECK_WAIT_S = 60  # ... unless one check takes longer: then the host goes on (a step over a minute long)


class Batches(NamedTuple):
    x: object  # an array, or on TensorFlow a batched tf.data.Dataset of (image, label)
    y: object  # labels, or None with a dataset
    batch_size: object  # the batch size, or None with a dataset


def batches(x, y, batch_size):
    """What fit() and evaluate() are given, in order: on TensorFlow a tf.data pipeline over the arrays with
    tf.data's autotuning off, elsewhere the arrays themselves. Keras turns arrays into a pipeline
    that autotunes, and destroying that pipeline waits for its autotuning thread, which sleeps up to a
    minute between rounds: measured on TensorFlow 2.21, 0-40 s added at the end of a fit() at random.
    Same batches, same order; the uint8 images stay uint8 until the model's first layer."""
    import keras
    if keras.backend.backend() != "tensorflow":
        return Batches(x, y, batch_size)
    import tensorflow as tf
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(2)
    return Batches(dataset.with_options(options), None, None)


def reseed_augmentation(model, seed, epoch):
    """Every epoch's augmentation follows from (seed, epoch) alone, so a resumed run draws the same."""
    import keras
    for i, layer in enumerate(model.layers):
        generator = getattr(layer, "generator", None)
        if isinstance(generator, keras.random.SeedGenerator):
            state = np.random.default_rng([seed, epoch, i]).integers(0, 2**31, size=2)
            generator.state.assign(np.array([state[0], 0], dtype=generator.state.dtype))


def epoch_order(seed, epoch, n_images, n_used):
    """The shuffled training order of one epoch, a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch, 2**20]).permutation(n_images)[:n_used]


@functools.cache
def _stop_on_nan_class():
    import keras

    class StopOnNaN(keras.callbacks.Callback):
        """Stops fit() once the loss is NaN or infinite, without a device sync of its own.

        keras.callbacks.TerminateOnNaN overrides on_batch_end without being async-safe, so on JAX and PyTorch
        Keras turns off its asynchronous batch-end dispatch for it: every step's logs are then read on the
        main thread, a device sync per step. This callback is async-safe: Keras runs its batch end on a worker
        thread, where the loss (Keras's running mean, so NaN from the bad step to the end of the epoch) is
        read once that step has finished, while the main thread queues the next ones. The main thread waits
        only when it is MAX_UNCHECKED_EXECUTIONS executions ahead of the last checked one, so a NaN stops the
        run at most that many executions (times steps_per_execution steps) after the step that made it. On
        TensorFlow, whose callbacks Keras always runs on the main thread after each execution, it stops at
        the end of that execution. The epoch's end reports it (fit, below)."""

        async_safe = True

        def __init__(self):
            super().__init__()
            self.condition = threading.Condition()
            self.checked = 0  # steps of this epoch whose loss has been looked at
            self.trainer = None

        def set_model(self, model):
            super().set_model(model)
            # Our own reference: on JAX, Callback.model copies the whole training state back into the
            # model's variables at every access (a device sync per step, measured as most of the step time).
            self.trainer = model

        def on_epoch_begin(self, epoch, logs=None):
            with self.condition:
                self.checked = 0

        def on_train_batch_begin(self, batch, logs=None):
            limit = MAX_UNCHECKED_EXECUTIONS * self.trainer.steps_per_execution
            with self.condition:
                self.condition.wait_for(lambda: batch - self.checked < limit or self.trainer.stop_training,
                                        timeout=CHECK_WAIT_S)

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            with self.condition:
                if loss is not None and not math.isfinite(loss):
                    self.trainer.stop_training = True
                self.checked = max(self.checked, batch + 1)
                self.condition.notify_all()

    return StopOnNaN


def fuse_steps(model):
    """On JAX, one compiled program per execution of steps_per_execution steps. Keras's JAX trainer runs
    an execution as a Python loop that dispatches the compiled step once per batch, so the host still pays
    a dispatch of the whole training state (every weight, BN statistic, momentum and metric) per step; here
    the N steps are one XLA program (jax.lax.scan over the N batches, stacked on the device) and the host
    dispatches once per N steps. A last, shorter execution of an epoch runs step by step. Keras's fit() uses
    a train_function that is already set (it builds its own only when there is none); compile() resets it.
    Not used with --distribute (keras.distribution shards Keras's own step) or without XLA."""
    import keras
    steps = model.steps_per_execution
    if (keras.backend.backend() != "jax" or steps == 1 or not model.jit_compile
            or keras.distribution.distribution() is not None):
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


@functools.cache
def _heartbeat_class():
    import keras

    class Heartbeat(keras.callbacks.Callback):
        """Calls beat() at the end of every training and evaluation step (async-safe: no sync of its own)."""
        async_safe = True

        def __init__(self, beat):
            super().__init__()
            self.beat = beat

        def on_train_batch_end(self, batch, logs=None):
            self.beat()

        def on_test_batch_end(self, batch, logs=None):
            self.beat()

    return Heartbeat


def run_epoch(model, train, test, epoch, epochs, verbose=0, beat=None):
    """One epoch through Keras's fit(), as the scripts train (bench.py times this too): the given batches in
    their order, the test set evaluated at its end when given, NaN stopping it early, beat() after every
    step when given (distributed.Watchdog). Returns the epoch's logs (loss, accuracy, val_loss, val_accuracy)."""
    import keras
    # One fit() call per epoch, on our own shuffled order; the progress bar still says "Epoch 82/200".
    stop_after_one_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda _, logs: setattr(model, "stop_training", True))
    callbacks = [_stop_on_nan_class()(), stop_after_one_epoch] + ([_heartbeat_class()(beat)] if beat else [])
    validation = {} if test is None else {"validation_data": (test.x, test.y),
                                          "validation_batch_size": test.batch_size}
    result = model.fit(*train, epochs=epochs, initial_epoch=epoch, shuffle=False, verbose=verbose, **validation,
                       callbacks=callbacks)
    return {key: values[-1] for key, values in result.history.items()}


def fit(model, args, data, paths, config, learning_rate_at, cluster=Cluster(), beat=None, resume_from=None):
    """Trains epoch by epoch, writing the history, TensorBoard scalars and the resume state to `paths` after
    each; with --resume continues from the state at `resume_from` (default: paths["state"]; in a cluster,
    the chief's, on a folder every worker shares). learning_rate_at(epoch) is the schedule's rate in that
    epoch (recorded in the history). Returns (history, seconds, training images per second) of this
    process's epochs."""
    import keras
    (x_train, y_train), (x_test, y_test) = data
    steps = config["steps_per_epoch"]
    resume_from = resume_from or paths["state"]
    history = []
    if args.resume and os.path.isfile(resume_from):
        history = restore_state(model, resume_from, config)
        print(f"resuming {config['run_name']} after epoch {len(history)} from {resume_from}")
    elif args.resume:
        print(f"nothing to resume at {resume_from}: starting {config['run_name']} from epoch 1")

    def write_histories():  # next to the checkpoint and in the log folder (compare.py reads the latter)
        for key in ("csv", "log_csv"):
            write_history(paths[key], history)

    # The CSV and TensorBoard files are derived from the saved history: rewritten now, each epoch is in
    # them exactly once whatever moment an earlier run was killed at.
    write_histories()
    clear_old_events(paths["log_run"])
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    backend = keras.backend.backend()
    mine, eval_batch = process_share(np.arange(len(x_test)), EVAL_BATCH_SIZE, cluster, backend)
    test = batches(x_test[mine], y_test[mine], eval_batch)  # the same every epoch: built once
    log = ScalarLog(paths["log_run"])
    start = time.perf_counter()
    first = len(history)
    try:
        for row in history:
            log.write(row)
        for epoch in range(first, args.epochs):
            epoch_start = time.perf_counter()
            reseed_augmentation(model, args.seed, epoch)
            order, batch = process_share(epoch_order(args.seed, epoch, len(x_train), steps * args.batch_size),
                                         args.batch_size, cluster, backend)
            train = batches(x_train[order], y_train[order], batch)
            logs = run_epoch(model, train, test, epoch, args.epochs, verbose, beat)
            if not all(math.isfinite(logs.get(key, math.nan)) for key in ("loss", "val_loss")):
                last_good = resume_from if history else "none yet"  # the chief's, in a cluster
                raise TrainingError(f"the loss became {logs.get('loss')} in epoch {epoch + 1}; the last good "
                                    f"checkpoint is {last_good} (epoch {len(history)}): lower --lr-schedule "
                                    "and rerun, or --resume from it")
            history.append({"epoch": epoch, "loss": logs["loss"], "accuracy": logs["accuracy"],
                            "test_loss": logs["val_loss"], "test_accuracy": logs["val_accuracy"],
                            "learning_rate": learning_rate_at(epoch),
                            "seconds": round(time.perf_counter() - epoch_start, 3)})
            save_state(model, paths["state"], history, config)
            write_histories()
            log.write(history[-1])
    finally:
        log.close()
    seconds = time.perf_counter() - start
    images = steps * args.batch_size * max(args.epochs - first, 0)
    return history, seconds, images / seconds if seconds > 0 else 0.0

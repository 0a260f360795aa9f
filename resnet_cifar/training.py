"""The training loop: epoch by epoch on a shuffled order that is a function of (seed, epoch), the test set
evaluated after every epoch, the state saved after each so that --resume continues exactly, NaN stops.

`fit` is called by common.main with a compiled model (recipe.compile_model: the recipe's optimizer, loss and
step schedule) and the run (`Run`: its RunConfig, data, files, record and saved state); it writes the history
and TensorBoard scalars through outputs and the resume state through checkpoints.
"""
import functools
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .checkpoints import SavedState, save_state
from .distributed import Cluster, process_share
from .errors import TrainingError
from .evaluation import Evaluator, describe, needs_evaluator
from .recipe import Schedule
from .outputs import ScalarLog, check_free_space, clear_old_events, hparams_of, write_history
from .speedups import batches

EVAL_BATCH_SIZE = 1000  # evaluation keeps no activations for a backward pass: bigger batches, same numbers
# ... except where they would not fit: on PyTorch Keras runs a functional model eagerly, and even with each
# layer's output dropped after its last use (speedups.release_activations) a batch of 1000 keeps a few
# whole-width layer outputs alive (ResNeXt-29 8x64d: 5 MB an image). There the batch is what fits
# EVAL_ACTIVATION_BYTES of live layer outputs (docs/performance.md has the measured memory).
EVAL_ACTIVATION_BYTES = 2 * 2**30


def eval_batch_size(model):
    """EVAL_BATCH_SIZE, or on PyTorch as many images (at least 8) as EVAL_ACTIVATION_BYTES of live float32
    layer outputs hold."""
    import keras

    from .speedups import live_bytes_per_image
    if keras.backend.backend() != "torch":
        return EVAL_BATCH_SIZE
    return int(min(EVAL_BATCH_SIZE, max(8, EVAL_ACTIVATION_BYTES // live_bytes_per_image(model))))
# The host may run this many executions (of steps_per_execution steps) ahead of the last one whose loss was
# checked for NaN: enough to keep a GPU's queue full, and the bound on how far a NaN run goes on.
MAX_UNCHECKED_EXECUTIONS = 8
CHECK_WAIT_S = 60  # ... unless one check takes longer: then the host goes on (a step over a minute long)


def checkpoint_bytes(params):
    """Room to leave for one checkpoint of a model of `params` parameters: weights and momentum in float32,
    its temporary twin beside it while it is written, and a megabyte of metadata."""
    return 3 * 4 * params + 2**20


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


def run_epoch(model, train, test, epoch, epochs, verbose=0, beat=None, evaluator=None):
    """One epoch through Keras's fit(), as the scripts train (bench.py times this too): the given batches in
    their order, the test set evaluated at its end when given (inside fit(), or by `evaluator` when given: an
    evaluation.Evaluator), NaN stopping it early, beat() after every step when given (distributed.Watchdog).
    Returns the epoch's logs (loss, accuracy, val_loss, val_accuracy)."""
    import keras
    # One fit() call per epoch, on our own shuffled order; the progress bar still says "Epoch 82/200".
    stop_after_one_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda _, logs: setattr(model, "stop_training", True))
    beating = [_heartbeat_class()(beat)] if beat else []
    callbacks = [_stop_on_nan_class()(), stop_after_one_epoch] + beating
    validation = {} if test is None or evaluator else {"validation_data": (test.x, test.y),
                                                       "validation_batch_size": test.batch_size}
    result = model.fit(*train, epochs=epochs, initial_epoch=epoch, shuffle=False, verbose=verbose, **validation,
                       callbacks=callbacks)
    logs = {key: values[-1] for key, values in result.history.items()}
    if test is not None and evaluator and math.isfinite(logs.get("loss", math.nan)):
        logs.update({f"val_{key}": value for key, value in evaluator.evaluate(test, beating).items()})
    return logs


@dataclass(frozen=True)
class Run:
    """What one training run works with, built once by common.main."""
    config: object  # the RunConfig
    data: tuple  # ((x_train, y_train), (x_test, y_test), validation or None): cifar_data.load_data
    paths: dict  # where this process writes (outputs.run_paths; a private folder on a process that is not chief)
    record: dict  # the configuration saved with the run (common.run_record); steps_per_epoch, params
    cluster: Cluster = Cluster()
    beat: Optional[Callable] = None  # called after every step (distributed.Watchdog)
    saved: Optional[SavedState] = None  # --resume: the state to continue from, already read and checked


def fit(model, run):
    """Trains epoch by epoch, writing the history, TensorBoard scalars and the resume state to run.paths after
    each; continues from run.saved when given. Returns (history, seconds, training images per second) of this
    process's epochs."""
    import keras
    config, paths, record, cluster = run.config, run.paths, run.record, run.cluster
    (x_train, y_train), (x_test, y_test), validation = run.data
    steps = record["steps_per_epoch"]
    resume_from = run.saved.path if run.saved else paths["state"]  # in a cluster, the chief's
    history = []
    if run.saved:
        history = run.saved.restore(model)
        print(f"resuming {config.run_name} after epoch {len(history)} from {resume_from}")
    elif config.resume:
        print(f"nothing to resume at {resume_from}: starting {config.run_name} from epoch 1")

    def write_histories():  # next to the checkpoint and in the log folder (compare.py reads the latter)
        for key in ("csv", "log_csv"):
            write_history(paths[key], history)

    # The CSV and TensorBoard files are derived from the saved history: rewritten now, each epoch is in
    # them exactly once whatever moment an earlier run was killed at.
    write_histories()
    clear_old_events(paths["log_run"])
    verbose = config.verbose if config.verbose is not None else (1 if sys.stdout.isatty() else 2)
    backend = keras.backend.backend()
    mine, eval_batch = process_share(np.arange(len(x_test)), eval_batch_size(model), cluster, backend)
    test = batches(x_test[mine], y_test[mine], eval_batch, config.plain_keras)  # the same every epoch: built once
    if validation is not None:  # --val-split: the validation set every epoch, the test set after the last
        mine, eval_batch = process_share(np.arange(len(validation[0])), eval_batch_size(model), cluster, backend)
        every_epoch = batches(validation[0][mine], validation[1][mine], eval_batch, config.plain_keras)
    else:
        every_epoch = test
    evaluator = Evaluator(model, config) if needs_evaluator(config) else None
    evaluation = describe(config)
    schedule = Schedule.of(config, steps)
    log = ScalarLog(paths["log_run"], hparams=hparams_of(record, config.family))
    start = time.perf_counter()
    first = len(history)
    try:
        for row in history:
            log.write(row)
        for epoch in range(first, config.epochs):
            epoch_start = time.perf_counter()
            reseed_augmentation(model, config.data_seed, epoch)
            order, batch = process_share(epoch_order(config.data_seed, epoch, len(x_train), steps * config.batch_size),
                                         config.batch_size, cluster, backend)
            train = batches(x_train[order], y_train[order], batch, config.plain_keras)
            logs = run_epoch(model, train, every_epoch, epoch, config.epochs, verbose, run.beat, evaluator)
            if not all(math.isfinite(logs.get(key, math.nan)) for key in ("loss", "val_loss")):
                last_good = resume_from if history else "none yet"  # the chief's, in a cluster
                raise TrainingError(f"the loss became {logs.get('loss')} in epoch {epoch + 1}; the last good "
                                    f"checkpoint is {last_good} (epoch {len(history)}): lower --lr-schedule "
                                    "and rerun, or --resume from it")
            row = {"epoch": epoch, "loss": logs["loss"], "accuracy": logs["accuracy"],
                   "test_loss": logs["val_loss"], "test_accuracy": logs["val_accuracy"],
                   "learning_rate": schedule.of_epoch(epoch)}
            if validation is not None:
                row.update(val_loss=logs["val_loss"], val_accuracy=logs["val_accuracy"], test_loss=math.nan,
                           test_accuracy=math.nan)
                if epoch == config.epochs - 1:
                    final = evaluator.evaluate(test) if evaluator else model.evaluate(
                        test.x, test.y, batch_size=test.batch_size, verbose=0, return_dict=True)
                    row.update(test_loss=final["loss"], test_accuracy=final["accuracy"])
            if evaluation:
                row["evaluation"] = evaluation
            history.append({**row, "seconds": round(time.perf_counter() - epoch_start, 3)})
            check_free_space(os.path.dirname(paths["state"]) or ".", checkpoint_bytes(record["params"]))
            save_state(model, paths["state"], history, record)
            write_histories()
            log.write(history[-1])
        log.finish(history)
    finally:
        log.close()
    seconds = time.perf_counter() - start
    images = steps * config.batch_size * max(config.epochs - first, 0)
    return history, seconds, images / seconds if seconds > 0 else 0.0

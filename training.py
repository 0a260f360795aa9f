"""The training loop: epoch by epoch on a shuffled order that is a function of (seed, epoch), the test set
evaluated after every epoch, the state saved after each so that --resume continues exactly, NaN stops.

`fit` is called by common.main with a compiled model (common.compile_model: the recipe's optimizer,
loss and step schedule); it writes the history and TensorBoard scalars through outputs and the resume
state through checkpoints.
"""
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from checkpoints import restore_state, save_state
from errors import TrainingError
from outputs import ScalarLog, clear_old_events, write_history

EVAL_BATCH_SIZE = 1000  # evaluation keeps no activations for a backward pass: bigger batches, same numbers


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


def fit(model, args, data, paths, config, learning_rate_at):
    """Trains epoch by epoch, saving the state after each; with --resume continues from the saved state.
    learning_rate_at(epoch) is the schedule's rate in that epoch (recorded in the history).
    Returns (history, seconds, training images per second) of this process's epochs."""
    import keras
    (x_train, y_train), (x_test, y_test) = data
    steps = config["steps_per_epoch"]
    history = []
    if args.resume and os.path.isfile(paths["state"]):
        history = restore_state(model, paths["state"], config)
        print(f"resuming {config['run_name']} after epoch {len(history)} from {paths['state']}")
    elif args.resume:
        print(f"nothing to resume at {paths['state']}: starting {config['run_name']} from epoch 1")
    def write_histories():  # next to the checkpoint and in the log folder (compare.py reads the latter)
        for key in ("csv", "log_csv"):
            write_history(paths[key], history)

    # The CSV and TensorBoard files are derived from the saved history: rewritten now, each epoch is in
    # them exactly once whatever moment an earlier run was killed at.
    write_histories()
    clear_old_events(paths["log_run"])
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    # fit() runs one epoch per call on our own shuffled order; this stops it after that epoch while
    # the progress bar still says "Epoch 82/200".
    stop_after_one_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(model, "stop_training", True))
    test = batches(x_test, y_test, EVAL_BATCH_SIZE)  # the same every epoch: built once
    log = ScalarLog(paths["log_run"])
    start = time.perf_counter()
    first = len(history)
    try:
        for row in history:
            log.write(row)
        for epoch in range(first, args.epochs):
            epoch_start = time.perf_counter()
            reseed_augmentation(model, args.seed, epoch)
            order = epoch_order(args.seed, epoch, len(x_train), steps * args.batch_size)
            train = batches(x_train[order], y_train[order], args.batch_size)
            result = model.fit(*train, epochs=args.epochs, initial_epoch=epoch, shuffle=False,
                               validation_data=(test.x, test.y), validation_batch_size=test.batch_size,
                               verbose=verbose,
                               callbacks=[keras.callbacks.TerminateOnNaN(), stop_after_one_epoch])
            logs = {key: values[-1] for key, values in result.history.items()}
            if not all(math.isfinite(logs.get(key, math.nan)) for key in ("loss", "val_loss")):
                last_good = paths["state"] if history else "none yet"
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

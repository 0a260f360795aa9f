"""How a run's checkpoints are written and read back: the final model (.h5) and the per-epoch resume state.

The model is saved with Keras's own layer classes, so plain keras.models.load_model reads it without this
project's code. The resume state is one file, `<run>.state.weights.h5`: weights, optimizer state (its step
count fixes the position in the learning-rate schedule) and the history so far. Both are written through
outputs.atomic_write: a kill at any moment leaves the previous file whole.
"""
import json

from batch_norm import with_batch_normalization
from errors import UsageError
from outputs import atomic_write


# What must match for --resume to continue a run's saved state.
RESUME_KEYS = ("model", "params", "dataset", "train_images", "batch_size", "seed", "precision")


def save_model(model, path):
    """The whole model as .h5, written atomically, with Keras's own layer classes: it loads with plain
    keras.models.load_model, without this project's code."""
    import keras
    atomic_write(path, with_batch_normalization(model, keras.layers.BatchNormalization).save)


def save_state(model, path, history, config):
    """Weights, optimizer state (its step count fixes the learning-rate position) and the history so far,
    in one file written atomically: a kill at any moment leaves the previous state whole."""
    import h5py

    def write(tmp):
        model.save_weights(tmp)
        with h5py.File(tmp, "a") as f:
            f.attrs["resume"] = json.dumps({"history": history, **{k: config[k] for k in RESUME_KEYS}})
    atomic_write(path, write)


def restore_state(model, path, config):
    """The history saved with the state at `path` (weights and optimizer state loaded into `model`)."""
    import warnings

    import h5py
    try:
        with h5py.File(path, "r") as f:
            saved = json.loads(f.attrs["resume"])
        model.optimizer.build(model.trainable_variables)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_weights(path)  # Keras only warns when it skips a mismatched part: refuse instead
        skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0].strip())
    except Exception as error:
        raise UsageError(f"cannot resume from {path}: {str(error).splitlines()[0]} "
                         "(rerun without --resume to start over)") from None
    changed = [k for k in RESUME_KEYS if saved[k] != config[k]]
    if changed:
        raise UsageError(f"cannot resume from {path}: it was saved with a different "
                         + ", ".join(f"{k} ({saved[k]} vs {config[k]} now)" for k in changed)
                         + "; rerun without --resume to start over, or choose another --run-name")
    return saved["history"]

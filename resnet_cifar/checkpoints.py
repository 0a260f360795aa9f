"""How a run's checkpoints are written and read back: the final model (.h5) and the per-epoch resume state,
and how a model file given to --evaluate is loaded without running anything it holds.

The model is saved with Keras's own layer classes, so plain keras.models.load_model reads it without this
project's code. The resume state is one file, `<run>.state.weights.h5`: weights, optimizer state (its step
count fixes the position in the learning-rate schedule) and the history so far; it is read back as weights
and JSON only. Both are written through outputs.atomic_write: a kill at any moment leaves the previous file
whole.

Loading a whole model is code execution waiting to happen: a model file's configuration names the classes
and functions Keras will build it from (a Lambda layer carries Python bytecode; CVE-2025-1550, -8747,
-9905, -9906, CVE-2026-1462 were ways around safe_mode). `load_model_safely` reads the configuration as
JSON first and refuses any class this project's networks do not use, then lets Keras (>= 3.14, every fix
above) load it with safe_mode=True and compile=False.
"""
import contextlib
import json
import os
import zipfile

from .augmentation import standard_layer, training_layer
from .errors import UsageError
from .outputs import atomic_write
from .units import batch_normalization_as, with_layers
from .workarounds import without_tensorflow
from .speedups import batch_normalization_class


# What must match for --resume to continue a run's saved state (--epochs may change: a run can be extended).
RESUME_KEYS = ("model", "params", "dataset", "train_images", "batch_size", "seed", "precision", "lr_schedule",
               "weight_decay", "val_split")
# ... and today's options, with what a state saved before they existed means (the seeds' parts: its seed).
OPTION_RESUME_KEYS = {"init_seed": None, "data_seed": None, "lr_decay": "step", "warmup_epochs": 0, "cutout": None,
                      "mixup": None, "cutmix": None, "label_smoothing": None, "ema": None, "tta": None}


def as_trained(model):
    """A loaded model with the layer classes training runs (the inverse of what save_model writes): same numbers,
    same kernels."""
    training_class = batch_normalization_as(batch_normalization_class())
    return with_layers(model, lambda layer: training_class(layer) or training_layer(layer))


def save_model(model, *paths):
    """The whole model, at each path in the format its ending names (.h5, .keras), each written atomically,
    with Keras's own layer classes (_as_saved): it loads with plain keras.models.load_model,
    without this project's code."""
    with _as_saved(model) as saved:
        with without_tensorflow():
            for path in paths:
                atomic_write(path, saved.save)


@contextlib.contextmanager
def _as_saved(model):
    """`model` with Keras's own layer classes only, without copying its weights: a FusedBatchNormalization is
    Keras's BatchNormalization with another call(), so for the save its class is Keras's (same attributes, same
    configuration), and the pad-and-crop layer's Keras equivalent (augmentation.standard_layer) stands in a twin
    model that shares every other layer. (A whole copy would create and initialize every variable again:
    docs/performance.md, "A run's fixed cost".) The classes are restored on the way out."""
    import warnings

    import keras
    keras_class = keras.layers.BatchNormalization
    switched = [(layer, type(layer)) for layer in model.layers
                if isinstance(layer, keras_class) and type(layer) is not keras_class]
    for layer, _ in switched:
        layer.__class__ = keras_class
    try:
        standard = {layer.name: standard_layer(layer) for layer in model.layers}
        if all(new is None for new in standard.values()):
            yield model
            return
        source = model
        if "resnet_cifar" in json.dumps(model.get_compile_config()):
            # today's options compile with this project's loss or warm-up: the file gets no compile
            # configuration (plain Keras loads it uncompiled), through an uncompiled view of the same graph
            source = keras.Model(model.inputs, model.outputs, name=model.name)
        with without_tensorflow(), warnings.catch_warnings():  # the copy is saved, never trained
            warnings.filterwarnings("ignore", message="Model doesn't support `jit_compile=True`")
            yield keras.models.clone_model(source, clone_function=lambda layer: standard[layer.name] or layer)
    finally:
        for layer, cls in switched:
            layer.__class__ = cls


def save_state(model, path, history, config):
    """Weights, optimizer state (its step count fixes the learning-rate position) and the history so far,
    in one file written atomically: a kill at any moment leaves the previous state whole."""
    import h5py

    def write(tmp):
        model.save_weights(tmp)
        with h5py.File(tmp, "a") as f:
            f.attrs["resume"] = json.dumps({"history": history,
                                            **{k: config[k] for k in (*RESUME_KEYS, *OPTION_RESUME_KEYS, "epochs")}})
    atomic_write(path, write)


class SavedState:
    """The one home of --resume: the state a run saved after its last completed epoch, read once (`read`, with
    h5py alone, before any framework starts), checked once against this command's settings (`check`), and
    loaded into the model (`restore`)."""

    def __init__(self, path, record):
        self.path, self.record = path, record
        self.history = record["history"]

    @classmethod
    def read(cls, path):
        """The state at `path` (its history and RESUME_KEYS); UsageError naming the file if it is unreadable,
        truncated or incomplete."""
        import h5py
        try:
            with h5py.File(path, "r") as f:
                text = f.attrs["resume"]
            saved = json.loads(text.decode() if isinstance(text, bytes) else text)
            missing = [k for k in ("history", *RESUME_KEYS) if k not in saved]
            if missing:
                raise ValueError(f"its record lacks {', '.join(missing)} (saved by another version?)")
            if not isinstance(saved["history"], list) or not all(isinstance(row, dict) for row in saved["history"]):
                raise ValueError("its history is not a list of epochs")
        except Exception as error:  # zero bytes, truncated, not HDF5, no record, not JSON
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"cannot resume from {path}: {reason} (rerun without --resume and with --overwrite to "
                             "start over)") from None
        return cls(path, saved)

    def check(self, record):
        """UsageError naming every setting of `record` (this command's) that differs from the saved state's."""
        saved = {**{k: self.record["seed"] if default is None and k.endswith("_seed") else default
                    for k, default in OPTION_RESUME_KEYS.items()}, **self.record}
        changed = [k for k in (*RESUME_KEYS, *OPTION_RESUME_KEYS) if saved[k] != record[k]]
        if saved["lr_decay"] == record["lr_decay"] == "cosine" and record["epochs"] != saved.get("epochs"):
            changed.append("epochs")  # a cosine schedule spans the run: another length changes every step's rate
        if changed:
            raise UsageError(f"cannot resume from {self.path}: it was saved with a different "
                             + ", ".join(f"{k} ({saved.get(k)} vs {record[k]} now)" for k in changed)
                             + "; rerun with the same settings, or choose another --run-name")

    def restore(self, model):
        """Loads the saved weights and optimizer state into `model` (compiled); returns the saved history."""
        import warnings
        try:
            model.optimizer.build(model.trainable_variables)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.load_weights(self.path)  # Keras only warns when it skips a mismatched part: refuse instead
            skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
            if skipped:
                raise ValueError(skipped[0].strip())
        except Exception as error:
            raise UsageError(f"cannot resume from {self.path}: {str(error).splitlines()[0]} "
                             "(rerun without --resume and with --overwrite to start over)") from None
        return [dict(row) for row in self.history]


# Every class a network of this project saves (layers, the functional model, initializers, regularizers,
# dtype policies, the tensors between layers) and the modules Keras names them by; anything else in a model
# file (a Lambda, a function, another module) is refused before Keras reads the file.
SAFE_CLASSES = frozenset({
    "Functional", "InputLayer", "Rescaling", "RandomFlip", "RandomTranslation", "Conv2D", "BatchNormalization",
    "Activation", "Add", "Concatenate", "GlobalAveragePooling2D", "AveragePooling2D", "Flatten", "Dense", "Identity",
    "HeNormal", "Zeros", "Ones", "L2", "DTypePolicy", "__keras_tensor__"})
SAFE_MODULES = frozenset({None, "keras", "keras.layers", "keras.initializers", "keras.regularizers",
                          "keras.src.models.functional"})
SAFE_ACTIVATIONS = frozenset({"relu", "softmax", "linear"})


# The largest model configuration read: ResNet-1001's, the biggest of this project, is about 4 MB of JSON.
MAX_MODEL_CONFIG = 32 * 2**20


def _model_config(path):
    """The model's configuration as saved, read as JSON without Keras and never more than MAX_MODEL_CONFIG
    bytes of it: config.json in a .keras archive, the model_config attribute of an .h5 (bounded by the file's
    bytes outside its weight datasets, since attributes are stored uncompressed)."""
    too_big = ValueError(f"its model configuration is larger than {MAX_MODEL_CONFIG // 2**20} MB")
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            if archive.getinfo("config.json").file_size > MAX_MODEL_CONFIG:
                raise too_big
            with archive.open("config.json") as member:
                text = member.read(MAX_MODEL_CONFIG + 1)  # the size in the header may lie
        if len(text) > MAX_MODEL_CONFIG:
            raise too_big
        return json.loads(text)
    import h5py
    with h5py.File(path, "r") as f:
        data_bytes = []
        f.visititems(lambda _, item: data_bytes.append(item.id.get_storage_size())
                     if isinstance(item, h5py.Dataset) else None)
        if os.path.getsize(path) - sum(data_bytes) > MAX_MODEL_CONFIG:
            raise too_big
        text = f.attrs["model_config"]
    return json.loads(text.decode() if isinstance(text, bytes) else text)


def unsafe_entries(config):
    """What in a model configuration this project's networks never hold, e.g. ["keras.layers.Lambda"]."""
    found = []
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "class_name" in node or "module" in node:
                module, name = node.get("module"), node.get("class_name")
                if (not isinstance(module, (str, type(None))) or not isinstance(name, (str, type(None)))
                        or module not in SAFE_MODULES or name not in SAFE_CLASSES
                        or node.get("registered_name") not in (None, name)):
                    found.append((f"{module}.{name}" if module else str(name))[:80])
            activation = node.get("activation")
            if activation is not None and (not isinstance(activation, str) or activation not in SAFE_ACTIVATIONS):
                found.append(f"activation {activation!r}"[:80])
            stack.extend(node.values())
    return found


def check_model_file(path):
    """UsageError naming the file and the reason unless `path` is a .h5 or .keras model whose configuration
    holds only SAFE_CLASSES. Reads JSON only and imports no framework, so it can run before anything else."""
    if not path.endswith((".h5", ".keras")):
        raise UsageError(f"--evaluate {path!r}: expected a .h5 or .keras model saved by a training run")
    try:
        config = _model_config(path)
    except Exception as error:  # not a zip / HDF5 file, no configuration, not JSON
        raise UsageError(f"cannot load {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__} "
                         "(is it a model saved by a training run?)") from None
    unsafe = unsafe_entries(config)
    if unsafe:
        raise UsageError(f"refusing to load {path}: it holds {', '.join(sorted(set(unsafe)))}, which this "
                         "project's networks never use (evaluate only model files you trust)")


def load_model_safely(path):
    """The model saved at `path`, checked (check_model_file, again: the file may have changed since an earlier
    check) and loaded by Keras with safe_mode=True and compile=False; UsageError if Keras refuses it."""
    import keras
    check_model_file(path)
    try:
        with without_tensorflow():
            return keras.models.load_model(os.fspath(path), compile=False, safe_mode=True)
    except Exception as error:
        raise UsageError(f"cannot load {path}: {str(error).splitlines()[0]}") from None

"""Shared by every train_*.py script: the training recipe, CIFAR data, the residual-unit builder,
the training loop and its outputs.

Import-safe and quick to import: only the standard library and numpy are imported here at module
level. Keras (and through it TensorFlow, JAX or PyTorch) is imported inside the functions that need
it, after the command line and every path have been checked, so that bad input is reported at once
as one line on stderr (exit code 2) instead of after the framework's start-up log.

A family script provides four things and calls `main`:
    add_arguments(parser)       its own flags (depth, unit type, ...)
    check(args)                 raises UsageError for combinations argparse cannot check
    run_name(args)              e.g. "resnet32_e" (the dataset is appended here)
    build_model(args, classes)  the Keras model, built from the helpers below
"""

import argparse
import csv
import functools
import io
import json
import math
import os
import pickle
import shlex
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# --- Training recipe: He et al. 2016 "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027)
# as run by the seed article (BIGBALLON/cifar-10-cnn ResNet-32): SGD, Nesterov, 200 epochs. ---
EPOCHS = 200
BATCH_SIZE = 128
LR_SCHEDULE = "0:0.1,81:0.01,122:0.001"  # EPOCH:LR pairs; epochs count from 0 as Keras's do
MOMENTUM = 0.9  # SGD momentum, Nesterov
WEIGHT_DECAY = 1e-4  # L2 kernel regularizer: loss += WEIGHT_DECAY * sum(w ** 2)
BN_MOMENTUM = 0.9  # BatchNormalization as in the Torch ResNets the seed article copies
BN_EPSILON = 1e-5
SEED = 0

# --- Data: CIFAR images and their per-channel statistics on 0-255 pixels (the seed article's). ---
IMAGE_SHAPE = (32, 32, 3)
PIXEL_MEAN = (125.307, 122.95, 113.865)
PIXEL_STD = (62.9932, 62.0887, 66.7048)
SHIFT_FRACTION = 0.125  # random shifts of up to 0.125 * 32 = 4 pixels, zero fill (He et al. 2015)
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # "auto" or a Keras dtype policy
EVAL_BATCH_SIZE = 1000  # evaluation keeps no activations for a backward pass: bigger batches, same numbers


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2, never a traceback."""


class TrainingError(Exception):
    """Training itself failed (a NaN loss): one line on stderr, exit code 1."""


@dataclass(frozen=True)
class Dataset:
    title: str
    classes: int
    folder: str  # the official "python version" layout ...
    archive: str  # ... and the tarball that holds it
    train_files: tuple
    test_files: tuple
    label_key: bytes


DATASETS = {
    "cifar10": Dataset("CIFAR-10", 10, "cifar-10-batches-py", "cifar-10-python.tar.gz",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"),
    "cifar100": Dataset("CIFAR-100", 100, "cifar-100-python", "cifar-100-python.tar.gz",
                        ("train",), ("test",), b"fine_labels"),
}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (UsageError) instead of usage plus a message."""

    def error(self, message):  # argparse prints usage and a second line; we want one line
        raise UsageError(f"{message} (see --help)")


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


positive_int = _int_at_least(1)


def _positive_float(text):
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def stack_n(text):
    """Units per stage of a 6n+2 network: n >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"got {text!r}, but n must be an integer >= 1: depth must be 6n+2: 20, 32, 44, 56, 110 "
            "(n = 3, 5, 7, 9, 18)")
    return value


def parse_lr_schedule(text):
    """'0:0.1,81:0.01,122:0.001' -> [(0, 0.1), (81, 0.01), (122, 0.001)]: the rate from each epoch on."""
    example = f"expected EPOCH:LR pairs starting at epoch 0, e.g. {LR_SCHEDULE!r}; got {text!r}"
    try:
        pairs = [item.split(":") for item in text.split(",")]
        schedule = [(int(epoch), float(lr)) for epoch, lr in pairs]
    except ValueError:
        raise argparse.ArgumentTypeError(example) from None
    epochs = [epoch for epoch, _ in schedule]
    if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise argparse.ArgumentTypeError(f"epochs must start at 0 and increase; {example}")
    if not all(math.isfinite(lr) and lr > 0 for _, lr in schedule):
        raise argparse.ArgumentTypeError(f"learning rates must be positive; {example}")
    return schedule


# What an unset --epochs / --weight-decay / --lr-schedule means, unless the family's check() says otherwise.
RECIPE_DEFAULTS = {"epochs": EPOCHS, "weight_decay": WEIGHT_DECAY, "lr_schedule": parse_lr_schedule(LR_SCHEDULE)}


def lr_at_epoch(schedule, epoch):
    return [lr for start, lr in schedule if start <= epoch][-1]


def make_parser(description, add_arguments):
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(DATASETS), default="cifar10")
    data.add_argument("--data-dir", metavar="DIR",
                      help="a local copy in the official python layout: DIR/cifar-10-batches-py/ or "
                           "DIR/cifar-10-python.tar.gz (cifar-100-python likewise); default: download "
                           "through keras.datasets")
    data.add_argument("--train-limit", type=positive_int, metavar="N",
                      help="train on the first N training images only")
    recipe = parser.add_argument_group("training recipe (defaults: He et al. 2016, the seed article)")
    recipe.add_argument("--epochs", type=positive_int, help=f"default {EPOCHS}")
    recipe.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help="steps per epoch = floor(training images / batch size)")
    recipe.add_argument("--lr-schedule", type=parse_lr_schedule, metavar="E:LR,...", help=f"step schedule: LR from epoch E on (counted from 0); "
                                                 f"default {LR_SCHEDULE}")
    recipe.add_argument("--weight-decay", type=_nonnegative_float,
                        help=f"L2 penalty on kernels: loss += wd * sum(w^2) (default {WEIGHT_DECAY:g})")
    recipe.add_argument("--seed", type=int, default=SEED,
                        help="weights, data order and augmentation all follow from it")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="compute precision; mixed_* keep float32 weights, BN statistics, softmax and loss "
                            "(mixed_float16 adds loss scaling); auto: mixed_bfloat16 where it was measured "
                            "faster (TensorFlow on a CPU with bfloat16 instructions), else float32")
    scale = parser.add_argument_group("scale out")
    scale.add_argument("--distribute", action="store_true",
                       help="data parallelism over every visible device: keras.distribution.DataParallel on "
                            "JAX, tf.distribute.MirroredStrategy on TensorFlow; --batch-size is the global batch")
    scale.add_argument("--lr-scale", type=_positive_float, default=1.0, metavar="K",
                       help="multiply every --lr-schedule rate by K; linear scaling rule: K = batch size / 128")
    scale.add_argument("--cpu-devices", type=positive_int, metavar="N",
                       help="split the CPU into N devices, to try --distribute on a machine without GPUs")
    out = parser.add_argument_group("outputs")
    out.add_argument("--run-name", help="default: <model>_<dataset>, e.g. resnet32_e_cifar10")
    out.add_argument("--log-dir", default="logs", help="TensorBoard logs go to LOG_DIR/<run-name>/")
    out.add_argument("--checkpoint-dir", default="checkpoints",
                     help="<run-name>.h5, .csv (history) and .json (configuration)")
    out.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its last completed epoch (same command plus --resume)")
    out.add_argument("--verbose", type=int, choices=(0, 1, 2),
                     help="Keras progress: 1 bar, 2 one line per epoch (default: 1 on a terminal, else 2)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--summary", action="store_true",
                       help="print model.summary() and exit without loading data")
    modes.add_argument("--evaluate", metavar="PATH", help="evaluate a saved .h5 model on the test set")
    return parser


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

class ArrayOnlyUnpickler(pickle.Unpickler):
    """Reads the CIFAR pickles and refuses everything but numpy arrays (as keras.datasets does):
    loading a hostile file then cannot call any function."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("_codecs", "encode"),  # array bytes in protocol-2 pickles written by Python 3: text -> bytes only
    })

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _read_batch(fileobj, where, label_key, classes):
    try:
        batch = ArrayOnlyUnpickler(fileobj, encoding="bytes").load()
    except Exception as error:  # truncated, corrupt or hostile: the message names the file
        raise UsageError(f"cannot read {where}: {error} (re-download or rebuild the data)") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise UsageError(f"{where} is not a CIFAR batch: it needs b'data' and {label_key!r} "
                         "(is --dataset right?)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise UsageError(f"{where}: images must be uint8 rows of 3072 pixels, got {data.dtype} "
                         f"{data.shape} (re-download or rebuild the data)")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise UsageError(f"{where}: expected {len(data)} integer labels, got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"{where}: labels must be 0..{classes - 1}, found {labels.min()}..{labels.max()} "
                         "(is --dataset right?)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
    return np.ascontiguousarray(images), labels.astype(np.int32)


def find_local_data(data_dir, dataset):
    """The folder or the tarball of `dataset` under data_dir; UsageError if neither is there."""
    spec = DATASETS[dataset]
    folder = os.path.join(data_dir, spec.folder)
    archive = os.path.join(data_dir, spec.archive)
    if os.path.isdir(folder):
        return folder
    if os.path.isfile(archive):
        return archive
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir!r} does not exist (give the folder that holds "
                         f"{spec.folder}/ or {spec.archive})")
    raise UsageError(f"--data-dir {data_dir!r} holds neither {spec.folder}/ nor {spec.archive} "
                     f"(download {spec.title} 'python version' there)")


def load_local(source, dataset, files):
    """Concatenated (images, labels) from the official batch files, in a folder or a .tar.gz."""
    spec = DATASETS[dataset]
    parts = []
    if os.path.isdir(source):
        for name in files:
            path = os.path.join(source, name)
            if not os.path.isfile(path):
                raise UsageError(f"{path} is missing (re-download or rebuild the data)")
            with open(path, "rb") as f:
                parts.append(_read_batch(f, path, spec.label_key, spec.classes))
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for name in files:
                    where = f"{source}:{spec.folder}/{name}"
                    try:
                        member = tar.extractfile(f"{spec.folder}/{name}")
                    except KeyError:
                        raise UsageError(f"{where} is missing (re-download the archive)") from None
                    parts.append(_read_batch(io.BytesIO(member.read()), where, spec.label_key, spec.classes))
        except (tarfile.TarError, OSError, EOFError) as error:
            raise UsageError(f"cannot read {source}: {error} (re-download the archive)") from None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_data(args, train=True):
    """((x_train, y_train), (x_test, y_test)): uint8 NHWC images and int32 labels. Without --data-dir,
    downloads through keras.datasets. With train=False the training part is (None, None)."""
    spec = DATASETS[args.dataset]
    if args.data_dir:
        source = find_local_data(args.data_dir, args.dataset)
        test = load_local(source, args.dataset, spec.test_files)
        trainset = load_local(source, args.dataset, spec.train_files) if train else (None, None)
    else:
        import keras
        loader = keras.datasets.cifar10 if args.dataset == "cifar10" else keras.datasets.cifar100
        try:
            (xa, ya), (xb, yb) = loader.load_data()
        except Exception as error:
            raise UsageError(f"could not download {spec.title} through keras.datasets ({error}); "
                             "fix: pass --data-dir with a local copy") from None
        trainset, test = (xa, ya.reshape(-1).astype(np.int32)), (xb, yb.reshape(-1).astype(np.int32))
    if train and args.train_limit:
        trainset = (trainset[0][:args.train_limit], trainset[1][:args.train_limit])
    return trainset, test


# ----------------------------------------------------------------------------------------------
# Layers and the residual-unit builder (Keras imported lazily, see the module docstring)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Style:
    """How a family makes its convolutions and batch normalizations (spec: "Unless a family says
    otherwise"): padding same, he_normal, L2 on kernels, biases on, BN momentum 0.9 / epsilon 1e-5."""
    weight_decay: float = WEIGHT_DECAY
    use_bias: bool = True
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    def conv(self, filters, kernel_size, strides=1, groups=1, name=None):
        import keras
        return keras.layers.Conv2D(
            filters, kernel_size, strides=strides, groups=groups, padding="same", use_bias=self.use_bias,
            kernel_initializer="he_normal", kernel_regularizer=self.regularizer(), name=name)

    def bn(self, name=None):
        return batch_normalization_class()(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name)

    def regularizer(self):
        import keras
        return keras.regularizers.L2(self.weight_decay) if self.weight_decay else None

    def dense(self, classes, regularize=True):
        import keras
        # float32 softmax whatever the compute precision: the loss stays accurate under mixed precision
        return keras.layers.Dense(classes, activation="softmax", kernel_initializer="he_normal",
                                  kernel_regularizer=self.regularizer() if regularize else None,
                                  dtype="float32", name="predictions")


@functools.cache
def batch_normalization_class():
    """keras.layers.BatchNormalization, or on TensorFlow without a GPU its fused twin (measured 1.35x
    faster training in float32, 1.5x in bfloat16: bench.py --batch-norm auto keras, README "Performance").
    Same weights, same names, same numbers to float rounding."""
    import keras
    if keras.backend.backend() != "tensorflow":
        return keras.layers.BatchNormalization  # XLA (JAX) and torch fuse or run it well already
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        return keras.layers.BatchNormalization  # XLA (jit_compile on a GPU) fuses it already
    return _fused_batch_normalization_class()


@functools.cache
def _fused_batch_normalization_class():
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="resnet_cifar")
    class FusedBatchNormalization(keras.layers.BatchNormalization):
        """Keras's BatchNormalization computed by TensorFlow's one fused kernel (FusedBatchNormV3, what
        tf.keras used) instead of a dozen separate ops: on a CPU each of those ops is a pass over memory.
        Batch statistics, moving averages (biased batch variance, as Keras) and epsilon are Keras's."""

        def _fusable(self, inputs, mask):
            return (mask is None and not self.synchronized and not self.renorm and self.scale and self.center
                    and len(inputs.shape) == 4 and self.axis in (-1, 3))

        def call(self, inputs, training=None, mask=None):
            if not self._fusable(inputs, mask):
                return super().call(inputs, training=training, mask=mask)
            x = inputs if inputs.dtype in (tf.float16, tf.bfloat16, tf.float32) else tf.cast(inputs, "float32")
            train = bool(training and self.trainable)
            empty = tf.constant([], "float32")
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=tf.cast(self.gamma, "float32"), offset=tf.cast(self.beta, "float32"),
                mean=empty if train else tf.cast(self.moving_mean, "float32"),
                variance=empty if train else tf.cast(self.moving_variance, "float32"),
                epsilon=self.epsilon, data_format="NHWC", is_training=train)
            if train:
                n = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
                variance = variance * ((n - 1.0) / n)  # the kernel returns the unbiased variance; Keras's is biased
                for average, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                    average.assign(average * self.momentum + batch * (1.0 - self.momentum))
            return tf.cast(y, self.compute_dtype)

    return FusedBatchNormalization


def with_batch_normalization(model, cls):
    """`model` with every BatchNormalization layer of class `cls`, same names and weights (a copy, or
    `model` itself when nothing changes). Checkpoints are saved with Keras's own class, so a .h5 loads
    in plain Keras without this code; training and --evaluate put the fused class back on TensorFlow's CPU."""
    import keras
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if all(type(layer) is cls for layer in norms):
        return model

    def clone(layer):
        layer_class = cls if isinstance(layer, keras.layers.BatchNormalization) else layer.__class__
        return layer_class.from_config(layer.get_config())
    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        copy.get_layer(layer.name).set_weights(layer.get_weights())
    return copy


@dataclass(frozen=True)
class Unit:
    """A residual unit written as the order of its layers (He et al. 2016, Fig. 4).

    residual:   the branch F, e.g. "bn relu conv3 bn relu conv3"; convK is a KxK convolution; the first
                convolution carries the unit's stride; all but the last have `width` outputs.
    after_add:  layers after the addition, e.g. "relu" (original) or "bn relu" (BN after addition).
    projection: where a projection shortcut (1x1, strided) reads from when the shape changes:
                "input" (the raw unit input x) or "activated" (x after the branch's leading bn/relu).
    projection_bn: a BN after the projection convolution.
    """
    residual: str
    after_add: str = ""
    projection: str = "input"
    projection_bn: bool = False

    def without_preactivation(self):
        """The same unit minus the layers before its first convolution (a network's very first unit)."""
        tokens = self.residual.split()
        first_conv = next(i for i, t in enumerate(tokens) if t.startswith("conv"))
        return Unit(" ".join(tokens[first_conv:]), self.after_add, "input", self.projection_bn)


def _apply(token, x, name, style):
    import keras
    if token == "bn":
        return style.bn(name=name)(x)
    if token == "relu":
        return keras.layers.Activation("relu", name=name)(x)
    raise ValueError(f"unknown layer {token!r}")


def residual_unit(x, filters, strides, unit, name, style=Style(), width=None, groups=1, shortcut=True):
    """One residual unit; layer names are fixed (<name>_conv1, <name>_bn1, ...) so weights reload by name.

    filters: output channels; width: channels of the inner convolutions (default: filters);
    groups: groups of the 3x3 convolutions (ResNeXt); shortcut=False gives the plain twin."""
    import keras
    tokens = unit.residual.split()
    n_convs = sum(t.startswith("conv") for t in tokens)
    counts = {"conv": 0, "bn": 0, "relu": 0}
    y = activated = x
    for token in tokens:
        kind = "conv" if token.startswith("conv") else token
        counts[kind] += 1
        layer_name = f"{name}_{kind}{counts[kind]}"
        if kind == "conv":
            kernel = int(token[len("conv"):])
            last = counts["conv"] == n_convs
            y = style.conv(filters if last else (width or filters), kernel,
                           strides=strides if counts["conv"] == 1 else 1,
                           groups=groups if kernel > 1 else 1, name=layer_name)(y)
        else:
            y = _apply(token, y, layer_name, style)
            if counts["conv"] == 0:
                activated = y
    if shortcut:
        skip = x
        if strides != 1 or x.shape[-1] != filters:
            source = activated if unit.projection == "activated" else x
            skip = style.conv(filters, 1, strides=strides, name=f"{name}_projection")(source)
            if unit.projection_bn:
                skip = style.bn(name=f"{name}_projection_bn")(skip)
        y = keras.layers.Add(name=f"{name}_add")([y, skip])
    for i, token in enumerate(unit.after_add.split(), start=1):
        y = _apply(token, y, f"{name}_post{i}_{token}", style)
    return y


# The residual units of He et al. 2016, Fig. 4 (a-e), and the "v2" forms of d and e whose projection
# reads the raw input. For a, b, c the projection always reads the raw input.
UNITS = {
    "a": Unit("conv3 bn relu conv3 bn", after_add="relu"),  # original
    "b": Unit("conv3 bn relu conv3", after_add="bn relu"),  # BN after addition
    "c": Unit("conv3 bn relu conv3 bn relu"),  # ReLU before addition
    "d": Unit("relu conv3 bn relu conv3 bn", projection="activated"),  # ReLU-only pre-activation
    "e": Unit("bn relu conv3 bn relu conv3", projection="activated"),  # full pre-activation
    "d-v2": Unit("relu conv3 bn relu conv3 bn", projection="input"),
    "e-v2": Unit("bn relu conv3 bn relu conv3", projection="input"),
}


def stack(x, stages, unit_fn):
    """Stages from a table of (filters, units, stride) or (filters, units, stride, width): the stride
    applies to each stage's first unit; unit_fn(x, filters, strides, name[, width]) builds one unit."""
    for s, (filters, units, stride, *width) in enumerate(stages, start=1):
        extra = {"width": width[0]} if width else {}
        for u in range(1, units + 1):
            x = unit_fn(x, filters, stride if u == 1 else 1, name=f"stage{s}_unit{u}", **extra)
    return x


def bn_relu_gap_head(x, classes, style=Style()):
    """The spec's head: BN -> ReLU -> GlobalAveragePooling -> Dense(softmax)."""
    import keras
    x = style.bn(name="head_bn")(x)
    x = keras.layers.Activation("relu", name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    return style.dense(classes)(x)


def image_input():
    """The network's input and its weightless preprocessing, both inside the saved model, so a saved
    .h5 takes raw 0-255 pixels (uint8 or float) and needs nothing else:
    per-channel standardization, then in training only a random horizontal flip and a random shift of
    up to 4 pixels filled with 0 (the mean pixel, after standardization) as ImageDataGenerator does."""
    import keras
    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = keras.layers.Rescaling(scale=[1 / s for s in PIXEL_STD],
                               offset=[-m / s for m, s in zip(PIXEL_MEAN, PIXEL_STD)], name="standardize")(inputs)
    x = keras.layers.RandomFlip("horizontal", name="random_flip")(x)
    x = keras.layers.RandomTranslation(SHIFT_FRACTION, SHIFT_FRACTION, fill_mode="constant", fill_value=0.0,
                                       interpolation="nearest", name="random_shift")(x)
    return inputs, x


def model_from(inputs, outputs, name):
    import keras
    return keras.Model(inputs, outputs, name=name)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

def _check_writable_dir(path, flag):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file, not a folder (choose another {flag})")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path!r} is not writable ({error.strerror}); choose another {flag}") from None


TMP_PREFIX = ".tmp-"


def atomic_write(path, write):
    """write(tmp_path) produces the file; it appears under `path` only once complete (os.replace is atomic),
    so a crash or a kill mid-write leaves any previous file at `path` intact. The temporary name keeps the
    final name's ending (Keras picks the format from it): .tmp-XXXX-<name>."""
    directory, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=f"-{base}", dir=directory or ".")
    os.close(fd)
    os.remove(tmp)  # Keras and h5py want to create the file themselves
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory, filenames):
    """Temporaries a killed run left behind for these exact file names (another run's, e.g. the same model
    on cifar100, are left alone): never a complete file, safe to delete."""
    for entry in os.listdir(directory):
        if entry.startswith(TMP_PREFIX) and entry.split("-", 2)[-1] in filenames:
            os.remove(os.path.join(directory, entry))


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


HISTORY_FIELDS = ("epoch", "loss", "accuracy", "test_loss", "test_accuracy", "learning_rate", "seconds")


def write_history(path, history):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, out.getvalue())


class ScalarLog:
    """TensorBoard scalars per epoch, written through the tensorboard package alone (Keras's TensorBoard
    callback needs TensorFlow, which a JAX or PyTorch run must not need). Train and test curves go to
    <run>/train and <run>/test with the same tags, so TensorBoard draws them on one chart."""

    def __init__(self, run_dir):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.writers = {split: EventFileWriter(os.path.join(run_dir, split)) for split in ("train", "test")}

    def write(self, row):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        scalars = {"train": {"epoch_loss": row["loss"], "epoch_accuracy": row["accuracy"],
                             "epoch_learning_rate": row["learning_rate"]},
                   "test": {"epoch_loss": row["test_loss"], "epoch_accuracy": row["test_accuracy"]}}
        for split, values in scalars.items():
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
            self.writers[split].add_event(Event(wall_time=time.time(), step=row["epoch"], summary=summary))
            self.writers[split].flush()

    def close(self):
        for writer in self.writers.values():
            writer.close()


def final_line(**fields):
    return "final: " + " ".join(f"{key}={value}" for key, value in fields.items())


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def compile_model(model, args, steps_per_epoch, jit_compile="auto"):
    import keras
    schedule = args.lr_schedule
    if len(schedule) == 1:
        learning_rate = schedule[0][1]
    else:
        # optimizer.iterations counts finished steps, and PiecewiseConstantDecay switches once
        # step > boundary: so the first step of epoch E (step E * steps_per_epoch) gets the new rate.
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries=[epoch * steps_per_epoch - 1 for epoch, _ in schedule[1:]],
            values=[lr for _, lr in schedule])
    # jit_compile="auto": XLA on TensorFlow only with a GPU (on a CPU it is slower: bench.py), always on JAX
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=MOMENTUM, nesterov=True),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=jit_compile)


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


def fit(model, args, data, paths, config):
    """Trains epoch by epoch, saving the state after each; with --resume continues from the saved state.
    Returns (history, seconds, training images per second) of this process's epochs."""
    import keras
    (x_train, y_train), (x_test, y_test) = data
    steps = config["steps_per_epoch"]
    compile_model(model, args, steps)
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
    _clear_old_events(paths["log_run"])
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
                            "learning_rate": lr_at_epoch(args.lr_schedule, epoch),
                            "seconds": round(time.perf_counter() - epoch_start, 3)})
            save_state(model, paths["state"], history, config)
            write_histories()
            log.write(history[-1])
    finally:
        log.close()
    seconds = time.perf_counter() - start
    images = steps * args.batch_size * max(args.epochs - first, 0)
    return history, seconds, images / seconds if seconds > 0 else 0.0


def cpu_has_bfloat16():
    """AVX512-BF16 or AMX: the CPU computes bfloat16 natively (oneDNN then runs bf16 convolutions)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision):
    """--precision auto, by measurement (bench.py, README "Performance"): TensorFlow on a CPU with bfloat16
    instructions trains ResNet-32 about 1.44x faster in mixed_bfloat16 (paired short real-data runs ended
    0.66 points under float32 after 6 epochs, 0.37 after 15: results/README.md; --precision float32 for
    reference accuracies); everywhere else (GPUs already use TF32 tensor cores for float32; XLA's CPU bf16
    was not measured faster) float32."""
    if precision != "auto":
        return precision
    import keras
    backend = keras.backend.backend()
    if backend == "tensorflow" and cpu_has_bfloat16():
        import tensorflow as tf
        if not tf.config.list_physical_devices("GPU"):
            return "mixed_bfloat16"
    return "float32"


def configure_backend(precision="float32", cpu_devices=None):
    """Session setup, run from main and bench only: quieter TensorFlow start-up, the dtype policy and,
    for --cpu-devices, the host CPU split into several devices (before the framework starts).
    Returns the precision in force ("auto" resolved)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)  # .h5 is our chosen format: no "legacy" warning
    if cpu_devices:
        # CPU "devices" share the cores, so one may reach a collective long after the other: XLA's
        # default 40 s rendezvous timeout then aborts a healthy run on a small machine.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={cpu_devices}"
                                   + " --xla_cpu_collective_call_terminate_timeout_seconds=900").strip()
    import keras
    if cpu_devices and keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    precision = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(precision)
    return precision


def distribution(args):
    """(scope to build and train in, number of replicas) for --distribute; the framework's own engine.
    BatchNorm: on JAX the step is one program over the sharded global batch, so XLA all-reduces the batch
    statistics (synchronized BN); on TensorFlow the layers are switched to synchronized=True."""
    import contextlib

    import keras
    backend = keras.backend.backend()
    if not args.distribute:
        return contextlib.nullcontext(), 1
    if backend == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext(), len(devices)
    if backend == "tensorflow":
        import tensorflow as tf
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        return strategy.scope(), strategy.num_replicas_in_sync
    raise UsageError(f"--distribute is not supported on the {backend} backend "
                     "(use KERAS_BACKEND=jax or tensorflow, or train without --distribute)")


def synchronize_batch_norm(model, on):
    """TensorFlow replicas see only their share of the batch: synchronized BN uses the global batch's
    statistics, as one device would. Switched off again before saving (the option is TensorFlow-only)."""
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on


def main(description, add_arguments, run_name, build_model, check=None, argv=None):
    """Parse and check everything, then train, evaluate or summarize. Bad input: one line, exit 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        _run(description, add_arguments, run_name, build_model, check, argv)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:
        print(f"{prog}: training failed: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def parse_args(add_arguments, argv=None, check=None, description=None):
    """A family's command line, checked, with the recipe's defaults filled in and --lr-scale applied."""
    args = make_parser(description, add_arguments).parse_args(argv)
    if check:
        check(args)  # may choose the family's own recipe defaults
    for key, value in RECIPE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lr_schedule = [(epoch, lr * args.lr_scale) for epoch, lr in args.lr_schedule]
    return args


def _run(description, add_arguments, run_name, build_model, check, argv):
    args = parse_args(add_arguments, argv, check, description)
    spec = DATASETS[args.dataset]
    name = args.run_name or f"{run_name(args)}_{args.dataset}"
    if args.summary:
        args.precision = configure_backend(args.precision)
        build_model(args, spec.classes).summary()
        return
    # Fail fast: every path before any data is read or the framework is imported.
    if args.data_dir:
        find_local_data(args.data_dir, args.dataset)
    if args.evaluate:
        return _evaluate(args, name, spec)
    _check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    _check_writable_dir(os.path.join(args.log_dir, name), "--log-dir")
    try:
        import tensorboard  # noqa: F401  (the scalar log needs it; say so now, not after an epoch)
    except ImportError:
        raise UsageError("the tensorboard package is missing; fix: pip install tensorboard") from None
    paths = {"h5": os.path.join(args.checkpoint_dir, f"{name}.h5"),
             "csv": os.path.join(args.checkpoint_dir, f"{name}.csv"),
             "json": os.path.join(args.checkpoint_dir, f"{name}.json"),
             "state": os.path.join(args.checkpoint_dir, f"{name}.state.weights.h5"),
             "log_run": os.path.join(args.log_dir, name),
             "log_csv": os.path.join(args.log_dir, name, "history.csv"),
             "log_json": os.path.join(args.log_dir, name, "config.json")}
    data = load_data(args)
    if len(data[0][0]) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(data[0][0])} training images "
                         "(lower --batch-size or raise --train-limit)")

    args.precision = configure_backend(args.precision, args.cpu_devices)
    import keras
    scope, devices = distribution(args)
    if args.batch_size % devices:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {devices} devices "
                         f"(use a multiple of {devices})")
    keras.utils.set_random_seed(args.seed)
    with scope:
        model = build_model(args, spec.classes)
        config = _resolved_config(args, name, model, data, paths)
        config["devices"] = devices
        remove_stale_temporaries(args.checkpoint_dir,
                                  {os.path.basename(paths[k]) for k in ("h5", "csv", "json", "state")})
        for key in ("json", "log_json"):
            write_text(paths[key], json.dumps(config, indent=2) + "\n")
        if args.distribute and keras.backend.backend() == "tensorflow":
            synchronize_batch_norm(model, True)
        history, seconds, images_per_s = fit(model, args, data, paths, config)
        synchronize_batch_norm(model, False)
    save_model(model, paths["h5"])
    last = history[-1]
    print(f"saved {paths['h5']}, history {paths['csv']}, configuration {paths['json']}, "
          f"TensorBoard logs {paths['log_run']}")
    print(final_line(run=name, epochs=len(history), params=model.count_params(),
                     test_acc=f"{last['test_accuracy']:.4f}", test_loss=f"{last['test_loss']:.4f}",
                     train_images_per_s=f"{images_per_s:.1f}", seconds=f"{seconds:.1f}", devices=devices))


def _resolved_config(args, name, model, data, paths):
    import keras
    config = {key: value for key, value in vars(args).items() if key not in ("summary", "evaluate", "resume")}
    config["lr_schedule"] = ",".join(f"{epoch}:{lr:g}" for epoch, lr in args.lr_schedule)  # after --lr-scale
    train_images = len(data[0][0])
    config.update(run_name=name, model=model.name, params=model.count_params(),
                  trainable_params=sum(int(np.prod(w.shape)) for w in model.trainable_weights),
                  train_images=train_images, test_images=len(data[1][0]),
                  steps_per_epoch=train_images // args.batch_size, eval_batch_size=EVAL_BATCH_SIZE,
                  momentum=MOMENTUM, nesterov=True, backend=keras.backend.backend(), keras=keras.__version__,
                  checkpoint=paths["h5"], command=shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    return config


def _clear_old_events(run_dir):
    """A fresh run under an existing name replaces that run's TensorBoard curves instead of mixing in."""
    for split in ("train", "test"):
        folder = os.path.join(run_dir, split)
        if os.path.isdir(folder):
            for entry in os.listdir(folder):
                if entry.startswith("events.out.tfevents."):
                    os.remove(os.path.join(folder, entry))


def _evaluate(args, name, spec):
    if not os.path.isfile(args.evaluate):
        raise UsageError(f"--evaluate {args.evaluate!r}: no such file (give a .h5 saved by a training run)")
    _, (x_test, y_test) = load_data(args, train=False)
    configure_backend()
    import keras
    try:
        model = keras.models.load_model(args.evaluate, compile=False)
    except Exception as error:
        raise UsageError(f"cannot load {args.evaluate}: {str(error).splitlines()[0]}") from None
    classes = model.output_shape[-1]
    if classes != spec.classes:
        raise UsageError(f"{args.evaluate} predicts {classes} classes but {spec.title} has {spec.classes} "
                         "(is --dataset right?)")
    model = with_batch_normalization(model, batch_normalization_class())  # the kernels training evaluated with
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    loss, accuracy = model.evaluate(*batches(x_test, y_test, EVAL_BATCH_SIZE), verbose=0)
    seconds = time.perf_counter() - start
    saved = os.path.splitext(args.evaluate)[0] + ".json"
    epochs = 0
    if os.path.isfile(saved):
        with open(saved) as f:
            epochs = json.load(f).get("epochs", 0)
    run = os.path.splitext(os.path.basename(args.evaluate))[0]
    print(final_line(run=run, epochs=epochs, params=model.count_params(), test_acc=f"{accuracy:.4f}",
                     test_loss=f"{loss:.4f}", train_images_per_s="0.0", seconds=f"{seconds:.1f}"))

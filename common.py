"""Shared by every train_*.py script: the training recipe, CIFAR preprocessing and augmentation, the step
learning-rate schedule, the command line and `main`.

Import-safe and quick to import: only the standard library, numpy and this project's framework-free
modules are imported at module level. Keras (and through it TensorFlow, JAX or PyTorch) is imported inside
the functions that need it, after the command line and every path have been checked, so that bad input is
reported at once as one line on stderr (exit code 2) instead of after the framework's start-up log.

A family script provides four things and calls `main`:
    add_arguments(parser)       its own flags (depth, unit type, ...)
    check(args)                 raises UsageError for combinations argparse cannot check
    run_name(args)              e.g. "resnet32_e" (the dataset is appended here)
    build_model(args, classes)  the Keras model, built with units.py and `image_input` below

Where the rest lives: cifar_data.py (reading the CIFAR files), units.py (the residual-unit builder),
batch_norm.py, training.py (the loop, resume), checkpoints.py, outputs.py (history, TensorBoard, atomic
writes), devices.py (backend and precision), distributed.py (--distribute).
"""

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import tempfile
import time

import numpy as np

from batch_norm import batch_normalization_class, with_batch_normalization
from checkpoints import check_model_file, load_model_safely, save_model
from cifar_data import DATASETS, IMAGE_SHAPE, find_local_data, load_data
from devices import (PRECISIONS, configure_backend, resolve_jit_compile, resolve_steps_per_execution,
                     where_it_trains)
import distributed
from distributed import WAIT_TIMEOUT_S, Watchdog, distribution, synchronize_batch_norm
from errors import TrainingError, UsageError
from outputs import (CHECKPOINT_FILES, check_writable_dir, final_line, private_run_paths, remove_stale_temporaries,
                     run_paths, write_text)
from training import EVAL_BATCH_SIZE, batches, fit, fuse_steps

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

# --- Preprocessing and augmentation: per-channel statistics on 0-255 pixels (the seed article's). ---
PIXEL_MEAN = (125.307, 122.95, 113.865)
PIXEL_STD = (62.9932, 62.0887, 66.7048)
SHIFT_FRACTION = 0.125  # random shifts of up to 0.125 * 32 = 4 pixels, zero fill (He et al. 2015)


# ----------------------------------------------------------------------------------------------
# Command line and the step learning-rate schedule
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


def steps_per_execution(text):
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") from None


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
    recipe.add_argument("--lr-schedule", type=parse_lr_schedule, metavar="E:LR,...",
                        help=f"step schedule: LR from epoch E on (counted from 0); default {LR_SCHEDULE}")
    recipe.add_argument("--weight-decay", type=_nonnegative_float,
                        help=f"L2 penalty on kernels: loss += wd * sum(w^2) (default {WEIGHT_DECAY:g})")
    recipe.add_argument("--seed", type=int, default=SEED,
                        help="weights, data order and augmentation all follow from it")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--precision", choices=PRECISIONS, default="float32",
                       help="compute precision, default float32 as in the papers; mixed_* keep float32 weights, "
                            "BN statistics, softmax and loss (mixed_float16 adds loss scaling); auto: "
                            "mixed_bfloat16 where it was measured faster (TensorFlow on a CPU with bfloat16 "
                            "instructions: 1.44x, about 0.4-0.7 points lower in short runs), else float32")
    speed.add_argument("--steps-per-execution", type=steps_per_execution, default="auto", metavar="N",
                       help="training steps per compiled call (Keras compile(steps_per_execution=)): the host "
                            "runs callbacks and reads the logs once per N steps; auto: the measured best for the "
                            "device type (devices.STEPS_PER_EXECUTION)")
    scale = parser.add_argument_group("scale out")
    scale.add_argument("--distribute", action="store_true",
                       help="data parallelism over every visible device: keras.distribution.DataParallel on "
                            "JAX, tf.distribute.MirroredStrategy on TensorFlow; --batch-size is the global batch")
    scale.add_argument("--lr-scale", type=_positive_float, default=1.0, metavar="K",
                       help="multiply every --lr-schedule rate by K; linear scaling rule: K = batch size / 128")
    scale.add_argument("--cpu-devices", type=positive_int, metavar="N",
                       help="split the CPU into N devices, to try --distribute on a machine without GPUs")
    scale.add_argument("--coordinator", metavar="HOST:PORT",
                       help="JAX on several machines: process 0's address; with --num-processes and --process-id "
                            "(TensorFlow reads the standard TF_CONFIG instead)")
    scale.add_argument("--num-processes", type=positive_int, metavar="N", help="processes in the JAX cluster")
    scale.add_argument("--process-id", type=_int_at_least(0), metavar="I", help="this process, 0 to N-1; 0 writes")
    scale.add_argument("--wait-timeout", type=_positive_float, default=WAIT_TIMEOUT_S, metavar="S",
                       help="with --distribute, end the run (exit code 1) when no step finishes for S seconds, "
                            f"e.g. a worker that never comes (default {WAIT_TIMEOUT_S})")
    out = parser.add_argument_group("outputs")
    out.add_argument("--run-name", help="default: <model>_<dataset>, e.g. resnet32_e_cifar10")
    out.add_argument("--log-dir", default="logs", help="TensorBoard logs go to LOG_DIR/<run-name>/")
    out.add_argument("--checkpoint-dir", default="checkpoints",
                     help="<run-name>.h5 and .keras (the model), .csv (history) and .json (configuration)")
    out.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its last completed epoch (same command plus --resume)")
    out.add_argument("--verbose", type=int, choices=(0, 1, 2),
                     help="Keras progress: 1 bar, 2 one line per epoch (default: 1 on a terminal, else 2)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--summary", action="store_true",
                       help="print model.summary() and exit without loading data")
    modes.add_argument("--evaluate", metavar="PATH",
                       help="evaluate a saved .h5 or .keras model on the test set (loaded with safe_mode; "
                            "evaluate only files you trust)")
    return parser


def compile_model(model, args, steps_per_epoch, jit_compile="auto"):
    """The recipe's optimizer (SGD, Nesterov momentum, the step schedule), loss and metric, compiled with
    XLA where it runs the step (devices.resolve_jit_compile) and --steps-per-execution."""
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
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=MOMENTUM, nesterov=True),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=resolve_jit_compile(model, jit_compile),
                  steps_per_execution=resolve_steps_per_execution(args.steps_per_execution))
    fuse_steps(model)


# ----------------------------------------------------------------------------------------------
# Preprocessing and augmentation, inside the model
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

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
    cluster = distributed.check(args)
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
    if cluster.chief:  # the only process that writes
        check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
        check_writable_dir(os.path.join(args.log_dir, name), "--log-dir")
    try:
        import tensorboard  # noqa: F401  (the scalar log needs it; say so now, not after an epoch)
    except ImportError:
        raise UsageError("the tensorboard package is missing; fix: pip install tensorboard") from None
    paths = run_paths(args.checkpoint_dir, args.log_dir, name)
    if args.resume and not cluster.chief and not os.path.isfile(paths["state"]):  # before joining the others
        raise UsageError(f"--resume: {cluster.kind} cannot read the chief's state {paths['state']} (give every "
                         "worker the same --checkpoint-dir on a shared folder, or rerun all without --resume)")
    data = load_data(args)
    if len(data[0][0]) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(data[0][0])} training images "
                         "(lower --batch-size or raise --train-limit)")

    # XLA's own collective timeout stays above ours: the watchdog's one line comes first, not XLA's core dump
    args.precision = configure_backend(args.precision, args.cpu_devices, collective_timeout=2 * args.wait_timeout)
    import keras
    with contextlib.ExitStack() as stack:
        # Joining the other processes is bounded by --wait-timeout on its own (jax.distributed's timeout,
        # distributed.wait_for_peers for TensorFlow); from then on the watchdog bounds every wait.
        distributed.start_processes(args)  # JAX: before anything asks for a device
        scope, devices = distribution(args, cluster)
        watchdog = None
        if args.distribute:
            waiting_for = f"the other {'workers' if cluster.processes > 1 else 'devices'} ({cluster.kind})"
            watchdog = stack.enter_context(Watchdog(args.wait_timeout, waiting_for))
        args.steps_per_execution = resolve_steps_per_execution(args.steps_per_execution, args.distribute)
        # one writer: the other processes write into a private folder deleted at the end
        writes = paths if cluster.chief else private_run_paths(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="worker-")), name)
        if args.batch_size % devices:
            raise UsageError(f"--batch-size {args.batch_size} does not split over {devices} devices "
                             f"(use a multiple of {devices})")
        keras.utils.set_random_seed(args.seed)
        with scope:
            model = build_model(args, spec.classes)
            config = _resolved_config(args, name, model, data, paths)
            config.update(devices=devices, processes=cluster.processes)
            remove_stale_temporaries(os.path.dirname(writes["h5"]),
                                     {os.path.basename(writes[k]) for k in CHECKPOINT_FILES})
            for key in ("json", "log_json"):
                write_text(writes[key], json.dumps(config, indent=2) + "\n")
            if args.distribute and keras.backend.backend() == "tensorflow":
                synchronize_batch_norm(model, True)
            compile_model(model, args, config["steps_per_epoch"])
            distributed.prepare_multi_worker_fit(model, args.batch_size, cluster)
            print("\n".join(where_it_trains(model, devices, cluster.kind)), flush=True)
            try:
                history, seconds, images_per_s = fit(model, args, data, writes, config,
                                                     lambda epoch: lr_at_epoch(args.lr_schedule, epoch), cluster,
                                                     watchdog.beat if watchdog else None, resume_from=paths["state"])
            except Exception as error:  # a worker or device lost mid-run: the framework's error, one line
                if args.distribute and distributed.is_runtime_error(error):
                    raise TrainingError(f"{cluster.kind}: {str(error).strip().splitlines()[0][:300]}") from None
                raise
            synchronize_batch_norm(model, False)
            save_model(model, writes["h5"], writes["keras"])
    if cluster.chief:
        print(f"saved {paths['h5']} and {paths['keras']}, history {paths['csv']}, configuration {paths['json']}, "
              f"TensorBoard logs {paths['log_run']}")
    last = history[-1]
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


def _evaluate(args, name, spec):
    if not os.path.isfile(args.evaluate):
        raise UsageError(f"--evaluate {args.evaluate!r}: no such file (give a .h5 or .keras saved by a "
                         "training run)")
    check_model_file(args.evaluate)  # before the framework starts: a refusal is one line, instantly
    _, (x_test, y_test) = load_data(args, train=False)
    configure_backend()
    model = load_model_safely(args.evaluate)
    classes = model.output_shape[-1]
    if classes != spec.classes:
        raise UsageError(f"{args.evaluate} predicts {classes} classes but {spec.title} has {spec.classes} "
                         "(is --dataset right?)")
    model = with_batch_normalization(model, batch_normalization_class())  # the kernels training evaluated with
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=resolve_jit_compile(model))
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

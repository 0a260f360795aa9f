"""The command line every family script shares: the flags (named as in the papers, formulas in the help),
their types, and parsing into the one immutable run configuration (run_config.RunConfig).

No prefix matching: a flag is taken only as typed (`--epoch` is an error that names `--epochs`).
Import-safe: parsing starts no framework.
"""
import argparse
import difflib
import math

from . import recipe, run_config, runs
from .cifar_data import DATASETS
from .devices import PRECISIONS
from .distributed import WAIT_TIMEOUT_S
from .errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (UsageError) instead of usage plus a message, and no prefix matching:
    an unknown flag is an error that names the nearest real one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = next((u for u in unknown if u.startswith("-")), unknown[0])
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            near = difflib.get_close_matches(flag.split("=", 1)[0], known, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            self.error(f"unrecognized argument {flag!r}{hint}")
        return parsed

    def error(self, message):  # argparse prints usage and a second line; we want one line
        raise UsageError(f"{message} (see --help)")


MAX_STEPS_PER_EXECUTION = 10_000  # far above any useful value (16 is the default); Keras counts steps in int32


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
MAX_SEED = 2**32 - 1  # numpy's and Keras's seeds are 32-bit


def _int_between(low, high, what):
    def parse(text):
        value = _int_at_least(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"{what} must be at most {high}, got {value}")
        return value
    return parse


epochs = _int_between(1, recipe.MAX_EPOCH, "epochs")
seed = _int_between(0, MAX_SEED, "a seed")


def _positive_float(text):
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def steps_per_execution(text):
    if text == "auto":
        return text
    try:
        return _int_between(1, MAX_STEPS_PER_EXECUTION, "steps per execution")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer from 1 to {MAX_STEPS_PER_EXECUTION}, "
                                         f"got {text!r}") from None


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


MAX_WAIT_TIMEOUT_S = 7 * 24 * 3600  # a week: any real wait is far shorter; XLA's flag parser needs a bounded value


def wait_timeout(text):
    value = _positive_float(text)
    if value > MAX_WAIT_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WAIT_TIMEOUT_S} seconds (a week), got {text!r}")
    return value


def run_name(text):
    try:
        return runs.check_run_name(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).replace("--run-name ", "", 1)) from None


def lr_schedule(text):
    """EPOCH:LR pairs, or cosine (the default schedule's first rate as the peak), or cosine:PEAK."""
    if text == recipe.COSINE:
        return recipe.COSINE
    if text.startswith(recipe.COSINE + ":"):
        return recipe.COSINE, _positive_float(text.split(":", 1)[1])
    try:
        return recipe.parse_lr_schedule(text)
    except recipe.ScheduleError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fraction_below_one(text):
    value = _nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text!r}")
    return value


def _decay(text):
    value = _fraction_below_one(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (e.g. {recipe.EMA_DECAY}), got {text!r}")
    return value


cutout_size = _int_between(1, 32, "the square's side (the image is 32 pixels)")


def add_recipe_options(parser):
    """Today's options: each off unless given (docs/recipe.md)."""
    options = parser.add_argument_group("today's recipe options (each off unless given; docs/recipe.md)")
    options.add_argument("--cutout", type=cutout_size, metavar="SIZE",
                         help="Cutout (DeVries & Taylor 2017): a SIZE x SIZE square of each training image set to the "
                              "mean pixel, its centre uniform over the image, clipped at the border; the paper: "
                              f"{recipe.CUTOUT_SIZE['cifar10']} on CIFAR-10, {recipe.CUTOUT_SIZE['cifar100']} on "
                              "CIFAR-100")
    options.add_argument("--mixup", type=_positive_float, metavar="ALPHA",
                         help="mixup (Zhang et al. 2018): x = lam x_i + (1 - lam) x_j, loss = lam CE(y_i) + (1 - lam) "
                              "CE(y_j), lam ~ Beta(ALPHA, ALPHA) per batch, j a random pairing of the batch; the "
                              f"paper: {recipe.MIXUP_ALPHA:g} on CIFAR-10")
    options.add_argument("--cutmix", type=_positive_float, metavar="ALPHA",
                         help="CutMix (Yun et al. 2019): a box of side sqrt(1 - lam) x 32 from the paired image pasted "
                              "in, lam ~ Beta(ALPHA, ALPHA) per batch, the label weight the area kept; a batch is mixed "
                              f"with probability {recipe.CUTMIX_PROBABILITY:g} (the paper's CIFAR setting); the paper: "
                              f"{recipe.CUTMIX_ALPHA:g}")
    options.add_argument("--label-smoothing", type=_fraction_below_one, metavar="EPS",
                         help="target = (1 - EPS) one_hot + EPS / classes (Szegedy et al. 2016: "
                              f"{recipe.LABEL_SMOOTHING:g}); test_loss stays the plain cross-entropy")
    options.add_argument("--warmup-epochs", type=_int_between(0, recipe.MAX_EPOCH, "warm-up epochs"), default=0,
                         metavar="K",
                         help=f"linear warm-up (Goyal et al. 2017: {recipe.WARMUP_EPOCHS}): lr = peak x step / (K x "
                              "steps per epoch) for "
                              "the first K epochs, then the schedule (step or cosine)")
    options.add_argument("--ema", type=_decay, metavar="DECAY",
                         help="evaluate, checkpoint and save the weights' exponential moving average: avg = DECAY x "
                              f"avg + (1 - DECAY) x w after every step (Keras's optimizer EMA; e.g. {recipe.EMA_DECAY})")
    options.add_argument("--tta", choices=("flip",),
                         help="test-time augmentation: flip averages the softmax of each test image and its mirror")
    options.add_argument("--init-seed", type=seed, metavar="N",
                         help="the weights' initialization only (default: --seed)")
    options.add_argument("--data-seed", type=seed, metavar="N",
                         help="the data order and every augmentation draw only (default: --seed)")


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
                      help="train on the first N training images only (after --val-split's hold-out)")
    data.add_argument("--val-split", type=positive_int, metavar="N",
                      help="hold out the last N images of the training set as a validation set, evaluated every "
                           "epoch (val_* in the history and TensorBoard); the test set is then evaluated once, "
                           "after the last epoch")
    train = parser.add_argument_group("training recipe (defaults: He et al. 2016, docs/recipe.md)")
    train.add_argument("--epochs", type=epochs, help=f"default {recipe.EPOCHS}")
    train.add_argument("--batch-size", type=positive_int, default=recipe.BATCH_SIZE,
                       help="steps per epoch = floor(training images / batch size)")
    train.add_argument("--lr-schedule", type=lr_schedule, metavar="E:LR,...",
                       help=f"step schedule: LR from epoch E on (counted from 0); default {recipe.LR_SCHEDULE}; or "
                            "cosine[:PEAK] (Loshchilov & Hutter 2017): lr = PEAK x (1 + cos(pi t / T)) / 2 over the "
                            "run's steps, PEAK the default schedule's first rate unless given")
    train.add_argument("--weight-decay", type=_nonnegative_float,
                       help=f"L2 penalty on kernels: loss += wd * sum(w^2) (default {recipe.WEIGHT_DECAY:g})")
    train.add_argument("--seed", type=seed, default=recipe.SEED,
                       help=f"0 to {MAX_SEED}: weights, data order and augmentation all follow from it "
                            "(--init-seed and --data-seed override its parts)")
    add_recipe_options(parser)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--precision", choices=PRECISIONS, default="float32",
                       help="compute precision, default float32 as in the papers; mixed_* keep float32 weights, "
                            "BN statistics, softmax and loss (mixed_float16 adds loss scaling); auto: "
                            "mixed_bfloat16 where it was measured faster (TensorFlow on a CPU with bfloat16 "
                            "instructions; its speed and accuracy cost: docs/performance.md), else float32")
    speed.add_argument("--steps-per-execution", type=steps_per_execution, default="auto", metavar="N",
                       help="training steps per compiled call (Keras compile(steps_per_execution=)): the host "
                            "runs callbacks and reads the logs once per N steps; auto: the measured best for the "
                            "backend (16; 1 on PyTorch and with --distribute on TensorFlow, which allow no more)")
    speed.add_argument("--plain-keras", action="store_true",
                       help="turn off every speed and memory patch of resnet_cifar/speedups.py (fused BN, fused "
                            "momentum, fused JAX steps, ...) and train on stock Keras, for debugging: the same "
                            "numbers to float rounding (docs/performance.md), slower")
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
    scale.add_argument("--wait-timeout", type=wait_timeout, default=WAIT_TIMEOUT_S, metavar="S",
                       help="with --distribute, end the run (exit code 1) when no step finishes for S seconds, "
                            f"e.g. a worker that never comes (default {WAIT_TIMEOUT_S}, at most {MAX_WAIT_TIMEOUT_S})")
    out = parser.add_argument_group("outputs")
    out.add_argument("--run-name", type=run_name,
                     help="default: <model>_<dataset> plus what differs from the defaults: _s<seed> _e<epochs> "
                          "_lr<schedule hash> _wd<weight decay> _b<batch> _n<training images> _v<validation images>, e.g. "
                          "resnet32_e_cifar10, resnet20_e_cifar10_s1_e2_n2000")
    out.add_argument("--log-dir", default="logs", help="TensorBoard logs go to LOG_DIR/<run-name>/")
    out.add_argument("--checkpoint-dir", default="checkpoints",
                     help="<run-name>.h5 and .keras (the model), .csv (history) and .json (configuration)")
    out.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its last completed epoch (same command plus --resume), "
                          "or a finished one with a raised --epochs (the run saved under the name with its old "
                          "epoch count is found and continued in its own files)")
    out.add_argument("--overwrite", action="store_true",
                     help="start over, replacing the files of an earlier run of the same name (without it, and "
                          "without --resume, a run refuses to touch them)")
    out.add_argument("--verbose", type=int, choices=(0, 1, 2),
                     help="Keras progress: 1 bar, 2 one line per epoch (default: 1 on a terminal, else 2)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--summary", action="store_true",
                       help="print model.summary() and exit without loading data")
    modes.add_argument("--evaluate", metavar="PATH",
                       help="evaluate a saved .h5 or .keras model on the test set (loaded with safe_mode; "
                            "evaluate only files you trust)")
    return parser


def parse(argv, family):
    """A family's command line (a families.Family) as its one immutable RunConfig: parsed, checked, defaults
    resolved."""
    args = make_parser(family.description, family.add_arguments).parse_args(argv)
    return run_config.resolve(args, family.resolve, family.run_name)

"""Training-speed benchmark: every speed figure in the README comes from this script.

Steady-state training throughput (images/s after compilation), step time and compile time of any family
script's model, through the same compiled Keras training step the scripts use (uint8 batches,
normalization and augmentation inside the step), on the current backend (KERAS_BACKEND):

    python bench.py model train_resnet32.py                                # ResNet-32, batch 128, float32
    python bench.py model train_resnet_v2.py --depth 110 --batch-size 128 512 --precision float32 mixed_bfloat16
    KERAS_BACKEND=jax python bench.py model train_resnet_bottleneck.py --depth 50 --steps 100
    python bench.py model train_resnext.py --cardinality 8 --width 4 --variants "--impl grouped" "--impl split"
    python bench.py model train_resnet32.py --batch-norm auto keras   # fused (TensorFlow CPU) vs Keras's BatchNorm
    python bench.py model train_resnet32.py --loop keras ours --steps-per-execution 1 4   # plain fit() vs ours

Every combination of the list-valued options is measured in one run, so compare them as ratios.
Prints a table and one machine-readable line per configuration:
    BENCH script=... backend=... device=... cpu=... model=... params=... precision=... bn=... loop=... spe=...
          batch=... jit=... images_per_s=... step_ms=... compile_s=...
(loop=ours is the scripts' fit loop, training.run_epoch; loop=keras plain Keras fit() with TerminateOnNaN.)

The framework's own time per training step, with a model so small that compute is negligible, through the
same compiled step (recipe.compile_model) and fit loop the scripts use, on the current backend:

    python bench.py overhead [--steps-per-execution 1 4 16] [--batch-size 8]
    OVERHEAD backend=... device=... cpu=... loop=keras|ours spe=N batch=... us_per_step=...

Our whole training path against the article's Keras 2 recipe, side by side on the same data:

    python bench.py versus-article DATA_DIR --article-script PATH [--train-images 10000] [--epochs 2] [--rounds 3]

runs the article recipe script at PATH (the article's Keras 2 code; needs tf-keras and scipy: docs/fidelity.md)
and train_resnet32.py in turn, each for --epochs epochs on the first N training images with the test set
evaluated after each epoch, and prints two ratios of ours to the article recipe's speed, each the median of the rounds'
(a round's two runs are neighbours in time, which is what survives a noisy machine): the whole run's
(start-up, tracing and compilation included: what a short run feels) and the last epoch's (the steady state:
what a long run feels), with the host's CPU model.

This checkout's train_resnet32.py against another checkout's (an earlier commit: `git worktree add ../old REV`),
the same command on the same data, alternately, a process each:

    python bench.py versus-checkout DATA_DIR ../old [--train-images 10000] [--epochs 2] [--rounds 3]

prints per run its whole time (process start to exit), its epochs' seconds (the history's) and the rest, the
fixed cost (start-up, first trace outside the epochs, the data, the saved files, the exit), then the medians and
two ratios: fixed cost, this checkout's over the other's, and the last epoch's (steady state), the other's over
this one's (above 1: this checkout faster).
"""
import contextlib
import csv
import dataclasses
import io
import itertools
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from resnet_cifar import cli, families, recipe
from resnet_cifar.cifar_data import DATASETS, IMAGE_SHAPE, find_local_data
from resnet_cifar.devices import (PRECISIONS, accelerators, configure_backend, cpu_model, resolve_precision,
                     resolve_steps_per_execution)
from resnet_cifar.errors import UsageError, one_line_usage_errors
from resnet_cifar.training import run_epoch
from resnet_cifar.units import with_batch_normalization
from resnet_cifar.speedups import batches

LOOPS = ("ours", "keras")
OVERHEAD_BATCH = 8  # bench.py --overhead: a batch whose copying is negligible next to the framework's work

HERE = os.path.dirname(os.path.abspath(__file__))


def device_label():
    return (accelerators() or ["cpu"])[0].replace(" ", "_")


VERBOSE = 2  # what the scripts use when their output goes to a file: one line per epoch (hidden here)


def timed_fit_function(model, x, y, batch_size, loop):
    """A function timing one fit() of n steps through `loop`: "ours", the scripts' epoch (training.run_epoch:
    the async-safe NaN stop, the compiled steps_per_execution); "keras", plain Keras fit() with
    TerminateOnNaN, as the scripts trained before (it turns off Keras's asynchronous batch-end dispatch)."""
    import keras

    def timed_fit(n_steps):
        data = batches(x[:n_steps * batch_size], y[:n_steps * batch_size], batch_size)
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            if loop == "ours":
                run_epoch(model, data, None, 0, 1, VERBOSE)
            else:
                model.fit(*data, epochs=1, shuffle=False, verbose=VERBOSE,
                          callbacks=[keras.callbacks.TerminateOnNaN()])
            return time.perf_counter() - start
    return timed_fit


def prepare(build, family_config, batch_size, precision, jit_compile, batch_norm, loop, spe, steps, warmup):
    """Builds and compiles one configuration and runs its first `warmup` steps (tracing and compilation).
    Returns (its description, seconds of that first fit, a function timing a fit of n steps)."""
    import keras
    backend = configure_backend(precision)
    config = dataclasses.replace(family_config, batch_size=batch_size, precision=resolve_precision(precision, backend),
                                 steps_per_execution=resolve_steps_per_execution(spe, backend))
    model = recipe.with_options(build(config, DATASETS[config.dataset].classes), config)  # the flags' options too
    if batch_norm == "keras":  # Keras's own BatchNormalization instead of the fused one used on TensorFlow's CPU
        model = with_batch_normalization(model, keras.layers.BatchNormalization)
    norms = {type(l).__name__ for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}
    recipe.compile_model(model, config.lr_schedule, steps, config.steps_per_execution, jit_compile, options=config)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(max(steps, warmup) * batch_size, *IMAGE_SHAPE), dtype=np.uint8)
    y = rng.integers(0, DATASETS[config.dataset].classes, size=len(x)).astype(np.int32)
    timed_fit = timed_fit_function(model, x, y, batch_size, loop)
    description = {"model": model.name, "params": model.count_params(), "precision": config.precision,
                   "bn": ",".join(sorted(norms)) or "none", "loop": loop, "spe": config.steps_per_execution}
    return description, timed_fit(warmup), timed_fit


def round_robin(prepared, steps, repeats):
    """Median seconds per fit of `steps` steps for each prepared configuration; the repeats go round-robin
    over the configurations, so that a slow spell of the machine hits all of them."""
    timings = [[] for _ in prepared]
    for _ in range(repeats):
        for (_, _, timed_fit), seconds in zip(prepared, timings):
            seconds.append(timed_fit(steps))
    return [statistics.median(seconds) for seconds in timings]


def machine_fields():
    import keras
    return {"backend": keras.backend.backend(), "device": device_label(), "cpu": cpu_model().replace(" ", "_")}


def bench_models(argv):
    parser = cli.Parser(description="throughput of a family script's model",
                        usage="bench.py model SCRIPT [family flags] [options]")
    parser.add_argument("script", help="a family script, e.g. train_resnet32.py")
    parser.add_argument("--batch-size", type=cli.positive_int, nargs="+", default=[recipe.BATCH_SIZE])
    parser.add_argument("--precision", choices=PRECISIONS, nargs="+", default=["float32"],
                        help="the scripts' default is float32; auto is their bfloat16-where-faster choice")
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), nargs="+", default=["auto"],
                        help="Keras compile(jit_compile=): XLA; 'auto' is what the training scripts use")
    parser.add_argument("--batch-norm", choices=("auto", "keras"), nargs="+", default=["auto"],
                        help="'auto': the class the scripts use (fused on TensorFlow's CPU); 'keras': Keras's own")
    parser.add_argument("--loop", choices=LOOPS, nargs="+", default=["ours"],
                        help="ours: the scripts' fit loop; keras: plain fit() with TerminateOnNaN (the old loop)")
    parser.add_argument("--steps-per-execution", type=cli.steps_per_execution, nargs="+", default=["auto"])
    parser.add_argument("--variants", nargs="+", default=[""], metavar="FLAGS",
                        help='family flags, each a configuration, e.g. "--impl grouped" "--impl split"')
    parser.add_argument("--steps", type=cli.positive_int, default=30, help="timed steps per repeat")
    parser.add_argument("--warmup", type=cli.positive_int, default=3, help="steps run with compilation")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="median of this many timings")
    args, family_argv = parser.parse_known_args(argv)
    name = os.path.splitext(os.path.basename(families.script_path(args.script)))[0]
    family = families.load(args.script)
    variants = [cli.parse(family_argv + shlex.split(v), family) for v in args.variants]

    configure_backend()
    machine = machine_fields()
    configs = list(itertools.product(variants, args.batch_size, args.precision, args.jit_compile, args.batch_norm,
                                     args.loop, args.steps_per_execution))
    prepared = [prepare(family.build_model, family_config, batch, precision,
                        {"auto": "auto", "true": True, "false": False}[jit], batch_norm, loop, spe, args.steps,
                        args.warmup)
                for family_config, batch, precision, jit, batch_norm, loop, spe in configs]
    rows = []
    for (_, batch, _, jit, *_), (description, first, _), seconds in zip(
            configs, prepared, round_robin(prepared, args.steps, args.repeats)):
        step_s = seconds / args.steps
        row = {"script": name, **machine, **description, "batch": batch, "jit": jit,
               "images_per_s": batch / step_s, "step_ms": 1000 * step_s,
               "compile_s": max(first - args.warmup * step_s, 0.0)}
        rows.append(row)
        print("BENCH " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    print(f"\nhost CPU: {cpu_model()}")
    print("\n| model | backend | device | precision | batch | jit | BatchNormalization | loop | spe | images/s "
          "| step ms | compile s | s/epoch (50k) |")
    print("|---|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['device']} | {r['precision']} | {r['batch']} | {r['jit']} | "
              f"{r['bn']} | {r['loop']} | {r['spe']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | "
              f"{r['compile_s']:.1f} | {50000 / r['images_per_s']:.1f} |")


def tiny_model(args, classes):
    """A model whose compute is negligible: the uint8 image batch goes in (its transfer is part of a step's
    cost), one pixel of each image goes on to a rescale and the softmax layer."""
    import keras
    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = keras.layers.Cropping2D(((15, 16), (15, 16)), name="one_pixel")(inputs)
    x = keras.layers.Rescaling(1 / 255, name="rescale")(keras.layers.Flatten(name="flatten")(x))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax", name="predictions")(x), name="tiny")


def overhead(argv):
    parser = cli.Parser(description="the framework's time per training step, compute aside",
                        usage="bench.py overhead [options]")
    parser.add_argument("--steps-per-execution", type=cli.positive_int, nargs="+", default=[1, 4, 16],
                        help="configurations of our loop (plain Keras is measured at 1, as the scripts ran it)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=OVERHEAD_BATCH,
                        help="images per step; small, so that moving them is negligible too (on a CPU, copying "
                             "a 128-image uint8 batch costs about as much as the framework's own work)")
    parser.add_argument("--steps", type=cli.positive_int, default=390,
                        help="steps per timed fit(); 390 = one CIFAR-10 epoch at batch 128, so fit()'s own "
                             "per-epoch cost is shared out as in a real run")
    parser.add_argument("--warmup", type=cli.positive_int, default=8)
    parser.add_argument("--repeats", type=cli.positive_int, default=3)
    args = parser.parse_args(argv)
    resnet32 = families.load("train_resnet32.py")
    configs = [("keras", 1)] + [("ours", spe) for spe in args.steps_per_execution]
    configure_backend()
    machine = machine_fields()
    prepared = [prepare(tiny_model, cli.parse([], resnet32), args.batch_size, "float32",
                        "auto", "auto", loop, spe, args.steps, args.warmup) for loop, spe in configs]
    us = [1e6 * seconds / args.steps for seconds in round_robin(prepared, args.steps, args.repeats)]
    for (loop, spe), value in zip(configs, us):
        print(" ".join(f"{k}={v}" for k, v in {"OVERHEAD backend": machine["backend"], "device": machine["device"],
                                               "cpu": machine["cpu"], "loop": loop, "spe": spe,
                                               "batch": args.batch_size, "us_per_step": f"{value:.0f}"}.items()),
              flush=True)
    default = resolve_steps_per_execution("auto", machine["backend"])
    for i, (loop, spe) in list(enumerate(configs))[1:]:
        print(f"ours at spe={spe}{' (the default)' if spe == default else ''}: plain Keras fit with "
              f"TerminateOnNaN takes {us[0] / us[i]:.2f}x its microseconds per step")


def epoch_seconds(history_csv):
    """The `seconds` column of a history CSV (ours and the article recipe's --history write one)."""
    with open(history_csv) as f:
        return [float(row["seconds"]) for row in csv.DictReader(f)]


def versus_article(argv):
    parser = cli.Parser(description="train_resnet32.py against the article recipe",
                        usage="bench.py versus-article DATA_DIR --article-script PATH [options]")
    parser.add_argument("data_dir", metavar="DATA_DIR")
    parser.add_argument("--train-images", type=cli.positive_int, default=10000)
    parser.add_argument("--epochs", type=cli.positive_int, default=2,
                        help="epochs per run; from 2 on, the last epoch's seconds give the steady-state ratio")
    parser.add_argument("--rounds", type=cli.positive_int, default=1, help="alternate runs; medians reported")
    parser.add_argument("--article-script", required=True, metavar="PATH",
                        help="the article's Keras 2 recipe as a script (docs/fidelity.md says what it runs)")
    parser.add_argument("--ours", default="", metavar="FLAGS", help='more train_resnet32.py flags, e.g. '
                        '"--precision float32"')
    args = parser.parse_args(argv)
    find_local_data(args.data_dir, "cifar10")
    if not os.path.isfile(args.article_script):
        raise UsageError(f"article recipe not found at {args.article_script} (give --article-script)")
    print(f"host CPU: {cpu_model()}", flush=True)
    whole, steady = [], []  # per round: (ours, the article recipe's) images/s of the whole run, and seconds of the last epoch
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.rounds):
            article_history = os.path.join(out, f"article{i}.csv")
            article_run = subprocess.run([sys.executable, args.article_script, args.data_dir, "--train-images",
                                       str(args.train_images), "--epochs", str(args.epochs), "--history",
                                       article_history], capture_output=True, text=True)
            found = re.search(r"(?:SEED|ARTICLE)_RECIPE images_per_s=([\d.]+).*test_acc=([\d.]+)", article_run.stdout)
            if not found:
                raise UsageError(f"the article recipe failed: {article_run.stderr.strip().splitlines()[-1:]}")
            print(found.group(0), f"epoch_seconds={epoch_seconds(article_history)}", flush=True)
            article = float(found.group(1)), epoch_seconds(article_history)[-1]
            run_name = f"ours{i}"
            our_run = subprocess.run([sys.executable, os.path.join(HERE, "train_resnet32.py"), "--data-dir",
                                      args.data_dir, "--train-limit", str(args.train_images), "--epochs",
                                      str(args.epochs), *shlex.split(args.ours), "--run-name", run_name,
                                      "--log-dir", out, "--checkpoint-dir", out], capture_output=True, text=True)
            line = our_run.stdout.strip().splitlines()[-1] if our_run.stdout.strip() else ""
            found = re.search(r"train_images_per_s=([\d.]+)", line)
            if not found:
                raise UsageError(f"train_resnet32.py failed: {our_run.stderr.strip().splitlines()[-1:]}")
            ours_history = os.path.join(out, f"{run_name}.csv")
            print(line, f"epoch_seconds={epoch_seconds(ours_history)}", flush=True)
            ours = float(found.group(1)), epoch_seconds(ours_history)[-1]
            whole.append(ours[0] / article[0])
            steady.append(article[1] / ours[1])
    # Each round's two runs are neighbours in time: their ratio is what survives a noisy machine.
    print(f"VERSUS_ARTICLE cpu={cpu_model().replace(' ', '_')} train_images={args.train_images} epochs={args.epochs} "
          f"rounds={args.rounds} whole_run_ratio={statistics.median(whole):.2f} "
          + (f"steady_state_ratio={statistics.median(steady):.2f} " if args.epochs > 1 else "")
          + f"round_ratios={','.join(f'{w:.2f}/{s:.2f}' for w, s in zip(whole, steady))}")


def whole_run(root, args, out, name):
    """(wall seconds from process start to exit, the epochs' seconds) of root/train_resnet32.py."""
    command = [sys.executable, os.path.join(root, "train_resnet32.py"), "--data-dir", os.path.abspath(args.data_dir),
               "--train-limit", str(args.train_images), "--epochs", str(args.epochs), *shlex.split(args.flags),
               "--run-name", name, "--log-dir", out, "--checkpoint-dir", out, "--verbose", "0"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise UsageError(f"{root}/train_resnet32.py failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, epoch_seconds(os.path.join(out, f"{name}.csv"))


def versus_checkout(argv):
    parser = cli.Parser(description="this checkout's whole run against another checkout's",
                        usage="bench.py versus-checkout DATA_DIR OTHER [options]")
    parser.add_argument("data_dir", metavar="DATA_DIR")
    parser.add_argument("other", metavar="OTHER", help="another checkout of this repository (its root folder)")
    parser.add_argument("--train-images", type=cli.positive_int, default=10000)
    parser.add_argument("--epochs", type=cli.positive_int, default=2)
    parser.add_argument("--rounds", type=cli.positive_int, default=3, help="alternate runs; medians reported")
    parser.add_argument("--flags", default="", metavar="FLAGS", help="more flags for both, e.g. '--stack-n 3'")
    args = parser.parse_args(argv)
    find_local_data(args.data_dir, "cifar10")
    if not os.path.isfile(os.path.join(args.other, "train_resnet32.py")):
        raise UsageError(f"{args.other!r} holds no train_resnet32.py (give another checkout's root folder)")
    print(f"host CPU: {cpu_model()}", flush=True)
    sides = {"this": HERE, "other": os.path.abspath(args.other)}
    fixed, last = {side: [] for side in sides}, {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.rounds):
            for side in (("this", "other") if i % 2 else ("other", "this")):  # each goes first in turn
                wall, epochs = whole_run(sides[side], args, out, f"{side}{i}")
                fixed[side].append(wall - sum(epochs))
                last[side].append(epochs[-1])
                print(f"VERSUS_CHECKOUT_RUN side={side} round={i} wall_s={wall:.1f} epochs_s={sum(epochs):.1f} "
                      f"fixed_s={wall - sum(epochs):.1f} last_epoch_s={epochs[-1]:.1f}", flush=True)
    median = {side: (statistics.median(fixed[side]), statistics.median(last[side])) for side in sides}
    print(f"VERSUS_CHECKOUT cpu={cpu_model().replace(' ', '_')} train_images={args.train_images} "
          f"epochs={args.epochs} rounds={args.rounds} fixed_s={median['this'][0]:.1f}/{median['other'][0]:.1f} "
          f"fixed_ratio={median['this'][0] / median['other'][0]:.2f} "
          f"last_epoch_s={median['this'][1]:.1f}/{median['other'][1]:.1f} "
          f"steady_state_ratio={median['other'][1] / median['this'][1]:.2f}")


def profile(argv):
    from resnet_cifar import epoch_profile
    epoch_profile.profile(argv)


MODES = {"model": bench_models, "overhead": overhead, "versus-article": versus_article,
         "versus-checkout": versus_checkout, "profile": profile}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: bench.py MODE ... (MODE: {', '.join(MODES)}; bench.py MODE --help for its options)\n")
        print(__doc__)
        return
    with one_line_usage_errors("bench.py"):
        if argv[0] not in MODES:
            raise UsageError(f"give a mode first: {', '.join(MODES)} (e.g. bench.py model train_resnet32.py)")
        MODES[argv[0]](argv[1:])


if __name__ == "__main__":
    main()

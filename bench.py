"""Training-speed benchmark: every speed figure in the README comes from this script.

Steady-state training throughput (images/s after compilation), step time and compile time of any family
script's model, through the same compiled Keras training step the scripts use (uint8 batches,
normalization and augmentation inside the step), on the current backend (KERAS_BACKEND):

    python bench.py train_resnet32.py                                      # ResNet-32, batch 128, float32
    python bench.py train_resnet_v2.py --depth 110 --batch-size 128 512 --precision float32 mixed_bfloat16
    KERAS_BACKEND=jax python bench.py train_resnet_bottleneck.py --depth 50 --steps 100
    python bench.py train_resnext.py --cardinality 8 --width 4 --variants "--impl grouped" "--impl split"
    python bench.py train_resnet32.py --batch-norm auto keras   # fused (TensorFlow CPU) vs Keras's BatchNorm

Every combination of the list-valued options is measured in one run, so compare them as ratios.
Prints a table and one machine-readable line per configuration:
    BENCH script=... model=... backend=... device=... params=... precision=... bn=... batch=... jit=... images_per_s=...
          step_ms=... compile_s=...

Our whole training path against the seed article's Keras 2 recipe, side by side on the same data:

    python bench.py --versus-seed DATA_DIR [--train-images 10000] [--rounds 3] [--ours "--precision float32"]

runs ../shared/bench/seed_recipe.py (needs tf-keras and scipy) and train_resnet32.py --epochs 1 in turn,
each on the first N training images with the test set evaluated once, and prints both images/s (whole
fit, evaluation included) and their ratio (the median of the rounds' ratios: each round's two runs are
neighbours in time, which is what survives a noisy machine).
"""
import argparse
import importlib
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

import common
from batch_norm import with_batch_normalization
from cifar_data import DATASETS, IMAGE_SHAPE, find_local_data
from devices import PRECISIONS, configure_backend
from errors import UsageError
from training import batches

HERE = os.path.dirname(os.path.abspath(__file__))
SEED_RECIPE = os.path.join(HERE, "..", "shared", "bench", "seed_recipe.py")


def device_name():
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        device = jax.devices()[0]
        return f"{device.platform}:{device.device_kind}".replace(" ", "_")
    if backend == "torch":
        import torch
        return f"cuda:{torch.cuda.get_device_name(0)}".replace(" ", "_") if torch.cuda.is_available() else "cpu"
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return f"gpu:{tf.config.experimental.get_device_details(gpus[0]).get('device_name', 'GPU')}".replace(
        " ", "_") if gpus else "cpu"


def prepare(module, family_args, batch_size, precision, jit_compile, batch_norm, steps, warmup):
    """Builds and compiles one configuration and runs its first `warmup` steps (tracing and compilation).
    Returns (its description, seconds of that first fit, a function timing a fit of n steps)."""
    import keras
    precision = configure_backend(precision)
    family_args.batch_size, family_args.precision = batch_size, precision
    model = module.build_model(family_args, DATASETS[family_args.dataset].classes)
    if batch_norm == "keras":  # Keras's own BatchNormalization instead of the fused one used on TensorFlow's CPU
        model = with_batch_normalization(model, keras.layers.BatchNormalization)
    norms = {type(l).__name__ for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}
    common.compile_model(model, family_args, steps_per_epoch=steps, jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(max(steps, warmup) * batch_size, *IMAGE_SHAPE), dtype=np.uint8)
    y = rng.integers(0, DATASETS[family_args.dataset].classes, size=len(x)).astype(np.int32)

    def timed_fit(n_steps):
        start = time.perf_counter()
        model.fit(*batches(x[:n_steps * batch_size], y[:n_steps * batch_size], batch_size), epochs=1,
                  shuffle=False, verbose=0)
        return time.perf_counter() - start

    description = {"model": model.name, "params": model.count_params(), "precision": precision,
                   "bn": ",".join(sorted(norms)) or "none"}
    return description, timed_fit(warmup), timed_fit


def bench_models(argv):
    parser = argparse.ArgumentParser(description="throughput of a family script's model",
                                     usage="bench.py SCRIPT [family flags] [options]")
    parser.add_argument("script", help="a family script, e.g. train_resnet32.py")
    parser.add_argument("--batch-size", type=common.positive_int, nargs="+", default=[common.BATCH_SIZE])
    parser.add_argument("--precision", choices=PRECISIONS, nargs="+", default=["float32"],
                        help="the scripts' default is float32; auto is their bfloat16-where-faster choice")
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), nargs="+", default=["auto"],
                        help="Keras compile(jit_compile=): XLA; 'auto' is what the training scripts use")
    parser.add_argument("--batch-norm", choices=("auto", "keras"), nargs="+", default=["auto"],
                        help="'auto': the class the scripts use (fused on TensorFlow's CPU); 'keras': Keras's own")
    parser.add_argument("--variants", nargs="+", default=[""], metavar="FLAGS",
                        help='family flags, each a configuration, e.g. "--impl grouped" "--impl split"')
    parser.add_argument("--steps", type=common.positive_int, default=30, help="timed steps per repeat")
    parser.add_argument("--warmup", type=common.positive_int, default=3, help="steps run with compilation")
    parser.add_argument("--repeats", type=common.positive_int, default=3, help="median of this many timings")
    args, family_argv = parser.parse_known_args(argv)
    name = os.path.splitext(os.path.basename(args.script))[0]
    if not os.path.isfile(os.path.join(HERE, f"{name}.py")) or not name.startswith("train_"):
        raise UsageError(f"no family script {args.script!r} (e.g. train_resnet32.py)")
    module = importlib.import_module(name)
    variants = [common.parse_args(module.add_arguments, family_argv + shlex.split(v), getattr(module, "check", None))
                for v in args.variants]

    configure_backend()
    import keras
    backend, device = keras.backend.backend(), device_name()
    configs = list(itertools.product(variants, args.batch_size, args.precision, args.jit_compile, args.batch_norm))
    prepared = [prepare(module, family_args, batch, precision, {"auto": "auto", "true": True, "false": False}[jit],
                        batch_norm, args.steps, args.warmup)
                for family_args, batch, precision, jit, batch_norm in configs]
    # Repeats go round-robin over the configurations, so a slow spell of the machine hits all of them.
    timings = [[] for _ in prepared]
    for _ in range(args.repeats):
        for (_, _, timed_fit), seconds in zip(prepared, timings):
            seconds.append(timed_fit(args.steps))
    rows = []
    for (_, batch, _, jit, _), (description, first, _), seconds in zip(configs, prepared, timings):
        step_s = statistics.median(seconds) / args.steps
        row = {"script": name, "backend": backend, "device": device, **description, "batch": batch, "jit": jit,
               "images_per_s": batch / step_s, "step_ms": 1000 * step_s,
               "compile_s": max(first - args.warmup * step_s, 0.0)}
        rows.append(row)
        print("BENCH " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    print("\n| model | backend | device | precision | batch | jit | BatchNormalization | images/s | step ms "
          "| compile s | s/epoch (50k) |")
    print("|---|---|---|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['device']} | {r['precision']} | {r['batch']} | {r['jit']} | "
              f"{r['bn']} | "
              f"{r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | "
              f"{50000 / r['images_per_s']:.1f} |")


def versus_seed(argv):
    parser = argparse.ArgumentParser(description="train_resnet32.py against the seed recipe")
    parser.add_argument("--versus-seed", metavar="DATA_DIR", required=True)
    parser.add_argument("--train-images", type=common.positive_int, default=10000)
    parser.add_argument("--rounds", type=common.positive_int, default=1, help="alternate runs; medians reported")
    parser.add_argument("--seed-script", default=SEED_RECIPE)
    parser.add_argument("--ours", default="", metavar="FLAGS", help='more train_resnet32.py flags, e.g. '
                        '"--precision float32"')
    args = parser.parse_args(argv)
    find_local_data(args.versus_seed, "cifar10")
    if not os.path.isfile(args.seed_script):
        raise UsageError(f"seed recipe not found at {args.seed_script} (give --seed-script)")
    ours, seed = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):
            seed_run = subprocess.run([sys.executable, args.seed_script, args.versus_seed,
                                       "--train-images", str(args.train_images)], capture_output=True, text=True)
            found = re.search(r"SEED_RECIPE images_per_s=([\d.]+).*test_acc=([\d.]+)", seed_run.stdout)
            if not found:
                raise UsageError(f"the seed recipe failed: {seed_run.stderr.strip().splitlines()[-1:]}")
            seed.append(float(found.group(1)))
            print(found.group(0), flush=True)
            our_run = subprocess.run([sys.executable, os.path.join(HERE, "train_resnet32.py"), "--data-dir",
                                      args.versus_seed, "--train-limit", str(args.train_images), "--epochs", "1",
                                      *shlex.split(args.ours),
                                      "--log-dir", out, "--checkpoint-dir", out], capture_output=True, text=True)
            line = our_run.stdout.strip().splitlines()[-1] if our_run.stdout.strip() else ""
            found = re.search(r"train_images_per_s=([\d.]+)", line)
            if not found:
                raise UsageError(f"train_resnet32.py failed: {our_run.stderr.strip().splitlines()[-1:]}")
            ours.append(float(found.group(1)))
            print(line, flush=True)
    # Each round's two runs are neighbours in time: their ratio is what survives a noisy machine.
    ratios = [o / s for o, s in zip(ours, seed)]
    print(f"VERSUS_SEED train_images={args.train_images} rounds={args.rounds} seed_images_per_s="
          f"{statistics.median(seed):.1f} ours_images_per_s={statistics.median(ours):.1f} "
          f"ratio={statistics.median(ratios):.2f} round_ratios={','.join(f'{r:.2f}' for r in ratios)}")


def main():
    try:
        if any(a.startswith("--versus-seed") for a in sys.argv[1:]):
            versus_seed(sys.argv[1:])
        else:
            bench_models(sys.argv[1:])
    except UsageError as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

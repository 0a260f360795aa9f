"""Training-speed benchmark: every speed figure in the README comes from this script.

Steady-state training throughput (images/s after compilation), step time and compile time of any family
script's model, through the same compiled Keras training step the scripts use (uint8 batches,
normalization and augmentation inside the step), on the current backend (KERAS_BACKEND):

    python bench.py train_resnet32.py                                      # ResNet-32, batch 128, float32
    python bench.py train_resnet_v2.py --depth 110 --batch-size 128 512 --precision float32 mixed_bfloat16
    KERAS_BACKEND=jax python bench.py train_resnet_bottleneck.py --depth 50 --steps 100
    python bench.py train_resnext.py --cardinality 8 --width 4 --variants "--impl grouped" "--impl split"

Every combination of the list-valued options is measured in one run, so compare them as ratios.
Prints a table and one machine-readable line per configuration:
    BENCH script=... model=... backend=... device=... precision=... batch=... jit=... images_per_s=...
          step_ms=... compile_s=...

Our whole training path against the seed article's Keras 2 recipe, side by side on the same data:

    python bench.py --versus-seed DATA_DIR [--train-images 10000] [--rounds 2]

runs ../shared/bench/seed_recipe.py (needs tf-keras and scipy) and train_resnet32.py --epochs 1 in turn,
each on the first N training images with the test set evaluated once, and prints both images/s (whole
fit, evaluation included) and their ratio.
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


def measure(module, family_args, batch_size, precision, jit_compile, steps, warmup, repeats):
    import keras
    precision = common.configure_backend(precision)
    keras.utils.clear_session()
    family_args.batch_size, family_args.precision = batch_size, precision
    model = module.build_model(family_args, common.DATASETS[family_args.dataset].classes)
    common.compile_model(model, family_args, steps_per_epoch=steps, jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(steps * batch_size, *common.IMAGE_SHAPE), dtype=np.uint8)
    y = rng.integers(0, common.DATASETS[family_args.dataset].classes, size=len(x)).astype(np.int32)

    def timed_fit(n_steps):
        start = time.perf_counter()
        model.fit(x[:n_steps * batch_size], y[:n_steps * batch_size], batch_size=batch_size, epochs=1,
                  shuffle=False, verbose=0)
        return time.perf_counter() - start

    first = timed_fit(warmup)  # traces and compiles, then runs `warmup` steps
    seconds = statistics.median(timed_fit(steps) for _ in range(repeats))
    step_s = seconds / steps
    return {"model": model.name, "params": model.count_params(), "precision": precision,
            "images_per_s": steps * batch_size / seconds, "step_ms": 1000 * step_s,
            "compile_s": max(first - warmup * step_s, 0.0)}


def bench_models(argv):
    parser = argparse.ArgumentParser(description="throughput of a family script's model",
                                     usage="bench.py SCRIPT [family flags] [options]")
    parser.add_argument("script", help="a family script, e.g. train_resnet32.py")
    parser.add_argument("--batch-size", type=common.positive_int, nargs="+", default=[common.BATCH_SIZE])
    parser.add_argument("--precision", choices=common.PRECISIONS, nargs="+", default=["auto"])
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), nargs="+", default=["auto"],
                        help="Keras compile(jit_compile=): XLA; 'auto' is what the training scripts use")
    parser.add_argument("--variants", nargs="+", default=[""], metavar="FLAGS",
                        help='family flags measured one after the other, e.g. "--impl grouped" "--impl split"')
    parser.add_argument("--steps", type=common.positive_int, default=30, help="timed steps per repeat")
    parser.add_argument("--warmup", type=common.positive_int, default=3, help="steps run with compilation")
    parser.add_argument("--repeats", type=common.positive_int, default=3, help="median of this many timings")
    args, family_argv = parser.parse_known_args(argv)
    name = os.path.splitext(os.path.basename(args.script))[0]
    if not os.path.isfile(os.path.join(HERE, f"{name}.py")) or not name.startswith("train_"):
        raise common.UsageError(f"no family script {args.script!r} (e.g. train_resnet32.py)")
    module = importlib.import_module(name)
    variants = [common.parse_args(module.add_arguments, family_argv + shlex.split(v), getattr(module, "check", None))
                for v in args.variants]

    common.configure_backend()
    import keras
    backend, device = keras.backend.backend(), device_name()
    rows = []
    for family_args, batch, precision, jit in itertools.product(variants, args.batch_size, args.precision,
                                                                 args.jit_compile):
        jit_compile = {"auto": "auto", "true": True, "false": False}[jit]
        result = measure(module, family_args, batch, precision, jit_compile, args.steps, args.warmup, args.repeats)
        row = {"script": name, "backend": backend, "device": device, **result, "batch": batch, "jit": jit}
        rows.append(row)
        print("BENCH " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    print(f"\n| model | backend | device | precision | batch | jit | images/s | step ms | compile s | s/epoch (50k) |")
    print("|---|---|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['device']} | {r['precision']} | {r['batch']} | {r['jit']} | "
              f"{r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | "
              f"{50000 / r['images_per_s']:.1f} |")


def versus_seed(argv):
    parser = argparse.ArgumentParser(description="train_resnet32.py against the seed recipe")
    parser.add_argument("--versus-seed", metavar="DATA_DIR", required=True)
    parser.add_argument("--train-images", type=common.positive_int, default=10000)
    parser.add_argument("--rounds", type=common.positive_int, default=1, help="alternate runs; medians reported")
    parser.add_argument("--seed-script", default=SEED_RECIPE)
    args = parser.parse_args(argv)
    common.find_local_data(args.versus_seed, "cifar10")
    if not os.path.isfile(args.seed_script):
        raise common.UsageError(f"seed recipe not found at {args.seed_script} (give --seed-script)")
    ours, seed = [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):
            seed_run = subprocess.run([sys.executable, args.seed_script, args.versus_seed,
                                       "--train-images", str(args.train_images)], capture_output=True, text=True)
            found = re.search(r"SEED_RECIPE images_per_s=([\d.]+).*test_acc=([\d.]+)", seed_run.stdout)
            if not found:
                raise common.UsageError(f"the seed recipe failed: {seed_run.stderr.strip().splitlines()[-1:]}")
            seed.append(float(found.group(1)))
            print(found.group(0), flush=True)
            our_run = subprocess.run([sys.executable, os.path.join(HERE, "train_resnet32.py"), "--data-dir",
                                      args.versus_seed, "--train-limit", str(args.train_images), "--epochs", "1",
                                      "--log-dir", out, "--checkpoint-dir", out], capture_output=True, text=True)
            line = our_run.stdout.strip().splitlines()[-1] if our_run.stdout.strip() else ""
            found = re.search(r"train_images_per_s=([\d.]+)", line)
            if not found:
                raise common.UsageError(f"train_resnet32.py failed: {our_run.stderr.strip().splitlines()[-1:]}")
            ours.append(float(found.group(1)))
            print(line, flush=True)
    ratio = statistics.median(ours) / statistics.median(seed)
    print(f"VERSUS_SEED train_images={args.train_images} rounds={args.rounds} seed_images_per_s="
          f"{statistics.median(seed):.1f} ours_images_per_s={statistics.median(ours):.1f} ratio={ratio:.2f}")


def main():
    try:
        if any(a.startswith("--versus-seed") for a in sys.argv[1:]):
            versus_seed(sys.argv[1:])
        else:
            bench_models(sys.argv[1:])
    except common.UsageError as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

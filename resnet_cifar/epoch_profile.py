"""`bench.py profile`: where one training epoch of a family script's model goes, and what comes before its first
step, on the current backend (KERAS_BACKEND), timed in one process through the scripts' own functions:

    python bench.py profile DATA_DIR [SCRIPT] [family flags] [--train-images 10000] [--repeats 3]
                            [--eval-batch-size N ...] [--fixed-only]

Fixed cost, from the interpreter's start: Python and this project's imports, the framework's start, reading
the data, building and compiling the model, the first execution of the training step (tracing and compiling
it) beyond a steady one, the first evaluation beyond a steady one.
A steady-state epoch (the scripts' run_epoch: --train-images training images, then the test set), split into
the training steps (and within them what the augmentation layers and the BatchNormalization layers cost, from
the same steps with those layers replaced by identities), feeding the batches alone, the evaluation, the state
checkpoint, and the rest (fit()'s per-epoch set-up, callbacks); the evaluation in other batch sizes when
asked. Medians of --repeats, round-robin. Prints the tables, the host's CPU and one PROFILE line.
"""
import os
import statistics
import tempfile
import time

from . import cli, families
from .cifar_data import DATASETS, find_local_data, load_data
from .devices import configure_backend, cpu_model

from .training import eval_batch_size, run_epoch
from .speedups import batches


def seconds_since_process_start():
    """Wall seconds since this process started (Linux: /proc/self/stat and /proc/uptime)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def without(model, kinds):
    """`model` with every layer of the given classes replaced by an identity (a timing ablation only)."""
    import keras

    from .units import with_layers

    class Identity(keras.layers.Layer):  # takes whatever arguments the replaced layer's call did
        def call(self, inputs, **kwargs):
            return inputs
    return with_layers(model, lambda layer: Identity(name=layer.name) if isinstance(layer, kinds) else None)


def profile(argv):
    parser = cli.Parser(description="where an epoch and the start-up go",
                        usage="bench.py profile DATA_DIR [SCRIPT] [family flags] [options]")
    parser.add_argument("data_dir", metavar="DATA_DIR")
    parser.add_argument("script", nargs="?", default="train_resnet32.py")
    parser.add_argument("--train-images", type=cli.positive_int, default=10000)
    parser.add_argument("--repeats", type=cli.positive_int, default=3)
    parser.add_argument("--fixed-only", action="store_true", help="stop after the start-up figures")
    parser.add_argument("--eval-batch-size", type=cli.positive_int, nargs="*", default=[], metavar="N",
                        help="also time the evaluation in batches of N (the scripts': training.eval_batch_size)")
    args, family_argv = parser.parse_known_args(argv)
    family = families.load(args.script)
    find_local_data(args.data_dir, "cifar10")
    config = cli.parse(family_argv + ["--data-dir", args.data_dir, "--train-limit", str(args.train_images)], family)
    fixed = {"Python, this project's imports, flags": seconds_since_process_start()}
    clock = time.perf_counter()

    def lap(key, table):
        nonlocal clock
        now = time.perf_counter()
        table[key] = now - clock
        clock = now

    configure_backend(config.precision)
    import keras
    lap("framework start", fixed)
    (x, y), (xt, yt), _ = load_data(config)
    lap("data", fixed)
    from . import recipe
    model = recipe.with_options(family.build_model(config, DATASETS[config.dataset].classes), config)
    lap("build", fixed)
    steps = len(x) // config.batch_size
    recipe.compile_model(model, config.lr_schedule, steps, config.steps_per_execution, options=config)
    lap("compile", fixed)
    spe = model.steps_per_execution
    one = batches(x[:spe * config.batch_size], y[:spe * config.batch_size], config.batch_size)
    run_epoch(model, one, None, 0, 1)
    lap("first training execution", fixed)
    n = eval_batch_size(model)
    test, first_batch = batches(xt, yt, n), batches(xt[:n], yt[:n], n)
    model.evaluate(*first_batch, verbose=0)
    lap("first evaluation", fixed)
    # what those two firsts cost beyond a steady execution / evaluation batch
    start = time.perf_counter()
    run_epoch(model, one, None, 0, 1)
    fixed["first training execution"] -= time.perf_counter() - start
    start = time.perf_counter()
    model.evaluate(*first_batch, verbose=0)
    fixed["first evaluation"] -= time.perf_counter() - start

    if args.fixed_only:
        return report(model, config, fixed, {}, len(x), len(xt))
    train = batches(x[:steps * config.batch_size], y[:steps * config.batch_size], config.batch_size)
    layers = keras.layers
    variants = {"steps": model,
                "steps without augmentation": without(model, (layers.RandomFlip, layers.RandomTranslation,
                                                              type(model.get_layer("random_crop")))),
                "steps without BatchNormalization": without(model, layers.BatchNormalization)}
    for key, variant in variants.items():
        if variant is not model:  # a learning rate too small to diverge (no NaN stop) without BatchNormalization
            recipe.compile_model(variant, ((0, 1e-9),), steps, config.steps_per_execution)
            run_epoch(variant, one, None, 0, 1)  # traced outside the timing

    from .checkpoints import save_state

    def feed():  # TensorFlow: the tf.data pipeline alone; elsewhere Keras slices the arrays as this does
        for item in (train.x if train.y is None else (train.x[i:i + config.batch_size] for i in range(0, len(train.x), config.batch_size))):
            pass
    other_batches = {f"evaluation in batches of {n}": batches(xt, yt, n) for n in args.eval_batch_size}
    for data in other_batches.values():
        model.evaluate(*data, verbose=0)  # Keras may trace again for another batch shape: outside the timing
    timings = {key: [] for key in ("epoch", *variants, "feeding", "evaluation", *other_batches, "state checkpoint")}
    with tempfile.TemporaryDirectory() as out:
        record = {k: 0 for k in ("model", "params", "dataset", "train_images", "batch_size", "seed", "precision",
                                 "lr_schedule", "weight_decay", "val_split")}
        actions = {"epoch": lambda: run_epoch(model, train, test, 0, 1),
                   **{key: (lambda m=variant: run_epoch(m, train, None, 0, 1)) for key, variant in variants.items()},
                   "feeding": feed,
                   "evaluation": lambda: model.evaluate(*test, verbose=0),
                   **{key: (lambda d=data: model.evaluate(*d, verbose=0)) for key, data in other_batches.items()},
                   "state checkpoint": lambda: save_state(model, os.path.join(out, "s.weights.h5"), [], record)}
        for _ in range(args.repeats):
            for key, action in actions.items():
                start = time.perf_counter()
                action()
                timings[key].append(time.perf_counter() - start)
    epoch = {key: statistics.median(values) for key, values in timings.items()}
    epoch["augmentation (in the steps)"] = epoch["steps"] - epoch.pop("steps without augmentation")
    epoch["BatchNormalization (in the steps)"] = epoch["steps"] - epoch.pop("steps without BatchNormalization")
    epoch["fit() set-up, callbacks, the rest"] = epoch["epoch"] - epoch["steps"] - epoch["evaluation"]
    report(model, config, fixed, epoch, len(x), len(xt))


def report(model, config, fixed, epoch, train_images, test_images):
    import keras
    head = (f"backend={keras.backend.backend()} cpu={cpu_model().replace(' ', '_')} model={model.name} "
            f"precision={config.precision} xla={model.jit_compile} spe={model.steps_per_execution} "
            f"batch={config.batch_size} train_images={train_images} test_images={test_images}")
    to_first_step = sum(v for k, v in fixed.items() if k != "first evaluation")
    print(f"\nhost CPU: {cpu_model()}\n{head}\n\n| before the first step | s |\n|---|---:|")
    for key, value in fixed.items():
        print(f"| {key} | {value:.2f} |")
    print(f"| **process start to the first step done** | **{to_first_step:.2f}** |")
    if epoch:
        print("\n| steady-state epoch | s | share |\n|---|---:|---:|")
    for key, value in epoch.items():
        print(f"| {key} | {value:.2f} | {100 * value / epoch['epoch']:.0f} % |")
    parts = {**{f"fixed:{k}": v for k, v in fixed.items()}, "fixed:to_first_step": to_first_step,
             **{f"epoch:{k}": v for k, v in epoch.items()}}
    print(f"\nPROFILE {head} " + " ".join(f"{k.replace(' ', '_')}={v:.3f}" for k, v in parts.items()))

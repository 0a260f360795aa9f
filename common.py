"""`main`, shared by every train_*.py script: parse the command line into one immutable RunConfig, check
every path, then train, evaluate or summarize; bad input is one line on stderr with exit code 2.

A family script defines its flags, run name and network, and hands them to `main` as one
resnet_cifar.families.Family:

    FAMILY = Family(__doc__, add_arguments, run_name, build_model, resolve)
    if __name__ == "__main__":
        common.main(FAMILY)

The training path below reads top to bottom: check, lock, load, build, compile, fit, save. What it calls lives
in the resnet_cifar package, one concern a module (docs/layout.md).

Import-safe: Keras (and through it TensorFlow, JAX or PyTorch) is imported inside the functions that need it,
after the command line and every path have been checked.
"""
import concurrent.futures
import contextlib
import errno
import importlib.util
import json
import os
import shlex
import signal
import sys
import time

import numpy as np

from resnet_cifar import cli, distributed, provenance, runs
from resnet_cifar.checkpoints import SavedState, as_trained, check_model_file, load_model_safely, save_model
from resnet_cifar.cifar_data import DATASETS, find_local_data, load_data
from resnet_cifar.devices import configure_backend, fast_exit, where_it_trains
from resnet_cifar.evaluation import compile_for_evaluation, evaluation_model, use_average
from resnet_cifar.errors import STOP_SIGNALS, Preempted, TrainingError, UsageError, one_line_usage_errors
from resnet_cifar.outputs import (CHECKPOINT_FILES, check_free_space, check_writable_dir, final_line,
                                  no_space_message, remove_stale_temporaries, run_paths, write_text)
from resnet_cifar.recipe import MOMENTUM, NESTEROV, compile_model, with_options
from resnet_cifar.training import Run, checkpoint_bytes, eval_batch_size, fit
from resnet_cifar.speedups import batches, release_activations, stock_layers
from resnet_cifar.workarounds import set_random_seed


def main(family, argv=None):
    """Parse and check everything, then train, evaluate or summarize. Bad input: one line, exit 2."""
    prog = os.path.basename(sys.argv[0])
    for signum in STOP_SIGNALS:
        signal.signal(signum, _preempt)
    with one_line_usage_errors(prog):
        try:
            config = cli.parse(argv, family)
            _run(config, family.build_model)
        except TrainingError as error:
            print(f"{prog}: training failed: {error}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)  # no interpreter shutdown: a lost worker's collectives would abort it with a core dump
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            sys.exit(130)
        except Preempted as stop:
            command = shlex.join([prog, *(a for a in sys.argv[1:] if a != "--overwrite"), "--resume"]
                                 if "--resume" not in sys.argv else [prog, *sys.argv[1:]])
            print(f"{prog}: stopped by {signal.Signals(stop.signum).name}; every completed epoch is saved, "
                  f"continue with: {command}", file=sys.stderr)
            sys.exit(128 + stop.signum)
    if argv is None:  # a process of its own (the script), not a caller's: end it now
        fast_exit()


def _preempt(signum, frame):
    for other in STOP_SIGNALS:  # one stop: a second notice (SLURM signals every process) is ignored
        signal.signal(other, signal.SIG_IGN)
    raise Preempted(signum)


def _run(config, build_model):
    cluster = distributed.check(config)
    spec = DATASETS[config.dataset]
    if config.summary:
        configure_backend(config.precision)
        with_options(build_model(config, spec.classes), config).summary()
        return
    # Fail fast: every path before any data is read or the framework is imported.
    if config.data_dir:
        find_local_data(config.data_dir, config.dataset)
    if config.evaluate:
        return _evaluate(config, spec)
    if importlib.util.find_spec("tensorboard") is None:  # the scalar log needs it: say so now, not after an epoch
        raise UsageError("the tensorboard package is missing; fix: pip install tensorboard")
    config = runs.find_run_to_resume(config)  # --resume with a raised --epochs: the run trained with fewer
    paths = run_paths(config.checkpoint_dir, config.log_dir, config.run_name)
    with contextlib.ExitStack() as owner:
        if not os.path.exists(paths["log_run"]):  # a run that never starts leaves no empty log folder behind
            owner.callback(_remove_if_empty, paths["log_run"])
        if cluster.chief:  # the only process that writes: it owns the run's files
            check_writable_dir(config.checkpoint_dir, "--checkpoint-dir")
            owner.enter_context(runs.RunLock(config.checkpoint_dir, config.run_name))
            check_writable_dir(os.path.join(config.log_dir, config.run_name), "--log-dir")
            runs.refuse_to_clobber(paths, config.run_name, config.resume, config.overwrite)
        saved = None
        if config.resume and os.path.isfile(paths["state"]):
            saved = SavedState.read(paths["state"])
        elif config.resume and not cluster.chief:  # before joining the others
            raise UsageError(f"--resume: {cluster.kind} cannot read the chief's state {paths['state']} (give every "
                             "worker the same --checkpoint-dir on a shared folder, or rerun all without --resume)")
        try:
            _train(config, build_model, cluster, spec, paths, saved)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            folder = os.path.dirname(error.filename or "") or config.checkpoint_dir
            raise TrainingError(no_space_message(folder)) from None


def _remove_if_empty(folder):
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _start(config):
    """(the backend, the data, their provenance): the framework starts (quietly: devices.quiet_start) while the local data is read
    in a second thread; the download path (keras.datasets) runs after the start, so its refusal comes without
    the framework's start-up lines."""
    def start():  # XLA's own collective timeout stays above ours: the watchdog's one line comes first
        return configure_backend(config.precision, config.cpu_devices, collective_timeout=2 * config.wait_timeout,
                                 plain=config.plain_keras)
    def read():  # the data, and which data they are (provenance: checksums and a fingerprint)
        data = load_data(config)
        return data, provenance.of_run(config, data)
    if not config.data_dir:
        backend = start()
        return (backend, *read())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read)
        try:
            backend = start()
        finally:
            data, source = reading.result()  # its UsageError (a corrupt file) first: bad input before anything
    return backend, data, source


def _train(config, build_model, cluster, spec, paths, saved):
    backend, data, source = _start(config)
    if len(data[0][0]) < config.batch_size:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(data[0][0])} training images "
                         "(lower --batch-size or raise --train-limit)")
    if backend != config.backend:
        raise UsageError(f"Keras started {backend}, not {config.backend}: set KERAS_BACKEND explicitly")
    for signum in STOP_SIGNALS:  # again: a framework may have set its own handler while starting
        signal.signal(signum, _preempt)
    with distributed.Processes(config, cluster, paths) as processes:
        writes = processes.writes
        model = initial_model(config, build_model, spec.classes)
        if config.plain_keras:
            model = stock_layers(model)
        record = {**run_record(config, model, data, paths, processes.devices, cluster.processes), **source}
        if saved is not None:  # every setting compared before anything is written
            saved.check(record)
        remove_stale_temporaries(os.path.dirname(writes["h5"]),
                                 {os.path.basename(writes[k]) for k in CHECKPOINT_FILES})
        if config.overwrite:  # the earlier run's files go only now, once everything has been checked
            for key in (*CHECKPOINT_FILES, "log_csv", "log_json"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(writes[key])
        for key in ("json", "log_json"):
            write_text(writes[key], json.dumps(record, indent=2) + "\n")
        processes.prepare(model)
        compile_model(model, config.lr_schedule, record["steps_per_epoch"], config.steps_per_execution,
                      plain=config.plain_keras, options=config)
        processes.prepare_fit(model)
        print("\n".join(where_it_trains(model, processes.devices, cluster.kind)), flush=True)
        run = Run(config, data, writes, record, cluster, processes.beat, saved)
        with processes.training():
            history, seconds, images_per_s = fit(model, run)
        processes.finish(model)
        if config.ema:  # the final model is the average (training.fit evaluated it every epoch)
            use_average(model)
        check_free_space(os.path.dirname(writes["h5"]) or ".", 2 * checkpoint_bytes(record["params"]))
        save_model(model, writes["h5"], writes["keras"])
    if cluster.chief:
        print(f"saved {paths['h5']} and {paths['keras']}, history {paths['csv']}, configuration {paths['json']}, "
              f"TensorBoard logs {paths['log_run']}")
    last = history[-1]
    print(final_line(run=config.run_name, epochs=len(history), params=model.count_params(),
                     test_acc=f"{last['test_accuracy']:.4f}", test_loss=f"{last['test_loss']:.4f}",
                     train_images_per_s=f"{images_per_s:.1f}", seconds=f"{seconds:.1f}",
                     devices=processes.devices))


def initial_model(config, build_model, classes):
    """The family's network with today's options (recipe.with_options), its weights drawn from --init-seed."""
    set_random_seed(config.init_seed)
    return with_options(build_model(config, classes), config)


def run_record(config, model, data, paths, devices, processes):
    """What a run saves as its configuration (config.json): the resolved settings and the facts of the run."""
    import keras
    train_images = len(data[0][0])
    return {**config.saved(), "model": model.name, "params": model.count_params(),
            "trainable_params": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
            "train_images": train_images, "test_images": len(data[1][0]),
            "val_images": len(data[2][0]) if data[2] else 0,
            "steps_per_epoch": train_images // config.batch_size, "eval_batch_size": eval_batch_size(model),
            "momentum": MOMENTUM, "nesterov": NESTEROV, "keras": keras.__version__, "checkpoint": paths["h5"],
            "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "devices": devices, "processes": processes}


def _evaluate(config, spec):
    path = config.evaluate
    if not os.path.isfile(path):
        raise UsageError(f"--evaluate {path!r}: no such file (give a .h5 or .keras saved by a training run)")
    check_model_file(path)  # before the framework starts: a refusal is one line, instantly
    _, (x_test, y_test), _ = load_data(config, train=False)
    configure_backend()
    model = load_model_safely(path)
    classes = model.output_shape[-1]
    if classes != spec.classes:
        raise UsageError(f"{path} predicts {classes} classes but {spec.title} has {spec.classes} "
                         "(is --dataset right?)")
    model = as_trained(model)  # the layer classes and kernels training evaluated with
    release_activations(model)
    evaluated = compile_for_evaluation(evaluation_model(model, config.tta) if config.tta else model, model)
    start = time.perf_counter()
    loss, accuracy = evaluated.evaluate(*batches(x_test, y_test, eval_batch_size(model)), verbose=0)
    seconds = time.perf_counter() - start
    saved = os.path.splitext(path)[0] + ".json"
    epochs = 0
    if os.path.isfile(saved):  # the run's configuration beside it, for its epoch count
        try:
            with open(saved) as f:
                epochs = int(json.load(f).get("epochs", 0))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise UsageError(f"cannot read {saved}, the configuration beside {path} ({type(error).__name__}): fix or "
                             "remove it") from None
    run = os.path.splitext(os.path.basename(path))[0]
    print(final_line(run=run, epochs=epochs, params=model.count_params(), test_acc=f"{accuracy:.4f}",
                     test_loss=f"{loss:.4f}", seconds=f"{seconds:.1f}"))

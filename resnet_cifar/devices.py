"""Where a run trains and how: which backend, --precision and --steps-per-execution resolved (before any
framework starts), the backend's session set-up with a quiet start, and the lines that open every run.

Only configure_backend, accelerators and where_it_trains import a framework; they run after every flag and
path has been checked.
"""
import glob
import json
import os
import re
import sys
import tempfile

from .errors import UsageError
from .workarounds import RECURSION_LIMIT, steps_per_execution_limit
from .speedups import without_unused_imports

BACKENDS = ("tensorflow", "jax", "torch")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # "auto" or a Keras dtype policy
# --steps-per-execution auto: Keras compile(steps_per_execution=) where the backend allows more than one
# (workarounds.steps_per_execution_limit): the host then pays its per-step work once per 16 steps, which on a GPU
# was most of a small network's step; beyond 16 the gain was small (bench.py overhead; docs/performance.md).
STEPS_PER_EXECUTION = 16


def backend_name():
    """The backend Keras will start, read the way Keras reads it (KERAS_BACKEND, else keras.json under
    KERAS_HOME or ~/.keras, else tensorflow), without importing it."""
    name = os.environ.get("KERAS_BACKEND")
    if not name:
        home = os.environ.get("KERAS_HOME")
        if not home:
            base = os.path.expanduser("~")
            home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
        try:
            with open(os.path.join(home, "keras.json")) as f:
                name = json.load(f).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    name = name or "tensorflow"
    if name not in BACKENDS:
        raise UsageError(f"KERAS_BACKEND={name!r} is not one of {', '.join(BACKENDS)} (set KERAS_BACKEND)")
    return name


def _cpuinfo():
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("unknown", []) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown", []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return name, flags


# The host classes a speed figure depends on, widest first (the same "AMD EPYC" label covers Zen 3 and Zen 4).
CPU_CLASSES = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_model():
    """The host CPU's model name, its widest vector unit and its core count, e.g. "AMD EPYC (AVX512-BF16, 2 cores)":
    speed figures are written next to it (hosts differ about 3x)."""
    name, flags = _cpuinfo()
    unit = next((label for flag, label in CPU_CLASSES if flag in flags), None)
    return f"{name} ({unit + ', ' if unit else ''}{len(os.sched_getaffinity(0))} cores)"


def cpu_has_bfloat16():
    """AVX512-BF16 or AMX: the CPU computes bfloat16 natively (oneDNN then runs bf16 convolutions)."""
    flags = _cpuinfo()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def nvidia_gpu_present():
    """An NVIDIA device file the process may use (CUDA_VISIBLE_DEVICES not emptied), without starting CUDA."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) and os.environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1")


def resolve_precision(precision, backend):
    """The default is float32, as the papers trained. --precision auto chooses by measurement
    (docs/performance.md): TensorFlow on a CPU with bfloat16 instructions and no GPU trains ResNet-32 faster in
    mixed_bfloat16, at a small accuracy cost (both measured in docs/performance.md and docs/fidelity.md);
    everywhere else float32."""
    if precision != "auto":
        return precision
    if backend == "tensorflow" and cpu_has_bfloat16() and not nvidia_gpu_present():
        return "mixed_bfloat16"
    return "float32"


def resolve_steps_per_execution(value, backend, distribute=False):
    """--steps-per-execution: "auto" is STEPS_PER_EXECUTION where the backend allows it, else its limit;
    an explicit value the backend cannot run is a UsageError, before anything is loaded or written."""
    limit, why = steps_per_execution_limit(backend, distribute)
    if value == "auto":
        return STEPS_PER_EXECUTION if limit is None else min(STEPS_PER_EXECUTION, limit)
    if limit is not None and value > limit:
        raise UsageError(f"--steps-per-execution {value} cannot run here: {why}; use --steps-per-execution "
                         f"{limit} or auto")
    return value


# Start-up lines TensorFlow writes straight to file descriptor 2 that say nothing about this run, each matched
# in full: the CUDA probe on a machine without a GPU, absl's notice, oneDNN's and the CPU-feature notices.
# Everything else it prints (a real error among them) goes through to stderr unchanged.
STARTUP_NOISE = re.compile("|".join([
    r".*failed call to cuInit.*",
    r".*Could not find cuda drivers on your machine.*",
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r".*oneDNN custom operations are on.*",
    r".*This TensorFlow binary is optimized to use available CPU instructions.*",
    r".*To enable the following instructions:.*rebuild TensorFlow with the appropriate compiler flags\.",
    r".*Unable to register cu(DNN|FFT|BLAS) factory.*",
    r".*computation placer already registered.*",
    r".*TF-TRT Warning: Could not find TensorRT.*",
]))


def quiet_start(start):
    """Runs start() (the framework's import and device discovery) with file descriptor 2 captured, then writes
    back to stderr every captured line that is not STARTUP_NOISE. Returns what start() returns."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return start()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if line.strip() and not STARTUP_NOISE.fullmatch(line.strip()):
                    print(line, file=sys.stderr)


def compilation_cache_dir():
    """Where compiled XLA programs are kept between runs: $RESNET_CIFAR_CACHE, else $XDG_CACHE_HOME or ~/.cache,
    under resnet-cifar/xla. A second run of the same network and settings (a sweep's next seed, the tests)
    loads its training step instead of compiling it again (docs/performance.md)."""
    base = os.environ.get("RESNET_CIFAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnet-cifar")
    return os.path.join(base, "xla")


def _use_compilation_cache():
    """JAX's persistent compilation cache (jax_compilation_cache_dir), unless the user set one; every program,
    however quick to compile (a ResNet-8 step compiles in under JAX's default threshold of one second)."""
    import jax
    if jax.config.jax_compilation_cache_dir:
        return
    path = compilation_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # no cache (a read-only home): compile every time, as without it
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _start_framework(cpu_devices, plain):
    with without_unused_imports(backend_name(), plain):
        import keras
    if keras.backend.backend() == "jax":
        _use_compilation_cache()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        cpus = tf.config.list_physical_devices("CPU")
        if cpu_devices:
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
        tf.config.list_physical_devices("GPU")  # the CUDA probe, inside the quiet window
    return keras


def configure_backend(precision="float32", cpu_devices=None, collective_timeout=900, plain=False):
    """Session set-up, run from main and bench only: the framework started quietly (quiet_start), the dtype
    policy (a resolved precision, not "auto") and, for --cpu-devices, the host CPU split into several devices."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)  # .h5 is our chosen format: no "legacy" warning
    if cpu_devices:
        # CPU "devices" share the cores, so one may reach a collective long after the other: XLA's
        # default 40 s rendezvous timeout then aborts a healthy run on a small machine.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={cpu_devices}"
                                   + f" --xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout:.0f}"
                                   ).strip()
    keras = quiet_start(lambda: _start_framework(cpu_devices, plain))
    keras.mixed_precision.set_global_policy(resolve_precision(precision, keras.backend.backend()))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    return keras.backend.backend()


def fast_exit(code=0):
    """Ends a finished run's process without the interpreter's teardown: every file is closed by then, and
    unloading TensorFlow's modules and threads is a measurable part of a short run and writes nothing
    (docs/performance.md, "A run's fixed cost"). The atexit handlers still run, and the output is flushed."""
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def accelerators():
    """The GPUs (or TPUs) the current backend trains on, as 'platform:name' strings; [] on a CPU."""
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return [f"{d.platform}:{d.device_kind}" for d in jax.devices() if d.platform != "cpu"]
    if backend == "torch":
        import torch
        return [f"cuda:{torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return [f"gpu:{tf.config.experimental.get_device_details(g).get('device_name', 'GPU')}" for g in gpus]


GPU_HINT = ('no GPU visible: training on the CPU. For a GPU install the backend\'s CUDA build: '
            'pip install "tensorflow[and-cuda]" (TensorFlow), pip install "jax[cuda12]" (JAX), '
            'or PyTorch\'s CUDA wheel from https://pytorch.org/get-started/locally/ (PyTorch)')


def where_it_trains(model, devices, process="one process"):
    """The lines that open every run: backend, devices, processes, precision, XLA, steps per execution, and,
    when no GPU is visible, how to get one."""
    import keras
    found = accelerators()
    names = ", ".join(sorted(set(found))) or "cpu"
    lines = [f"training on: backend={keras.backend.backend()} devices={devices} ({names}; {process}) "
             f"precision={keras.mixed_precision.dtype_policy().name} xla={'on' if model.jit_compile else 'off'} "
             f"steps_per_execution={model.steps_per_execution}"]
    if not found:
        lines.append(GPU_HINT)
    return lines

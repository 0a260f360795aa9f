"""Where a run trains and how: the backend's session setup, --precision, --steps-per-execution, CPU devices,
and the lines that open every run saying so.

Run from common.main and bench.py only, after every flag and path has been checked: importing Keras
starts the framework, which prints its own start-up lines.
"""
import os
import sys

from errors import UsageError

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # "auto" or a Keras dtype policy
# Keras builds, saves and loads a functional model by walking its layer graph recursively, a few Python frames
# per layer: ResNet-1001's 3,000+ layers need about 10,000. Python's default limit is 1,000, and importing
# TensorFlow sets it to 3,000, so configure_backend sets it after the framework is imported.
RECURSION_LIMIT = 20_000


def cpu_model():
    """The host CPU's model name (speed figures are written next to it: hosts differ about 3x)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def cpu_has_bfloat16():
    """AVX512-BF16 or AMX: the CPU computes bfloat16 natively (oneDNN then runs bf16 convolutions)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision):
    """The default is float32, as the papers trained. --precision auto chooses by measurement (bench.py,
    README "Performance"): TensorFlow on a CPU with bfloat16 instructions trains ResNet-32 about 1.44x faster
    in mixed_bfloat16, at a small accuracy cost (paired short real-data runs ended 0.66 points under float32
    after 6 epochs, 0.37 after 15: results/README.md); everywhere else (GPUs already use TF32 tensor cores
    for float32; XLA's CPU bf16 was not measured faster) float32."""
    if precision != "auto":
        return precision
    import keras
    backend = keras.backend.backend()
    if backend == "tensorflow" and cpu_has_bfloat16():
        import tensorflow as tf
        if not tf.config.list_physical_devices("GPU"):
            return "mixed_bfloat16"
    return "float32"


def configure_backend(precision="float32", cpu_devices=None, collective_timeout=900):
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
                                   + f" --xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout:.0f}"
                                   ).strip()
    import keras
    if cpu_devices and keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    precision = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(precision)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    return precision


# --steps-per-execution auto: Keras compile(steps_per_execution=), chosen per device type by measurement
# (README "Performance"; results/performance_gpu.md). ResNet-20, batch 128, bench.py --loop keras ours
# --steps-per-execution 1 4 16 (16 vs 1): H100 + JAX 26,099 vs 22,435 images/s; 2-core EPYC + TensorFlow
# 1,204 vs 1,178 (compute-bound: no loss, less host work). bench.py --overhead (us per step, 1 / 4 / 16 / 64),
# batch 128: H100 + JAX 1,360 / 819 / 691 / 599; EPYC + TensorFlow 689 / 423 / 354 / 276; EPYC + JAX
# 94 / 74 / 61 / 56; batch 8 (the default now): EPYC + TensorFlow 508 / 251 / 160 / 138, EPYC + JAX
# 107 / 37 / 22 / 14 (results/performance_cpu.md).
STEPS_PER_EXECUTION = {"cpu": 16, "gpu": 16}


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


def device_type():
    return "gpu" if accelerators() else "cpu"


def resolve_steps_per_execution(value, distribute=False):
    """--steps-per-execution: "auto" is the measured best for the device type. Inside TensorFlow's
    MirroredStrategy, Keras 3.15's multi-step loop fails ("Detected at node while/cond/Placeholder"), so
    --distribute on TensorFlow runs one step per execution."""
    import keras
    if distribute and keras.backend.backend() == "tensorflow":
        if value not in ("auto", 1):
            raise UsageError(f"--steps-per-execution {value} does not work with --distribute on TensorFlow "
                             "(Keras's multi-step loop fails inside MirroredStrategy); use 1, or KERAS_BACKEND=jax")
        return 1
    return STEPS_PER_EXECUTION[device_type()] if value == "auto" else value


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


def resolve_jit_compile(model, jit_compile="auto"):
    """XLA for the training step. Keras's RandomTranslation declares supports_jit=False, for TensorFlow's sake
    (XLA has no kernel for its ImageProjectiveTransformV3: "tf2xla conversion failed"), and Keras's own
    jit_compile="auto" then turns XLA off for the whole model on every backend: JAX ran the step op by op.
    JAX's translation (map_coordinates) compiles, so "auto" means XLA on JAX (ResNet-20 on this CPU: 384 vs
    218 images/s, same loss to float rounding) and no XLA on TensorFlow and PyTorch (Keras's choice there)."""
    import keras
    if keras.backend.backend() != "jax":
        return False if jit_compile == "auto" else jit_compile
    if jit_compile is not False:
        for layer in model.layers:
            if isinstance(layer, keras.layers.RandomTranslation):
                layer.supports_jit = True  # an attribute of this instance only, never saved
    return True if jit_compile == "auto" else jit_compile

"""Where a run trains and in what precision: the backend's session setup, --precision auto, CPU devices.

Run from common.main and bench.py only, after every flag and path has been checked: importing Keras
starts the framework, which prints its own start-up lines.
"""
import os

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")  # "auto" or a Keras dtype policy


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

"""--distribute: data parallelism with the framework's own engine (no all-reduce of ours)."""
import contextlib

from errors import UsageError


def distribution(args):
    """(scope to build and train in, number of replicas) for --distribute; the framework's own engine.
    BatchNorm: on JAX the step is one program over the sharded global batch, so XLA all-reduces the batch
    statistics (synchronized BN); on TensorFlow the layers are switched to synchronized=True."""
    import contextlib

    import keras
    backend = keras.backend.backend()
    if not args.distribute:
        return contextlib.nullcontext(), 1
    if backend == "jax":
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return contextlib.nullcontext(), len(devices)
    if backend == "tensorflow":
        import tensorflow as tf
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        return strategy.scope(), strategy.num_replicas_in_sync
    raise UsageError(f"--distribute is not supported on the {backend} backend "
                     "(use KERAS_BACKEND=jax or tensorflow, or train without --distribute)")


def synchronize_batch_norm(model, on):
    """TensorFlow replicas see only their share of the batch: synchronized BN uses the global batch's
    statistics, as one device would. Switched off again before saving (the option is TensorFlow-only)."""
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = on

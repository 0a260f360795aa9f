"""Which BatchNormalization class the networks use, and the fused one for TensorFlow's CPU.

Keras 3 computes BatchNormalization from separate ops (moments, then the normalization: a dozen passes
over memory with the backward pass); on TensorFlow's CPU the fused kernel tf.keras used (FusedBatchNormV3)
trains ResNet-32 1.35x faster in float32 (README "Performance"). The fused class is a registered subclass
of keras.layers.BatchNormalization with the same weights, names and numbers (tests/test_fast_path.py);
checkpoints are written with Keras's own class (`with_batch_normalization`), so they load without this code.
"""
import functools


@functools.cache
def batch_normalization_class():
    """keras.layers.BatchNormalization, or on TensorFlow without a GPU its fused twin (measured 1.35x
    faster training in float32, 1.5x in bfloat16: bench.py --batch-norm auto keras, README "Performance").
    Same weights, same names, same numbers to float rounding."""
    import keras
    if keras.backend.backend() != "tensorflow":
        return keras.layers.BatchNormalization  # XLA (JAX) and torch fuse or run it well already
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        return keras.layers.BatchNormalization  # XLA (jit_compile on a GPU) fuses it already
    return _fused_batch_normalization_class()


@functools.cache
def _fused_batch_normalization_class():
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="resnet_cifar")
    class FusedBatchNormalization(keras.layers.BatchNormalization):
        """Keras's BatchNormalization computed by TensorFlow's one fused kernel (FusedBatchNormV3, what
        tf.keras used) instead of a dozen separate ops: on a CPU each of those ops is a pass over memory.
        Batch statistics, moving averages (biased batch variance, as Keras) and epsilon are Keras's."""

        def _fusable(self, inputs, mask):
            return (mask is None and not self.synchronized and not self.renorm and self.scale and self.center
                    and len(inputs.shape) == 4 and self.axis in (-1, 3))

        def call(self, inputs, training=None, mask=None):
            if not self._fusable(inputs, mask):
                return super().call(inputs, training=training, mask=mask)
            x = inputs if inputs.dtype in (tf.float16, tf.bfloat16, tf.float32) else tf.cast(inputs, "float32")
            train = bool(training and self.trainable)
            empty = tf.constant([], "float32")
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=tf.cast(self.gamma, "float32"), offset=tf.cast(self.beta, "float32"),
                mean=empty if train else tf.cast(self.moving_mean, "float32"),
                variance=empty if train else tf.cast(self.moving_variance, "float32"),
                epsilon=self.epsilon, data_format="NHWC", is_training=train)
            if train:
                n = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
                variance = variance * ((n - 1.0) / n)  # the kernel returns the unbiased variance; Keras's is biased
                for average, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                    average.assign(average * self.momentum + batch * (1.0 - self.momentum))
            return tf.cast(y, self.compute_dtype)

    return FusedBatchNormalization


def with_batch_normalization(model, cls):
    """`model` with every BatchNormalization layer of class `cls`, same names and weights (a copy, or
    `model` itself when nothing changes). Checkpoints are saved with Keras's own class, so a .h5 loads
    in plain Keras without this code; training and --evaluate put the fused class back on TensorFlow's CPU."""
    import keras
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if all(type(layer) is cls for layer in norms):
        return model

    def clone(layer):
        layer_class = cls if isinstance(layer, keras.layers.BatchNormalization) else layer.__class__
        return layer_class.from_config(layer.get_config())
    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        copy.get_layer(layer.name).set_weights(layer.get_weights())
    return copy

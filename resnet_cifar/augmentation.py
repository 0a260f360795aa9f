"""The per-image augmentation layers: the papers' pad-and-crop and, as an option, Cutout (DeVries & Taylor 2017).
Each is the identity at inference and draws from its own SeedGenerator (training.reseed_augmentation).

The paper's translation augmentation: pad every side with zeros, then take a random crop of the
original size, each image its own offset (He et al. 2015, §4.2: "4 pixels are padded on each side, and a 32x32
crop is randomly sampled from the padded image"). With 4 pixels, each of the 9 x 9 offsets has probability 1/81.

Why not Keras's own layers: RandomCrop draws one offset for the whole batch; RandomTranslation with nearest
interpolation rounds a continuous shift (with a 4-pixel range, shifts of +-4 come half as often as the others)
and TensorFlow cannot compile it with XLA (ImageProjectiveTransformV3 has no XLA kernel). This layer is one pad
and one gather, so it compiles under XLA on every backend, and it is exact (no arithmetic on the pixels).

Saved models hold Keras's RandomTranslation with a range of padding + 0.5 pixels instead (`standard_layer`):
with nearest interpolation it draws the same 81 offsets with the same probabilities (tests/test_augmentation.py),
is the identity at inference like this layer, and loads with plain keras.models.load_model.

Cutout: Keras's RandomErasing draws a rectangle of random area and aspect ratio inside the image; the paper's
is a fixed square whose centre may lie anywhere, so that near the border only part of it is cut. Saved models
hold Keras's Identity in its place.
Import-safe: Keras is imported inside the functions.
"""
import functools


@functools.cache
def pad_and_crop_class():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="resnet_cifar")
    class PadAndCrop(keras.layers.Layer):
        """Training only: each image of the batch padded with `padding` zeros per side and cropped back to
        its size at an offset of its own, uniform over {0..2 * padding} in each axis. Inference: identity."""

        def __init__(self, padding, seed=None, **kwargs):
            super().__init__(**kwargs)
            self.padding = padding
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)  # training.reseed_augmentation reseeds it
            self.built = True

        def call(self, inputs, training=None):
            if not training:
                return inputs
            p = self.padding
            height, width, channels = inputs.shape[1:]
            batch = ops.shape(inputs)[0]
            padded = ops.pad(inputs, ((0, 0), (p, p), (p, p), (0, 0)))
            offsets = keras.random.randint((2, batch, 1, 1), 0, 2 * p + 1, dtype="int32", seed=self.generator)
            # the flat index of padded[b, dy + i, dx + j] for every output pixel (b, i, j)
            rows = ops.arange(batch, dtype="int32")[:, None, None] * (height + 2 * p) + offsets[0] \
                + ops.arange(height, dtype="int32")[None, :, None]
            index = rows * (width + 2 * p) + offsets[1] + ops.arange(width, dtype="int32")[None, None, :]
            pixels = ops.take(ops.reshape(padded, (-1, channels)), ops.reshape(index, (-1,)), axis=0)
            return ops.reshape(pixels, (batch, height, width, channels))

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "padding": self.padding, "seed": self.seed}

    return PadAndCrop


def pad_and_crop(padding, name):
    return pad_and_crop_class()(padding, name=name)


@functools.cache
def cutout_class():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="resnet_cifar")
    class Cutout(keras.layers.Layer):
        """Training only: in each image of the batch, a `size` x `size` square set to 0 (the mean pixel: the
        layer follows the standardization, as in the paper's code), centred at a pixel drawn uniformly over the
        whole image, each image its own, and clipped at the border (DeVries & Taylor 2017, §3: "the cutout
        region is allowed to extend outside the image"): rows cy - size // 2 to cy + size // 2 - 1, clipped.
        Inference: identity."""

        def __init__(self, size, seed=None, **kwargs):
            super().__init__(**kwargs)
            self.size = size
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)  # training.reseed_augmentation reseeds it
            self.built = True

        def call(self, inputs, training=None):
            if not training:
                return inputs
            height, width = inputs.shape[1:3]
            batch = ops.shape(inputs)[0]
            centre_y = keras.random.randint((batch, 1), 0, height, dtype="int32", seed=self.generator)
            centre_x = keras.random.randint((batch, 1), 0, width, dtype="int32", seed=self.generator)
            half = self.size // 2
            rows = ops.arange(height, dtype="int32")[None, :]
            cols = ops.arange(width, dtype="int32")[None, :]
            cut_rows = (rows >= centre_y - half) & (rows < centre_y + half)  # (batch, height)
            cut_cols = (cols >= centre_x - half) & (cols < centre_x + half)  # (batch, width)
            cut = cut_rows[:, :, None] & cut_cols[:, None, :]
            return ops.where(cut[:, :, :, None], ops.zeros((), inputs.dtype), inputs)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "size": self.size, "seed": self.seed}

    return Cutout


def cutout(size, name):
    return cutout_class()(size, name=name)


def standard_layer(layer):
    """What a saved model holds instead of a PadAndCrop `layer`: Keras's RandomTranslation over +-(padding
    + 0.5) pixels, rounded to the nearest pixel and filled with zeros, i.e. the same offsets equally likely;
    instead of a layer that only trains (Cutout, mixing.BatchMix: the identity at inference), Keras's
    Identity. None for any other layer."""
    import keras

    from .mixing import batch_mix_class
    if isinstance(layer, (cutout_class(), batch_mix_class())):
        return keras.layers.Identity(name=layer.name)
    if not isinstance(layer, pad_and_crop_class()):
        return None
    height, width = layer.input.shape[1:3]
    return keras.layers.RandomTranslation((layer.padding + 0.5) / height, (layer.padding + 0.5) / width,
                                          fill_mode="constant", fill_value=0.0, interpolation="nearest",
                                          seed=layer.seed, name=layer.name)


def training_layer(layer):
    """The PadAndCrop a RandomTranslation written by `standard_layer` stands for; None for any other layer."""
    import keras
    if not isinstance(layer, keras.layers.RandomTranslation):
        return None
    height, width = layer.input.shape[1:3]
    padding = layer.height_factor * height - 0.5
    if (layer.fill_mode, layer.fill_value, layer.interpolation) != ("constant", 0.0, "nearest") \
            or padding != round(padding) or layer.width_factor * width - 0.5 != padding:
        return None
    return pad_and_crop_class()(int(round(padding)), seed=layer.seed, name=layer.name)

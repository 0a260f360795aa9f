"""The augmentation (recipe.image_input): per-image pad-and-crop over 81 equally likely offsets and a flip with
probability 0.5, the identity at inference, exact pixels; the RandomTranslation saved models hold instead draws
the same offsets; XLA compiles it on TensorFlow. On the backend of this process (KERAS_BACKEND)."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from resnet_cifar import augmentation, checkpoints, recipe
import train_resnet32
from conftest import ROOT

IMAGES = 2000
OFFSETS = (2 * recipe.PADDING + 1) ** 2  # 81
CHI2_80_999 = 124.84  # the 0.999 quantile of the chi-square distribution with 80 degrees of freedom


def position_images(n):
    """n copies of one 32x32 image whose pixel (i, j) holds 1 + 32 i + j: every pixel says where it came from."""
    return np.tile(1 + np.arange(32 * 32, dtype="float32").reshape(1, 32, 32, 1), (n, 1, 1, 1))


def shifted(image, dy, dx, padding=recipe.PADDING):
    """The crop at offset (padding + dy, padding + dx) of `image` padded with zeros."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return padded[padding + dy:padding + dy + 32, padding + dx:padding + dx + 32]


def offsets_of(images):
    """Each augmented image's (dy, dx), read from the pixel that lands at the centre; asserts the whole image is
    exactly that shifted copy (no interpolation, zeros where the padding shows)."""
    source = position_images(1)[0]
    centre = images[:, 16, 16, 0].astype(int) - 1
    dy, dx = centre // 32 - 16, centre % 32 - 16
    for image, a, b in zip(images, dy, dx):
        np.testing.assert_array_equal(image, shifted(source, a, b))
    return dy, dx


def crop_layer():
    layer = augmentation.pad_and_crop(recipe.PADDING, name="random_crop")
    inputs = keras.Input((32, 32, 1))
    keras.Model(inputs, layer(inputs))
    return layer


def assert_uniform_offsets(dy, dx):
    """Each of the 81 offsets within sampling error of 1/81: a chi-square test at p = 0.001 and no offset
    more than 4.5 standard deviations from IMAGES / 81."""
    counts = np.bincount((dy + recipe.PADDING) * 9 + dx + recipe.PADDING, minlength=OFFSETS)
    assert len(counts) == OFFSETS and counts.sum() == IMAGES
    expected = IMAGES / OFFSETS
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_80_999, (chi2, counts)
    assert np.abs(counts - expected).max() < 4.5 * np.sqrt(expected * (1 - 1 / OFFSETS)), counts


@pytest.mark.parametrize("make", [crop_layer, lambda: augmentation.standard_layer(crop_layer())],
                         ids=["pad_and_crop", "saved_as_random_translation"])
def test_offsets_are_per_image_and_uniform(make):
    keras.utils.set_random_seed(1)
    layer = make()
    dy, dx = offsets_of(np.asarray(layer(position_images(IMAGES), training=True)))
    assert_uniform_offsets(dy, dx)
    # one batch holds many offsets (keras.layers.RandomCrop would give all its images one)
    assert len(set(zip(dy[:128], dx[:128]))) > 40


def test_identity_at_inference():
    x = position_images(4)
    np.testing.assert_array_equal(np.asarray(crop_layer()(x, training=False)), x)
    np.testing.assert_array_equal(np.asarray(crop_layer()(x)), x)


def test_the_networks_augmentation_flips_half_and_crops_each_image():
    """The first layers of a built network (standardization, flip, crop) in training mode, on 3-channel
    position images: each output is one of the 162 flipped-or-not crops, flips half the time."""
    keras.utils.set_random_seed(2)
    model = train_resnet32.resnet(1)
    augment = keras.Model(model.input, model.get_layer("random_crop").output)
    out = np.asarray(augment(np.repeat(position_images(IMAGES), 3, axis=-1), training=True), dtype="float64")
    pixels = np.rint(out * recipe.PIXEL_STD + recipe.PIXEL_MEAN)[..., 0]  # back to positions; padding -> the mean
    source = position_images(1)[0, ..., 0]
    centre = pixels[:, 16, 16].astype(int) - 1
    flipped = pixels[:, 16, 17] - pixels[:, 16, 16] == -1  # the column to the right comes from the left
    dy = centre // 32 - 16
    dx = np.where(flipped, 31 - centre % 32, centre % 32) - 16  # the shift applied after the flip
    for image, flip, a, b in zip(pixels, flipped, dy, dx):
        expected = shifted((source[:, ::-1] if flip else source)[..., None], a, b)[..., 0]
        np.testing.assert_array_equal(image, np.where(expected == 0, np.rint(recipe.PIXEL_MEAN[0]), expected))
    assert abs(flipped.sum() - IMAGES / 2) < 4.5 * np.sqrt(IMAGES / 4), flipped.sum()  # rate 0.5
    assert_uniform_offsets(dy, dx)


def test_saved_model_holds_keras_layers_and_loads_back_as_trained(tmp_path):
    model = train_resnet32.resnet(1)
    path = str(tmp_path / "model.keras")
    checkpoints.save_model(model, path)
    reloaded = keras.models.load_model(path, compile=False)
    layer = reloaded.get_layer("random_crop")
    assert type(layer) is keras.layers.RandomTranslation
    assert (layer.interpolation, layer.fill_mode, layer.fill_value) == ("nearest", "constant", 0.0)
    back = checkpoints.as_trained(reloaded)
    assert type(back.get_layer("random_crop")) is augmentation.pad_and_crop_class()
    assert back.get_layer("random_crop").padding == recipe.PADDING
    # another RandomTranslation (a file of an earlier version) is left as it is
    other = keras.layers.RandomTranslation(0.125, 0.125, name="random_shift")
    other(keras.KerasTensor((None, 32, 32, 3)))
    assert augmentation.training_layer(other) is None


OTHER_BACKEND = """
import json, sys, numpy as np
sys.path.insert(0, {root!r})
import keras
from resnet_cifar import augmentation
keras.utils.set_random_seed(3)
layer = augmentation.pad_and_crop({padding}, name="random_crop")
x = np.tile(1 + np.arange(1024, dtype="float32").reshape(1, 32, 32, 1), ({images}, 1, 1, 1))
print(json.dumps(np.asarray(layer(x, training=True))[:, :, :, 0].astype(int).tolist()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_offsets_are_per_image_and_uniform_on(backend):
    code = OTHER_BACKEND.format(root=ROOT, padding=recipe.PADDING, images=IMAGES)
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KERAS_BACKEND": backend},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    images = np.array(json.loads(result.stdout.strip().splitlines()[-1]), dtype="float32")[..., None]
    assert_uniform_offsets(*offsets_of(images))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="XLA on TensorFlow")
def test_compiles_with_xla_on_tensorflow():
    import tensorflow as tf
    layer = crop_layer()
    step = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    dy, dx = offsets_of(np.asarray(step(position_images(IMAGES))))
    assert_uniform_offsets(dy, dx)

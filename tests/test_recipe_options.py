"""Today's options of the recipe (docs/recipe.md), each checked against its paper's definition: Cutout's square
(statistically, over thousands of images), mixup's and CutMix's λ, pairing and label weight, label smoothing, the
cosine schedule and warm-up at every step, the weights' average, flip TTA; every option the identity at inference.
On the backend of this process (KERAS_BACKEND); whole runs on every backend are in test_recipe_options_runs.py."""
import keras
import numpy as np
import pytest
import scipy.stats

from resnet_cifar import augmentation, evaluation, mixing, recipe
import train_resnet32
from conftest import parse

IMAGES = 2000
P = 0.001  # every statistical test rejects at this level: a correct layer fails one about once in a thousand runs


def ones(n, size=32, channels=1):
    return np.ones((n, size, size, channels), dtype="float32")


def cutout_layer(size):
    layer = augmentation.cutout(size, name="cutout")
    inputs = keras.Input((32, 32, 1))
    keras.Model(inputs, layer(inputs))
    return layer


def cut_squares(images, size):
    """Each image's cut region (where it is 0) as its centre (cy, cx); asserts the region is exactly the square
    rows cy - size//2 .. cy + size//2 - 1 (likewise columns) clipped at the border, and nothing else changed."""
    half = size // 2
    centres = []
    for image in images[..., 0]:
        rows, cols = np.nonzero(image == 0)
        y1, y2, x1, x2 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        cy = y2 - half if y1 == 0 else y1 + half
        cx = x2 - half if x1 == 0 else x1 + half
        expected = np.ones((32, 32), dtype="float32")
        expected[max(cy - half, 0):min(cy + half, 32), max(cx - half, 0):min(cx + half, 32)] = 0
        np.testing.assert_array_equal(image, expected)
        centres.append((cy, cx))
    return np.array(centres)


@pytest.mark.parametrize("size", [16, 8])
def test_cutout_centres_are_uniform_over_the_image_independent_per_image_and_clipped(size):
    keras.utils.set_random_seed(4)
    layer = cutout_layer(size)
    centres = np.concatenate([cut_squares(np.asarray(layer(ones(500), training=True)), size) for _ in range(4)])
    assert len(centres) == IMAGES
    for axis in (0, 1):  # each coordinate uniform over the 32 rows / columns (the paper's centre: anywhere)
        counts = np.bincount(centres[:, axis], minlength=32)
        assert len(counts) == 32 and scipy.stats.chisquare(counts).pvalue > P, counts
    # the two coordinates independent (4 x 4 blocks), and each image's centre independent of the one before it
    table = np.zeros((4, 4))
    np.add.at(table, (centres[:, 0] // 8, centres[:, 1] // 8), 1)
    assert scipy.stats.chi2_contingency(table).pvalue > P
    assert scipy.stats.pearsonr(centres[:-1, 0], centres[1:, 0]).pvalue > P
    assert len(set(map(tuple, centres[:100]))) > 80  # one batch, many squares: per image, not per batch
    assert (centres.min(), centres.max()) == (0, 31)  # squares clipped at every border occur


def mix_model(method, alpha, probability=1.0, size=8, channels=1):
    layer = mixing.batch_mix(method, alpha, probability, name="batch_mix")
    inputs = keras.Input((size, size, channels))
    model = keras.Model(inputs, layer(inputs))
    return model, layer


def position_batch(batch, size=8):
    """Image i's pixel (r, c) holds 1000 (i + 1) + size r + c: every pixel says which image and where it came from."""
    return (1000 * (1 + np.arange(batch))[:, None, None] + np.arange(size * size).reshape(size, size))[..., None] \
        .astype("float32")


def test_mixup_draws_lambda_from_beta_and_pairs_the_batch_with_a_random_permutation():
    keras.utils.set_random_seed(5)
    alpha, batch = 0.4, 4
    model, layer = mix_model("mixup", alpha)
    x = position_batch(batch)
    lams, pairs = [], np.zeros((batch, batch))
    for _ in range(IMAGES // batch * 4):  # 2,000 batches, 8,000 images
        mixed = np.asarray(layer(x, training=True), dtype="float64")
        drawn = layer.draws(batch)  # what the loss draws again
        lam, perm = float(drawn["weight"]), np.asarray(drawn["pairing"])
        np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[perm], rtol=1e-5)  # the pairing the loss uses
        lams.append(lam)
        pairs[np.arange(batch), perm] += 1
    assert scipy.stats.kstest(lams, "beta", args=(alpha, alpha)).pvalue > P
    assert scipy.stats.chisquare(pairs.ravel()).pvalue > P, pairs  # each partner equally likely (torch.randperm)


def test_cutmix_pastes_one_box_per_batch_and_weighs_the_labels_by_the_area_kept():
    keras.utils.set_random_seed(6)
    batch, size = 4, 8
    model, layer = mix_model("cutmix", 1.0, recipe.CUTMIX_PROBABILITY, size=size)
    x = position_batch(batch, size)
    applied = 0
    for _ in range(IMAGES // batch * 2):
        mixed = np.asarray(layer(x, training=True))
        drawn = layer.draws(batch)
        weight, perm = float(drawn["weight"]), np.asarray(drawn["pairing"])
        pasted = mixed != x  # per image; the same box in every image whose partner is another image
        box = pasted[perm != np.arange(batch)]
        if len(box):
            assert (box == box[0]).all()
            np.testing.assert_array_equal(mixed, np.where(box[0], x[perm], x))
            assert weight == pytest.approx(1 - box[0].sum() / size ** 2, abs=1e-6)  # the area kept, exactly
        applied += weight < 1
    assert scipy.stats.binomtest(applied, IMAGES // batch * 2, recipe.CUTMIX_PROBABILITY).pvalue > P
    # the draws themselves, on 32 x 32 images: λ ~ Beta(α, α), the box's centre uniform over the image
    keras.utils.set_random_seed(7)
    model, layer = mix_model("cutmix", 0.5, 1.0, size=32)
    x = position_batch(2, 32)
    lams, centres = [], []
    for _ in range(IMAGES):
        layer(x, training=True)
        drawn = layer.draws(2)
        lam, (y1, y2, _, _) = float(drawn["lam"]), (int(v) for v in drawn["box"])
        half = int(np.floor(32 * np.sqrt(1 - lam))) // 2  # Yun et al.: cut_rat = sqrt(1 - λ)
        lams.append(lam)
        centres.append(y2 - half if y1 == 0 else y1 + half)
    assert scipy.stats.kstest(lams, "beta", args=(0.5, 0.5)).pvalue > P
    assert scipy.stats.chisquare(np.bincount(centres, minlength=32)).pvalue > P


def test_the_loss_mixes_and_smooths_the_labels_with_the_pairing_and_weight_of_the_images():
    """RecipeLoss = λ CE(y_i) + (1 - λ) CE(y_perm(i)) on the smoothed targets, computed here by hand."""
    keras.utils.set_random_seed(8)
    classes, batch, eps = 10, 6, 0.1
    inputs = keras.Input((8, 8, 1))
    mixed = mixing.batch_mix("mixup", 1.0, 1.0, name="batch_mix")(inputs)
    outputs = keras.layers.Dense(classes, activation="softmax")(keras.layers.Flatten()(mixed))
    model = keras.Model(inputs, outputs)
    loss = mixing.recipe_loss(model, classes, eps)
    x = np.random.default_rng(2).normal(size=(batch, 8, 8, 1)).astype("float32") * 0.1  # no probability near
    y = np.array([0, 3, 3, 9, 1, 5])  # Keras's clip at 1e-7
    for _ in range(3):
        pred = np.asarray(model(x, training=True), dtype="float64")
        mix = mixing.find_batch_mix(model)
        drawn = mix.draws(batch)
        lam, perm = float(drawn["weight"]), np.asarray(drawn["pairing"])
        smooth = (1 - eps) * np.eye(classes)[y] + eps / classes
        expected = np.mean(-((lam * smooth + (1 - lam) * smooth[perm]) * np.log(pred)).sum(axis=1))
        assert float(loss(y, pred)) == pytest.approx(expected, rel=1e-5)
    # label smoothing alone: (1 - ε) CE + ε mean(-log p); no options: Keras's own sparse cross-entropy
    plain = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(keras.layers.Flatten()(inputs)))
    pred = np.asarray(plain(x), dtype="float64")
    expected = np.mean(-(1 - eps) * np.log(pred[np.arange(batch), y]) - eps * np.log(pred).mean(axis=1))
    assert float(mixing.recipe_loss(plain, classes, eps)(y, pred)) == pytest.approx(expected, rel=1e-5)
    assert mixing.recipe_loss(plain, classes, None) == "sparse_categorical_crossentropy"


@pytest.mark.parametrize("flags", [["--cutout", "16"], ["--mixup", "1"], ["--cutmix", "1"]])
def test_every_option_is_the_identity_at_inference_and_the_flip_rate_stays_half(flags):
    config = parse(train_resnet32, ["--stack-n", "1", *flags])
    keras.utils.set_random_seed(9)
    plain = train_resnet32.build_model(config, 10)
    model = recipe.with_options(plain, config)  # the same layers and weights, the option's layer added
    x = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), np.asarray(plain(x, training=False)))
    added = [layer for layer in model.layers if layer.name in ("cutout", "batch_mix")]
    assert len(added) == 1
    np.testing.assert_array_equal(np.asarray(added[0](x, training=False)), x)
    # the flip before them still flips half the images
    flip = keras.Model(plain.input, plain.get_layer("random_flip").output)  # (the layers' first graph: plain's)
    standardized = np.asarray(keras.Model(plain.input, plain.get_layer("standardize").output)(x))
    outputs = np.asarray(flip(np.repeat(x[:1], IMAGES, axis=0), training=True))
    flipped = np.abs(outputs - standardized[:1, :, ::-1]).max(axis=(1, 2, 3)) < 1e-5
    assert scipy.stats.binomtest(int(flipped.sum()), IMAGES, 0.5).pvalue > P


def cosine_formula(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("flags, expected", [
    (["--lr-schedule", "cosine", "--warmup-epochs", "3"], lambda s: cosine_formula(s, 0.1, 30, 200)),
    (["--lr-schedule", "cosine:0.4"], lambda s: cosine_formula(s, 0.4, 0, 200)),
    (["--lr-schedule", "0:0.1,8:0.01,15:0.001", "--warmup-epochs", "2"],
     lambda s: 0.1 * s / 20 if s < 20 else 0.1 if s < 80 else 0.01 if s < 150 else 0.001),
    (["--lr-schedule", "0:0.1,8:0.01,15:0.001"], lambda s: 0.1 if s < 80 else 0.01 if s < 150 else 0.001),
], ids=["cosine_warmup", "cosine_peak", "step_warmup", "step_unchanged"])
def test_the_learning_rate_of_every_step_equals_the_formula(flags, expected):
    """Read from the compiled optimizer at every step of a 20-epoch, 10-step run: Goyal's linear warm-up from 0,
    Loshchilov & Hutter's cosine to 0 over the steps after it; the step schedule's boundaries where they were."""
    config = parse(train_resnet32, ["--stack-n", "1", "--epochs", "20", *flags])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    recipe.compile_model(model, config.lr_schedule, 10, 1, options=config)
    schedule = recipe.Schedule.of(config, 10)
    for step in range(200):
        model.optimizer.iterations.assign(step)
        rate = float(np.asarray(model.optimizer.learning_rate))
        assert rate == pytest.approx(expected(step), rel=1e-4, abs=1e-8), step  # Keras's: in float32
        assert schedule.at_step(step) == pytest.approx(expected(step), rel=1e-9, abs=1e-12)  # the history's


def test_the_average_of_the_weights_is_evaluated_and_the_trained_weights_come_back():
    config = parse(train_resnet32, ["--stack-n", "1", "--ema", "0.5", "--tta", "flip"])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    recipe.compile_model(model, config.lr_schedule, 10, 1, options=config)
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = np.arange(40) % 3
    trained = []
    for _ in range(3):  # an average over three fits, as runs make one fit() per epoch
        model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0)
        trained.append([w.copy() for w in model.get_weights()])
    np.testing.assert_array_equal(model.get_weights()[0], trained[-1][0])  # fit() left the trained weights
    with evaluation.averaged_weights(model):
        average = [w.copy() for w in model.get_weights()]
    np.testing.assert_array_equal(model.get_weights()[0], trained[-1][0])
    averages = model.optimizer._model_variables_moving_average  # Keras's own record of the average
    np.testing.assert_array_equal(average[0], np.asarray(averages[0]))
    assert not np.allclose(average[0], trained[-1][0])


def test_flip_tta_averages_the_softmax_of_each_image_and_its_mirror():
    keras.utils.set_random_seed(10)
    model = train_resnet32.build_model(parse(train_resnet32, ["--stack-n", "1"]), 10)
    x = np.random.default_rng(1).integers(0, 256, size=(5, 32, 32, 3)).astype("float32")
    tta = evaluation.evaluation_model(model, "flip")
    expected = (np.asarray(model(x, training=False)) + np.asarray(model(x[:, :, ::-1], training=False))) / 2
    np.testing.assert_allclose(np.asarray(tta(x, training=False)), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expected, np.asarray(model(x, training=False)), atol=1e-4)

"""Options of the recipe that mix a batch with itself, mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019),
and the loss that goes with them and with label smoothing (Szegedy et al. 2016).

Both papers' code draws one λ ~ Beta(α, α) per batch and pairs the batch with a random permutation of itself
(torch.randperm). mixup: x = λ x_i + (1 - λ) x_perm(i). CutMix: a box of the permuted batch pasted into every
image, its side sqrt(1 - λ) times the image's, its centre uniform over the image, clipped at the border; λ is then
the part of the image not pasted. The loss is λ CE(y_i) + (1 - λ) CE(y_perm(i)), i.e. the cross-entropy against
the mixed one-hot target, which label smoothing then smooths: (1 - ε) target + ε / classes.

Why not Keras's MixUp and CutMix layers: they take the labels with the images (a map over a tf.data pipeline,
outside the compiled step, on one-hot labels), and draw a λ and a box per image where the papers draw one per
batch. Here BatchMix sits in the network after the per-image augmentation (the papers mix augmented images),
inside the compiled step, and keeps what the loss needs (the batch's label weight λ and the seed its permutation
was drawn from) in two variables that RecipeLoss reads in the same step: on JAX through the state the step hands
from the forward pass to the loss, on TensorFlow in program order, on PyTorch eagerly. Saved models hold Keras's
Identity in its place (augmentation.standard_layer). Import-safe: Keras is imported inside the functions.
"""
import functools

SEED_RANGE = 2**30  # the permutation's seed: drawn from the layer's generator, kept for the loss to draw it again


@functools.cache
def batch_mix_class():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="resnet_cifar")
    class BatchMix(keras.layers.Layer):
        """Training only: `method` "mixup" or "cutmix" with λ ~ Beta(alpha, alpha), applied to a batch with
        `probability` (else λ = 1, nothing pasted). Inference: identity. `label_weight` holds the batch's λ
        and `permutation(batch)` the pairing, for RecipeLoss."""

        def __init__(self, method, alpha, probability=1.0, seed=None, **kwargs):
            super().__init__(**kwargs)
            if method not in ("mixup", "cutmix"):
                raise ValueError(f"method must be 'mixup' or 'cutmix', got {method!r}")
            self.method, self.alpha, self.probability, self.seed = method, alpha, probability, seed
            self.generator = keras.random.SeedGenerator(seed)  # training.reseed_augmentation reseeds it
            self.pairing = keras.random.SeedGenerator(seed)  # set to pairing_seed before each permutation
            self.pairing_seed = self.add_weight(shape=(2,), dtype=self.pairing.state.dtype, initializer="zeros",
                                                trainable=False, name="pairing_seed")
            self.label_weight = self.add_weight(shape=(), dtype="float32", initializer="ones", trainable=False,
                                                name="label_weight", autocast=False)
            self.built = True

        def permutation(self, batch):
            """The batch's pairing, drawn from pairing_seed: the same in the layer and in the loss."""
            self.pairing.state.assign(self.pairing_seed.value)
            return keras.random.shuffle(ops.arange(batch, dtype="int32"), seed=self.pairing)

        def draw(self, batch, height, width):
            """(λ as drawn, apply, box rows y1:y2 and columns x1:x2): one draw per batch."""
            lam = keras.random.beta((1,), self.alpha, self.alpha, dtype="float32", seed=self.generator)[0]
            apply = keras.random.uniform((), dtype="float32", seed=self.generator) < self.probability
            cy = keras.random.randint((), 0, height, dtype="int32", seed=self.generator)
            cx = keras.random.randint((), 0, width, dtype="int32", seed=self.generator)
            cut = ops.sqrt(1.0 - lam)  # the box's side over the image's (Yun et al.: cut_rat)
            half_h = ops.cast(ops.floor(height * cut), "int32") // 2
            half_w = ops.cast(ops.floor(width * cut), "int32") // 2
            box = (ops.clip(cy - half_h, 0, height), ops.clip(cy + half_h, 0, height),
                   ops.clip(cx - half_w, 0, width), ops.clip(cx + half_w, 0, width))
            return lam, apply, box

        def call(self, inputs, training=None):
            if not training:
                return inputs
            batch = ops.shape(inputs)[0]
            height, width = inputs.shape[1:3]
            self.pairing_seed.assign(keras.random.randint((2,), 0, SEED_RANGE, dtype=self.pairing_seed.dtype,
                                                          seed=self.generator))
            partners = ops.take(inputs, self.permutation(batch), axis=0)
            lam, apply, (y1, y2, x1, x2) = self.draw(batch, height, width)
            if self.method == "mixup":
                weight = lam
                mixed = ops.cast(lam, inputs.dtype) * inputs + ops.cast(1.0 - lam, inputs.dtype) * partners
            else:
                rows = ops.arange(height, dtype="int32")
                cols = ops.arange(width, dtype="int32")
                box = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
                mixed = ops.where(box[None, :, :, None], partners, inputs)
                weight = 1.0 - ops.cast((y2 - y1) * (x2 - x1), "float32") / (height * width)
            self.label_weight.assign(ops.where(apply, weight, 1.0))
            return ops.where(apply, mixed, inputs)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "method": self.method, "alpha": self.alpha,
                    "probability": self.probability, "seed": self.seed}

    return BatchMix


def batch_mix(method, alpha, probability, name):
    return batch_mix_class()(method, alpha, probability, name=name)


def find_batch_mix(model):
    """The model's BatchMix layer, or None."""
    found = [layer for layer in model.layers if isinstance(layer, batch_mix_class())]
    return found[0] if found else None


def recipe_loss(model, classes, label_smoothing):
    """The training loss: Keras's sparse categorical cross-entropy (the papers'), or with label smoothing or a
    BatchMix in `model`, the cross-entropy against the mixed, smoothed one-hot target."""
    import keras
    from keras import ops
    mix = find_batch_mix(model)
    if mix is None and not label_smoothing:
        return "sparse_categorical_crossentropy"

    class RecipeLoss(keras.losses.Loss):
        def call(self, y_true, y_pred):
            labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
            target = ops.one_hot(labels, classes, dtype=y_pred.dtype)
            if mix is not None:
                weight = ops.cast(mix.label_weight.value, y_pred.dtype)
                target = weight * target + (1 - weight) * ops.take(target, mix.permutation(ops.shape(labels)[0]), 0)
            return keras.losses.categorical_crossentropy(target, y_pred, label_smoothing=label_smoothing or 0.0)

    return RecipeLoss(name="recipe_loss")

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
inside the compiled step, and keeps the step's seed in the state of a seed generator, from which RecipeLoss draws
the same pairing and λ again in the same step: on JAX through the state the step hands from the forward pass to
the loss, on TensorFlow in program order, on PyTorch eagerly. (A seed generator's state is not a weight: the
network's parameter count stays the papers'.) Saved models hold Keras's
Identity in its place (augmentation.standard_layer). Import-safe: Keras is imported inside the functions.
"""
import functools

SEED_RANGE = 2**30  # the step's seed: drawn from the layer's generator, kept for the loss to draw the same again


@functools.cache
def batch_mix_class():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="resnet_cifar")
    class BatchMix(keras.layers.Layer):
        """Training only: `method` "mixup" or "cutmix" with λ ~ Beta(alpha, alpha), applied to a batch with
        `probability` (else λ = 1, nothing pasted). Inference: identity. `draws(batch)` gives the step's pairing
        and label weight again, for RecipeLoss."""

        def __init__(self, method, alpha, probability=1.0, seed=None, **kwargs):
            super().__init__(**kwargs)
            if method not in ("mixup", "cutmix"):
                raise ValueError(f"method must be 'mixup' or 'cutmix', got {method!r}")
            self.method, self.alpha, self.probability, self.seed = method, alpha, probability, seed
            self.generator = keras.random.SeedGenerator(seed)  # training.reseed_augmentation reseeds it
            # Seed generators' states are variables the step carries but not weights (no parameter counted):
            self.step_seed = keras.random.SeedGenerator(seed)  # its state holds the step's seed, never drawn from
            self.replay = keras.random.SeedGenerator(seed)  # set to the step's seed, then draws the step's mixing
            self.size = None  # (height, width) of the images: build

        def draws(self, batch):
            """The step's mixing, drawn from its seed (the same in the layer and in the loss): {"pairing", "lam"
            (as drawn), "apply" (whether the batch is mixed), "box" (CutMix: rows y1:y2, columns x1:x2),
            "weight" (the label weight: λ for mixup, the area kept for CutMix, 1 if not applied)}."""
            height, width = self.size
            self.replay.state.assign(self.step_seed.state.value)
            pairing = keras.random.shuffle(ops.arange(batch, dtype="int32"), seed=self.replay)
            lam = keras.random.beta((1,), self.alpha, self.alpha, dtype="float32", seed=self.replay)[0]
            apply = keras.random.uniform((), dtype="float32", seed=self.replay) < self.probability
            cy = keras.random.randint((), 0, height, dtype="int32", seed=self.replay)
            cx = keras.random.randint((), 0, width, dtype="int32", seed=self.replay)
            drawn = {"pairing": pairing, "lam": lam, "apply": apply, "box": None}
            if self.method == "mixup":
                return {**drawn, "weight": ops.where(apply, lam, 1.0)}
            cut = ops.sqrt(1.0 - lam)  # the box's side over the image's (Yun et al.: cut_rat)
            half_h = ops.cast(ops.floor(height * cut), "int32") // 2
            half_w = ops.cast(ops.floor(width * cut), "int32") // 2
            box = (ops.clip(cy - half_h, 0, height), ops.clip(cy + half_h, 0, height),
                   ops.clip(cx - half_w, 0, width), ops.clip(cx + half_w, 0, width))
            kept = 1.0 - ops.cast((box[1] - box[0]) * (box[3] - box[2]), "float32") / (height * width)
            return {**drawn, "box": box, "weight": ops.where(apply, kept, 1.0)}

        def build(self, input_shape):
            self.size = tuple(input_shape[1:3])

        def call(self, inputs, training=None):
            if not training:
                return inputs
            self.step_seed.state.assign(keras.random.randint((2,), 0, SEED_RANGE, dtype=self.step_seed.state.dtype,
                                                             seed=self.generator))
            drawn = self.draws(ops.shape(inputs)[0])
            partners = ops.take(inputs, drawn["pairing"], axis=0)
            if self.method == "mixup":
                lam = drawn["lam"]
                mixed = ops.cast(lam, inputs.dtype) * inputs + ops.cast(1.0 - lam, inputs.dtype) * partners
            else:
                y1, y2, x1, x2 = drawn["box"]
                rows = ops.arange(self.size[0], dtype="int32")
                cols = ops.arange(self.size[1], dtype="int32")
                inside = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
                mixed = ops.where(inside[None, :, :, None], partners, inputs)
            return ops.where(drawn["apply"], mixed, inputs)

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
                drawn = mix.draws(ops.shape(labels)[0])
                weight = ops.cast(drawn["weight"], y_pred.dtype)
                target = weight * target + (1 - weight) * ops.take(target, drawn["pairing"], 0)
            return keras.losses.categorical_crossentropy(target, y_pred, label_smoothing=label_smoothing or 0.0)

    return RecipeLoss(name="recipe_loss")

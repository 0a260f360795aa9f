"""The training recipe: its constants (each with its source), the step learning-rate schedule, the optimizer,
and the preprocessing and augmentation layers that open every network.

Change "the recipe", "the schedule" or "the augmentation" here. Import-safe: Keras is imported inside the
functions that build something.
"""
import functools
import math
from typing import NamedTuple

# --- He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027), as run by the
# "ResNet-32 in Keras" article this project started from (BIGBALLON/cifar-10-cnn): SGD, Nesterov, 200 epochs.
EPOCHS = 200
BATCH_SIZE = 128
LR_SCHEDULE = "0:0.1,81:0.01,122:0.001"  # EPOCH:LR pairs; epochs count from 0 as Keras's do
MOMENTUM = 0.9  # SGD momentum, Nesterov
NESTEROV = True
WEIGHT_DECAY = 1e-4  # L2 kernel regularizer: loss += WEIGHT_DECAY * sum(w ** 2)
BN_MOMENTUM = 0.9  # BatchNormalization as in the Torch ResNets the article copies
BN_EPSILON = 1e-5
SEED = 0

# --- Preprocessing and augmentation: per-channel statistics of the CIFAR-10 training set on 0-255 pixels
# (the article's); He et al. 2015, §4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled
# from the padded image or its horizontal flip". ---
PIXEL_MEAN = (125.307, 122.95, 113.865)
PIXEL_STD = (62.9932, 62.0887, 66.7048)
PADDING = 4  # zero padding per side before the random crop: 9 x 9 equally likely offsets per image

# --- Today's options, each off unless its flag is given (docs/recipe.md); the papers' values, for the help. ---
CUTOUT_SIZE = {"cifar10": 16, "cifar100": 8}  # DeVries & Taylor 2017, §4.1: the best square side per dataset
MIXUP_ALPHA = 1.0  # Zhang et al. 2018, §3.2: alpha = 1 for CIFAR-10
CUTMIX_ALPHA = 1.0  # Yun et al. 2019, §4.1.2: alpha = 1
CUTMIX_PROBABILITY = 0.5  # Yun et al. 2019, the official code's CIFAR commands: --cutmix_prob 0.5
LABEL_SMOOTHING = 0.1  # Szegedy et al. 2016, §7: epsilon = 0.1
WARMUP_EPOCHS = 5  # Goyal et al. 2017, §2.2: gradual warm-up over 5 epochs
EMA_DECAY = 0.999  # a common choice on CIFAR (timm's ModelEmaV2 default is 0.9999 for ImageNet-length runs)


MAX_EPOCH = 100_000  # no schedule or --epochs goes further: the step counters stay far from any int overflow


class ScheduleError(ValueError):
    """A --lr-schedule that cannot be read; the message says what is expected."""


def parse_lr_schedule(text):
    """'0:0.1,81:0.01,122:0.001' -> ((0, 0.1), (81, 0.01), (122, 0.001)): the rate from each epoch on."""
    example = f"expected EPOCH:LR pairs starting at epoch 0, e.g. {LR_SCHEDULE!r}; got {text!r}"
    try:
        pairs = [item.split(":") for item in text.split(",")]
        schedule = tuple((int(epoch), float(lr)) for epoch, lr in pairs)
    except ValueError:
        raise ScheduleError(example) from None
    epochs = [epoch for epoch, _ in schedule]
    if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise ScheduleError(f"epochs must start at 0 and increase; {example}")
    if epochs[-1] > MAX_EPOCH:
        raise ScheduleError(f"epoch {epochs[-1]} is beyond any run (at most {MAX_EPOCH}); {example}")
    if not all(math.isfinite(lr) and lr > 0 for _, lr in schedule):
        raise ScheduleError(f"learning rates must be positive; {example}")
    return schedule


COSINE = "cosine"  # --lr-schedule cosine[:PEAK]: what cli.lr_schedule returns, resolved by run_config


def format_lr_schedule(schedule, decay="step"):
    """The schedule as --lr-schedule takes it: '0:0.1,81:0.01,122:0.001', or 'cosine:0.1'."""
    if decay == COSINE:
        return f"{COSINE}:{schedule[0][1]:g}"
    return ",".join(f"{epoch}:{lr:g}" for epoch, lr in schedule)


# What an unset --epochs / --weight-decay / --lr-schedule means, unless a family's recipe says otherwise.
DEFAULTS = {"epochs": EPOCHS, "weight_decay": WEIGHT_DECAY, "lr_schedule": parse_lr_schedule(LR_SCHEDULE)}


def lr_at_epoch(schedule, epoch):
    return [lr for start, lr in schedule if start <= epoch][-1]


class Schedule(NamedTuple):
    """The learning rate of every step: the rates of --lr-schedule (one peak rate with cosine), its decay, the
    linear warm-up and the run's length."""
    rates: tuple  # ((epoch, lr), ...): the step schedule; cosine: ((0, peak),)
    steps_per_epoch: int
    decay: str = "step"
    warmup_epochs: int = 0
    epochs: int = EPOCHS

    @classmethod
    def of(cls, config, steps_per_epoch):
        return cls(config.lr_schedule, steps_per_epoch, config.lr_decay, config.warmup_epochs, config.epochs)

    def at_step(self, step):
        """The rate of update number `step` (counted from 0: optimizer.iterations before it):
        warm-up   peak * step / W                                     for step < W = warmup_epochs * steps
        step      the rate of --lr-schedule from epoch step // steps_per_epoch on
        cosine    peak * (1 + cos(pi * (step - W) / (T - W))) / 2      T = epochs * steps_per_epoch"""
        peak, warmup = self.rates[0][1], self.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return peak * step / warmup
        if self.decay == "cosine":
            span = self.epochs * self.steps_per_epoch - warmup
            return peak * (1 + math.cos(math.pi * min(step - warmup, span) / span)) / 2
        return lr_at_epoch(self.rates, step // self.steps_per_epoch)

    def of_epoch(self, epoch):
        """What the history records for an epoch: the rate of its last step."""
        return self.at_step((epoch + 1) * self.steps_per_epoch - 1)

    def keras_schedule(self):
        """The optimizer's learning rate: Keras's own schedules (PiecewiseConstantDecay, CosineDecay with its
        warm-up), and for a warm-up before the step schedule our LinearWarmup, which Keras lacks."""
        import keras
        schedules = keras.optimizers.schedules
        peak, warmup = self.rates[0][1], self.warmup_epochs * self.steps_per_epoch
        if self.decay == "cosine":
            span = self.epochs * self.steps_per_epoch - warmup
            if warmup:
                return schedules.CosineDecay(0.0, span, warmup_target=peak, warmup_steps=warmup)
            return schedules.CosineDecay(peak, span)
        if len(self.rates) == 1:
            rate = peak
        else:
            # optimizer.iterations counts finished steps, and PiecewiseConstantDecay switches once
            # step > boundary: so the first step of epoch E (step E * steps_per_epoch) gets the new rate.
            rate = schedules.PiecewiseConstantDecay(
                boundaries=[epoch * self.steps_per_epoch - 1 for epoch, _ in self.rates[1:]],
                values=[lr for _, lr in self.rates])
        return _linear_warmup_class()(rate, warmup, peak) if warmup else rate


@functools.cache
def _linear_warmup_class():
    import keras
    from keras import ops

    class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
        """peak * step / warmup_steps for the first warmup_steps steps, then `after` (Goyal et al. 2017)."""

        def __init__(self, after, warmup_steps, peak):
            self.after, self.warmup_steps, self.peak = after, warmup_steps, peak

        def __call__(self, step):
            step = ops.cast(step, "float32")
            after = self.after(step) if callable(self.after) else self.after
            return ops.where(step < self.warmup_steps, self.peak * step / self.warmup_steps, after)

        def get_config(self):
            return {"after": self.after, "warmup_steps": self.warmup_steps, "peak": self.peak}

    return LinearWarmup


def with_options(model, config):
    """`model` with the training-only layers today's options add after its pad-and-crop ("random_crop"):
    Cutout, then mixup's or CutMix's BatchMix (the papers mix augmented images). The same layers and
    weights otherwise (Keras's clone_model, each layer reused); `model` itself without these options."""
    import keras

    from .augmentation import cutout
    from .mixing import batch_mix
    extra = []
    if config.cutout:
        extra.append(cutout(config.cutout, name="cutout"))
    if config.mixup:
        extra.append(batch_mix("mixup", config.mixup, 1.0, name="batch_mix"))
    if config.cutmix:
        extra.append(batch_mix("cutmix", config.cutmix, CUTMIX_PROBABILITY, name="batch_mix"))
    if not extra:
        return model

    def call_function(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer.name == "random_crop":
            for added in extra:
                outputs = added(outputs)
        return outputs
    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call_function)


def compile_model(model, lr_schedule, steps_per_epoch, steps_per_execution, jit_compile="auto", plain=False,
                  options=None):
    """The recipe's optimizer (SGD, Nesterov momentum, the step schedule), loss and metric, compiled with
    XLA where it runs the step (speedups.resolve_jit_compile) and `steps_per_execution` steps per call; with
    plain=True (--plain-keras) without the speed patches of speedups.py. `options` (the RunConfig) adds
    today's options: the cosine schedule and warm-up, label smoothing and mixing (mixing.recipe_loss), the
    weights' moving average (--ema, Keras's optimizer EMA)."""
    import keras

    from .mixing import recipe_loss
    from .speedups import (build_before_first_step, cache_saving_skipsets, fuse_steps, fused_momentum_update,
                           release_activations, resolve_jit_compile)
    from .workarounds import keep_weights_after_fit
    if options is None:
        schedule, loss, ema = Schedule(lr_schedule, steps_per_epoch), "sparse_categorical_crossentropy", None
    else:
        schedule = Schedule(lr_schedule, steps_per_epoch, options.lr_decay, options.warmup_epochs, options.epochs)
        loss, ema = recipe_loss(model, model.output_shape[-1], options.label_smoothing), options.ema
    optimizer = keras.optimizers.SGD(schedule.keras_schedule(), momentum=MOMENTUM, nesterov=NESTEROV,
                                     **({"use_ema": True, "ema_momentum": ema} if ema else {}))
    if ema:
        keep_weights_after_fit(optimizer)
    if not plain:
        fused_momentum_update(optimizer)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"],
                  jit_compile=resolve_jit_compile(model, jit_compile), steps_per_execution=steps_per_execution)
    if not plain:
        fuse_steps(model)
        release_activations(model)
        build_before_first_step(model)
        cache_saving_skipsets()  # here, not at the start: it creates variables, which would fix TensorFlow's
        # context before MultiWorkerMirroredStrategy configures its collectives


def image_input():
    """The network's input and its weightless preprocessing, both inside the saved model, so a saved
    .h5 takes raw 0-255 pixels (uint8 or float) and needs nothing else:
    per-channel standardization, then in training only a random horizontal flip and a random crop of the
    image padded with PADDING zeros per side (0 is the mean pixel after standardization), both per image."""
    import keras

    from .augmentation import pad_and_crop
    inputs = keras.Input(shape=(32, 32, 3), name="image")
    x = keras.layers.Rescaling(scale=[1 / s for s in PIXEL_STD],
                               offset=[-m / s for m, s in zip(PIXEL_MEAN, PIXEL_STD)], name="standardize")(inputs)
    x = keras.layers.RandomFlip("horizontal", name="random_flip")(x)
    x = pad_and_crop(PADDING, name="random_crop")(x)
    return inputs, x

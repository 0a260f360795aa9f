"""The training recipe: its constants (each with its source), the step learning-rate schedule, the optimizer,
and the preprocessing and augmentation layers that open every network.

Change "the recipe", "the schedule" or "the augmentation" here. Import-safe: Keras is imported inside the
functions that build something.
"""
import math

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


def format_lr_schedule(schedule):
    return ",".join(f"{epoch}:{lr:g}" for epoch, lr in schedule)


# What an unset --epochs / --weight-decay / --lr-schedule means, unless a family's recipe says otherwise.
DEFAULTS = {"epochs": EPOCHS, "weight_decay": WEIGHT_DECAY, "lr_schedule": parse_lr_schedule(LR_SCHEDULE)}


def lr_at_epoch(schedule, epoch):
    return [lr for start, lr in schedule if start <= epoch][-1]


def compile_model(model, lr_schedule, steps_per_epoch, steps_per_execution, jit_compile="auto", plain=False):
    """The recipe's optimizer (SGD, Nesterov momentum, the step schedule), loss and metric, compiled with
    XLA where it runs the step (speedups.resolve_jit_compile) and `steps_per_execution` steps per call; with
    plain=True (--plain-keras) without the speed patches of speedups.py."""
    import keras

    from .speedups import (build_before_first_step, cache_saving_skipsets, fuse_steps, fused_momentum_update,
                           release_activations, resolve_jit_compile)
    if len(lr_schedule) == 1:
        learning_rate = lr_schedule[0][1]
    else:
        # optimizer.iterations counts finished steps, and PiecewiseConstantDecay switches once
        # step > boundary: so the first step of epoch E (step E * steps_per_epoch) gets the new rate.
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries=[epoch * steps_per_epoch - 1 for epoch, _ in lr_schedule[1:]],
            values=[lr for _, lr in lr_schedule])
    optimizer = keras.optimizers.SGD(learning_rate, momentum=MOMENTUM, nesterov=NESTEROV)
    if not plain:
        fused_momentum_update(optimizer)
    model.compile(optimizer=optimizer,
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
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

"""How a run with today's options evaluates: with the weights' moving average (--ema), with the predictions of each
image and its mirror averaged (--tta flip), and always with the plain cross-entropy, whatever the training loss
(label smoothing or mixing change the loss trained on, not the one reported as test_loss).

Without these options the test set is evaluated inside fit(), as the papers' recipe always was (training.fit).
Import-safe: Keras is imported inside the functions.
"""
import contextlib
import functools

TTA_CHOICES = ("flip",)


def needs_evaluator(config):
    """True when the test set cannot be evaluated with the training model's own compiled loss and weights."""
    return bool(config.ema or config.tta or config.label_smoothing or config.mixup or config.cutmix)


def describe(config):
    """What the history's `evaluation` column says, e.g. "ema0.999+tta_flip"; None for the papers' way."""
    parts = ([f"ema{config.ema:g}"] if config.ema else []) + ([f"tta_{config.tta}"] if config.tta else [])
    return "+".join(parts) or None


@functools.cache
def _mirror_class():
    import keras
    from keras import ops

    class Mirror(keras.layers.Layer):
        """Each image's horizontal mirror, in training and inference alike (never saved)."""

        def call(self, inputs):
            return ops.flip(inputs, axis=2)

    return Mirror


def evaluation_model(model, tta=None):
    """A functional model sharing every layer and weight of `model`: its predictions, or with tta="flip" the
    mean of its softmax on each image and on its mirror."""
    import keras
    inputs = keras.Input(shape=model.input_shape[1:], dtype=model.inputs[0].dtype, name="image")
    def predict(x):  # (a loaded model returns its one output in a list)
        return keras.tree.flatten(model(x))[0]
    outputs = predict(inputs)
    if tta == "flip":
        outputs = keras.layers.Average(name="tta_mean", dtype="float32")([outputs, predict(_mirror_class()()(inputs))])
    return keras.Model(inputs, outputs, name=f"{model.name}_evaluation")


def use_average(model):
    """`model`'s trainable weights replaced by the optimizer's moving average of them (Keras's own method: the
    optimizer instance's is off, workarounds.keep_weights_after_fit)."""
    import keras
    keras.optimizers.Optimizer.finalize_variable_values(model.optimizer, model.trainable_variables)
    for variable in model.trainable_variables:  # each its own copy: on JAX the assignment shares the average's
        variable.assign(variable.numpy())  # buffer, which the next step's donated state would delete


@contextlib.contextmanager
def averaged_weights(model):
    """Within: `model`'s trainable weights are the optimizer's moving average of them (Keras's EMA); the trained
    weights are put back on the way out. BatchNormalization's moving statistics are the trained model's (Keras
    averages trainable weights only)."""
    trained = [variable.numpy() for variable in model.trainable_variables]
    use_average(model)
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, trained):
            variable.assign(value)


def compile_for_evaluation(evaluating, trained, plain=False):
    """`evaluating` (the trained model itself, or an evaluation_model of it) compiled to score with the plain
    cross-entropy and accuracy, with XLA as `trained` trains (speedups.resolve_jit_compile), built before its
    first step unless plain=True (--plain-keras)."""
    from .speedups import build_before_first_step, resolve_jit_compile
    evaluating.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                       jit_compile=resolve_jit_compile(trained))
    if not plain:
        build_before_first_step(evaluating)
    return evaluating


class Evaluator:
    """Evaluates the trained `model` the way the options say (see the module's docstring)."""

    def __init__(self, model, config):
        self.model, self.ema = model, bool(config.ema)
        self.evaluating = compile_for_evaluation(evaluation_model(model, config.tta), model, config.plain_keras)

    def evaluate(self, batches, callbacks=()):
        """{"loss", "accuracy"} on `batches` (speedups.Batches)."""
        with averaged_weights(self.model) if self.ema else contextlib.nullcontext():
            return self.evaluating.evaluate(batches.x, batches.y, batch_size=batches.batch_size, verbose=0,
                                            return_dict=True, callbacks=list(callbacks))

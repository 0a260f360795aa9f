"""How a network is built: convolution and BatchNormalization style, the residual unit, the stages, the head.

One builder, `residual_unit`, makes every residual unit of the project from the order of its layers
(`Unit("bn relu conv3 bn relu conv3")` is He et al. 2016's full pre-activation); `stack` builds the stages
from a table of (filters, units, stride[, width]) rows, so a family is a unit and a table (Keras
applications/resnet.py `stack_fn`, kuangliu's `ResNet(Bottleneck, [3, 4, 6, 3])`). Layer names are fixed
(stage2_unit1_conv1, ...) so that .h5 weights reload by name.
"""
import warnings
from dataclasses import dataclass

from .recipe import BN_EPSILON, BN_MOMENTUM, WEIGHT_DECAY
from .workarounds import without_tensorflow
from .speedups import batch_normalization_class


@dataclass(frozen=True)
class Style:
    """How a family makes its convolutions and batch normalizations (docs/architectures.md: "Unless a family says
    otherwise"): padding same, he_normal, L2 on kernels, biases on, BN momentum 0.9 / epsilon 1e-5."""
    weight_decay: float = WEIGHT_DECAY
    use_bias: bool = True
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    def conv(self, filters, kernel_size, strides=1, groups=1, name=None):
        import keras
        return keras.layers.Conv2D(
            filters, kernel_size, strides=strides, groups=groups, padding="same", use_bias=self.use_bias,
            kernel_initializer="he_normal", kernel_regularizer=self.regularizer(), name=name)

    def bn(self, name=None):
        return batch_normalization_class()(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name)

    def regularizer(self):
        import keras
        return keras.regularizers.L2(self.weight_decay) if self.weight_decay else None

    def dense(self, classes, regularize=True):
        import keras
        # float32 softmax whatever the compute precision: the loss stays accurate under mixed precision
        return keras.layers.Dense(classes, activation="softmax", kernel_initializer="he_normal",
                                  kernel_regularizer=self.regularizer() if regularize else None,
                                  dtype="float32", name="predictions")


@dataclass(frozen=True)
class Unit:
    """A residual unit written as the order of its layers (He et al. 2016, Fig. 4).

    residual:   the branch F, e.g. "bn relu conv3 bn relu conv3"; convK is a KxK convolution; the first
                convolution carries the unit's stride; all but the last have `width` outputs.
    after_add:  layers after the addition, e.g. "relu" (original) or "bn relu" (BN after addition).
    projection: where a projection shortcut (1x1, strided) reads from when the shape changes:
                "input" (the raw unit input x) or "activated" (x after the branch's leading bn/relu).
    projection_bn: a BN after the projection convolution.
    """
    residual: str
    after_add: str = ""
    projection: str = "input"
    projection_bn: bool = False

    def without_preactivation(self):
        """The same unit minus the layers before its first convolution (a network's very first unit)."""
        tokens = self.residual.split()
        first_conv = next(i for i, t in enumerate(tokens) if t.startswith("conv"))
        return Unit(" ".join(tokens[first_conv:]), self.after_add, "input", self.projection_bn)


def _apply(token, x, name, style):
    import keras
    if token == "bn":
        return style.bn(name=name)(x)
    if token == "relu":
        return keras.layers.Activation("relu", name=name)(x)
    raise ValueError(f"unknown layer {token!r}")


def residual_unit(x, filters, strides, unit, name, style=Style(), width=None, groups=1, shortcut=True):
    """One residual unit; layer names are fixed (<name>_conv1, <name>_bn1, ...) so weights reload by name.

    filters: output channels; width: channels of the inner convolutions (default: filters);
    groups: groups of the 3x3 convolutions (ResNeXt); shortcut=False gives the plain twin."""
    import keras
    tokens = unit.residual.split()
    n_convs = sum(t.startswith("conv") for t in tokens)
    counts = {"conv": 0, "bn": 0, "relu": 0}
    y = activated = x
    for token in tokens:
        kind = "conv" if token.startswith("conv") else token
        counts[kind] += 1
        layer_name = f"{name}_{kind}{counts[kind]}"
        if kind == "conv":
            kernel = int(token[len("conv"):])
            last = counts["conv"] == n_convs
            y = style.conv(filters if last else (width or filters), kernel,
                           strides=strides if counts["conv"] == 1 else 1,
                           groups=groups if kernel > 1 else 1, name=layer_name)(y)
        else:
            y = _apply(token, y, layer_name, style)
            if counts["conv"] == 0:
                activated = y
    if shortcut:
        skip = x
        if strides != 1 or x.shape[-1] != filters:
            source = activated if unit.projection == "activated" else x
            skip = style.conv(filters, 1, strides=strides, name=f"{name}_projection")(source)
            if unit.projection_bn:
                skip = style.bn(name=f"{name}_projection_bn")(skip)
        y = keras.layers.Add(name=f"{name}_add")([y, skip])
    for i, token in enumerate(unit.after_add.split(), start=1):
        y = _apply(token, y, f"{name}_post{i}_{token}", style)
    return y


# The residual units of He et al. 2016, Fig. 4 (a-e), and the "v2" forms of d and e whose projection
# reads the raw input. For a, b, c the projection always reads the raw input.
UNITS = {
    "a": Unit("conv3 bn relu conv3 bn", after_add="relu"),  # original
    "b": Unit("conv3 bn relu conv3", after_add="bn relu"),  # BN after addition
    "c": Unit("conv3 bn relu conv3 bn relu"),  # ReLU before addition
    "d": Unit("relu conv3 bn relu conv3 bn", projection="activated"),  # ReLU-only pre-activation
    "e": Unit("bn relu conv3 bn relu conv3", projection="activated"),  # full pre-activation
    "d-v2": Unit("relu conv3 bn relu conv3 bn", projection="input"),
    "e-v2": Unit("bn relu conv3 bn relu conv3", projection="input"),
}


def stack(x, stages, unit_fn):
    """Stages from a table of (filters, units, stride) or (filters, units, stride, width): the stride
    applies to each stage's first unit; unit_fn(x, filters, strides, name[, width]) builds one unit."""
    for s, (filters, units, stride, *width) in enumerate(stages, start=1):
        extra = {"width": width[0]} if width else {}
        for u in range(1, units + 1):
            x = unit_fn(x, filters, stride if u == 1 else 1, name=f"stage{s}_unit{u}", **extra)
    return x


def bn_relu_gap_head(x, classes, style=Style()):
    """The CIFAR head (docs/architectures.md): BN -> ReLU -> GlobalAveragePooling -> Dense(softmax)."""
    import keras
    x = style.bn(name="head_bn")(x)
    x = keras.layers.Activation("relu", name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    return style.dense(classes)(x)


def model_from(inputs, outputs, name):
    import keras
    return keras.Model(inputs, outputs, name=name)


def with_layers(model, replace):
    """`model` with each layer for which replace(layer) returns a layer replaced by it (same name, the weights
    copied unless it has none), the rest cloned as they are; `model` itself when replace returns None for all."""
    import keras
    replacements = {layer.name: replace(layer) for layer in model.layers}
    if all(new is None for new in replacements.values()):
        return model

    def clone(layer):
        return replacements[layer.name] or layer.__class__.from_config(layer.get_config())
    # Cloning serializes every layer's configuration (without_tensorflow), and clone_model compiles the copy
    # with the model's own compile configuration: a copy holding a RandomTranslation (a model file's, kept) cannot
    # take JAX's jit_compile=True, which Keras says in a warning; speedups.resolve_jit_compile decides for it.
    with without_tensorflow(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Model doesn't support `jit_compile=True`")
        copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if copy.get_layer(layer.name).weights:  # a weightless replacement (an identity) takes none
            copy.get_layer(layer.name).set_weights(layer.get_weights())
    return copy


def batch_normalization_as(cls):
    """A `replace` for with_layers: a BatchNormalization layer of another class -> one of class `cls`."""
    import keras

    def replace(layer):
        if isinstance(layer, keras.layers.BatchNormalization) and type(layer) is not cls:
            return cls.from_config(layer.get_config())
        return None
    return replace


def with_batch_normalization(model, cls):
    """`model` with every BatchNormalization layer of class `cls`, same names and weights."""
    return with_layers(model, batch_normalization_as(cls))

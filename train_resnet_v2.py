"""Train ResNet v1 (depth 6n+2) or v2 (depth 9n+2): the Keras CIFAR-10 example's layout, or with
--layout paper the pre-activation paper's own ResNet-164 and ResNet-1001.

Papers: K. He et al., "Deep Residual Learning for Image Recognition" (v1, arXiv:1512.03385) and
"Identity Mappings in Deep Residual Networks" (v2, arXiv:1603.05027, Table 4); layouts of the Keras example
"Trains a ResNet on the CIFAR10 dataset" (keras-team/keras examples/cifar10_resnet.py) and of the paper's
code (KaimingHe/resnet-1k-layers, resnet-pre-act.lua).

    python train_resnet_v2.py                                  # Keras example v2 ResNet-110, 3,323,210 parameters
    python train_resnet_v2.py --version 1 --depth 20           # Keras example v1 ResNet-20, 274,442 parameters
    python train_resnet_v2.py --layout paper --depth 164       # He et al. 2016 ResNet-164, 1,740,042 parameters
    python train_resnet_v2.py --layout paper --depth 1001      # He et al. 2016 ResNet-1001, 10,551,978 parameters

--layout keras (default), the Keras example's networks:
v1: a conv-BN-ReLU stem with 16 filters, three stages of n basic units (conv-BN-ReLU, conv-BN, add,
ReLU; a bare 1x1 strided projection when downsampling), AveragePooling2D(8), Flatten, softmax.
v2: the same stem, three stages of n pre-activation bottlenecks (BN-ReLU-conv1x1, BN-ReLU-conv3x3,
BN-ReLU-conv1x1 to 4x the width in stage 1 and 2x after; the network's first unit skips its first BN-ReLU;
a bare 1x1 projection opens every stage), BN-ReLU, AveragePooling2D(8), Flatten, softmax. Its bottlenecks
are as wide as each stage's input (16, 64, 128), so its "ResNet-164" (4,972,682 parameters) is not the
paper's. BatchNormalization keeps Keras's defaults and weight decay applies to convolutions only, as in the
example. Published (the Keras example, 200 epochs, CIFAR-10; not measured here): v1 ResNet-20 92.16 %, -32 92.46 %, -44 92.50 %,
-56 92.71 %, -110 92.65 %; v2 ResNet-56 93.01 %, -110 93.15 %.

--layout paper (v2 only), He et al. 2016's CIFAR network: a 3x3 stem to 16 channels; three stages of n
pre-activation bottlenecks BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 with bottleneck widths 16, 32, 64
and outputs 4x that (64, 128, 256); each stage's first unit has a 1x1 projection reading the unit's
activated input, stride 2 in stages 2 and 3; BN-ReLU, global average pooling, softmax. This project's
conventions: biased convolutions (without biases the trainable counts are 1,703,258 and 10,327,706, the
paper's "1.7 M" and "10.2 M"), BN momentum 0.9 / epsilon 1e-5, weight decay on every kernel. Published (He
et al. 2016, median of 5 runs; not measured here): ResNet-164 94.54 %, ResNet-1001 95.08 % on CIFAR-10; 75.67 %, 77.29 % on CIFAR-100.
"""
from functools import partial

import common
from resnet_cifar import recipe
from resnet_cifar.errors import UsageError
from resnet_cifar.families import Family
from resnet_cifar.units import Style, Unit, bn_relu_gap_head, model_from, residual_unit, stack

STEM_FILTERS = 16
POOL_SIZE = 8  # 8x8 feature maps after two halvings
KERAS_BN = {"bn_momentum": 0.99, "bn_epsilon": 1e-3}  # the example keeps BatchNormalization's defaults
VERSIONS = {1: (6, (20, 32, 44, 56, 110)), 2: (9, (56, 110, 164, 1001))}  # depth = k*n + 2; usual depths
PAPER_DEPTHS = (164, 1001)  # He et al. 2016, Table 4: n = 18 and 111
PAPER_WIDTHS = (16, 32, 64)  # bottleneck widths; each unit outputs EXPANSION * width
EXPANSION = 4
# He et al. 2016's unit: full pre-activation bottleneck, the projection reading the first BN-ReLU's output
PAPER_UNIT = Unit("bn relu conv1 bn relu conv3 bn relu conv1", projection="activated")


def resnet_layer(kernel_size=3, activation=True, batch_normalization=True, conv_first=True):
    """The example's conv-BN-activation helper, written as the layer order our unit builder takes:
    conv_first=True gives conv-BN-ReLU (v1), False gives BN-ReLU-conv (v2)."""
    conv = [f"conv{kernel_size}"]
    bn_act = ["bn"] * batch_normalization + ["relu"] * activation
    return " ".join(conv + bn_act if conv_first else bn_act + conv)


UNIT_V1 = Unit(f"{resnet_layer()} {resnet_layer(activation=False)}", after_add="relu")
UNIT_V2 = Unit(" ".join(resnet_layer(k, conv_first=False) for k in (1, 3, 1)))


def stages(version, n, layout="keras"):
    """(filters, units, stride[, width]) per stage."""
    if layout == "paper":
        return [(EXPANSION * width, n, 1 if s == 0 else 2, width) for s, width in enumerate(PAPER_WIDTHS)]
    if version == 1:
        return [(16, n, 1), (32, n, 2), (64, n, 2)]
    return [(64, n, 1, 16), (128, n, 2, 64), (256, n, 2, 128)]  # outputs 4x then 2x the stage's input


def v2_unit(x, filters, strides, name, width, style):
    unit = UNIT_V2.without_preactivation() if name == "stage1_unit1" else UNIT_V2
    return residual_unit(x, filters, strides, unit, name, style, width=width)


def resnet_v1_v2(version, depth, classes=10, style=Style(**KERAS_BN)):
    import keras
    per_unit, _ = VERSIONS[version]
    inputs, x = recipe.image_input()
    x = style.conv(STEM_FILTERS, 3, name="stem_conv")(x)
    x = style.bn(name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    unit_fn = partial(residual_unit, unit=UNIT_V1, style=style) if version == 1 else partial(v2_unit, style=style)
    x = stack(x, stages(version, (depth - 2) // per_unit), unit_fn)
    if version == 2:
        x = style.bn(name="head_bn")(x)
        x = keras.layers.Activation("relu", name="head_relu")(x)
    x = keras.layers.AveragePooling2D(POOL_SIZE, name="head_pool")(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    outputs = style.dense(classes, regularize=False)(x)
    return model_from(inputs, outputs, f"resnet{depth}_v{version}")


def preact_resnet(depth, classes=10, style=Style()):
    """He et al. 2016's pre-activation ResNet-164/1001 (depth 9n+2)."""
    inputs, x = recipe.image_input()
    x = style.conv(STEM_FILTERS, 3, name="stem_conv")(x)
    x = stack(x, stages(2, (depth - 2) // VERSIONS[2][0], "paper"),
              partial(residual_unit, unit=PAPER_UNIT, style=style))
    return model_from(inputs, bn_relu_gap_head(x, classes, style), f"resnet{depth}_v2_paper")


def add_arguments(parser):
    parser.add_argument("--version", type=int, choices=sorted(VERSIONS), default=2,
                        help="1: basic units, depth 6n+2; 2: pre-activation bottlenecks, depth 9n+2")
    parser.add_argument("--depth", type=int, default=110, help="v1: 6n+2 (20, 32, 44, 56, 110); "
                                                               "v2: 9n+2 (56, 110, 164, 1001)")
    parser.add_argument("--layout", choices=("keras", "paper"), default="keras",
                        help="keras: the Keras example's networks; paper: He et al. 2016's ResNet-164/1001 "
                             "(v2, bottleneck widths 16/32/64, outputs 4x; 1,740,042 parameters for 164)")


def resolve(args):
    """Refuses a depth the version and layout cannot build; nothing to resolve."""
    per_unit, examples = VERSIONS[args.version]
    if args.layout == "paper":
        if args.version != 2:
            raise UsageError("--layout paper is the pre-activation (v2) network: use --version 2 "
                             f"(got --version {args.version})")
        examples = PAPER_DEPTHS
    if args.depth < per_unit + 2 or (args.depth - 2) % per_unit:
        layout = " (paper layout)" if args.layout == "paper" else ""
        raise UsageError(
            f"v{args.version}{layout} depth must be {per_unit}n+2: {', '.join(map(str, examples))}, ... "
            f"(got --depth {args.depth})")
    return {}


def run_name(config):
    return f"resnet{config.depth}_v{config.version}" + ("_paper" if config.layout == "paper" else "")


def build_model(config, classes):
    if config.layout == "paper":
        return preact_resnet(config.depth, classes, Style(weight_decay=config.weight_decay))
    return resnet_v1_v2(config.version, config.depth, classes, Style(weight_decay=config.weight_decay, **KERAS_BN))


FAMILY = Family(__doc__, add_arguments, run_name, build_model, resolve)

if __name__ == "__main__":
    common.main(FAMILY)

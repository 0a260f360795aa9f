"""Compare residual designs on CIFAR: the five units of "Identity Mappings", their plain twins, and the
wide post-activation ResNet against its plain network.

Papers: K. He, X. Zhang, S. Ren, J. Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016
(arXiv:1603.05027), Fig. 4 and Table 2; "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), §4.2 (plain vs residual); the "Building a ResNet in Keras" article (--arch wide).

    python train_resnet_variants.py --unit a               # original unit, ResNet-32 (6n+2, n=5)
    python train_resnet_variants.py --unit e --plain       # the same network with no shortcut
    python train_resnet_variants.py --arch wide            # 64-512 filters, 20 epochs
    python train_resnet_variants.py --arch wide --plain

Units (x: unit input): a conv-BN-ReLU-conv-BN, add, ReLU | b conv-BN-ReLU-conv, add, BN, ReLU |
c conv-BN-ReLU-conv-BN-ReLU, add | d ReLU-conv-BN-ReLU-conv-BN, add | e BN-ReLU-conv-BN-ReLU-conv, add.
d and e take the projection shortcut from the activated input, d-v2 and e-v2 from the raw input.
Published, ResNet-110 in the paper (CIFAR-10 test error; not measured here at that depth): a 6.61 %, b 8.17 %, c 7.84 %, d 6.71 %,
e 6.37 %. Measured here only in short CPU runs (results/units_cpu.md). The article reports the wide ResNet
beating its plain twin by 1.59 points after 20 epochs (not measured here).
"""
from functools import partial

import common
from resnet_cifar import cli, recipe
from resnet_cifar.cifar_resnet import STACK_N, depth, resnet
from resnet_cifar.families import Family
from resnet_cifar.units import UNITS, Style, Unit, model_from, residual_unit, stack

# docs/architectures.md, section 4: the "Building a ResNet in Keras" network, post-activation with ReLU *then* BN.
WIDE_STEM_FILTERS = 64
WIDE_STAGES = [(64, 2, 1), (128, 5, 2), (256, 5, 2), (512, 2, 2)]  # (filters, units, stride)
WIDE_UNIT = Unit("conv3 relu bn conv3", after_add="relu bn")
WIDE_POOL = 4  # 4x4 feature maps after three halvings
WIDE_EPOCHS = 20  # the article's comparison


def wide_resnet(classes=10, style=Style(), plain=False):
    import keras
    inputs, x = recipe.image_input()
    x = style.conv(WIDE_STEM_FILTERS, 3, name="stem_conv")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    x = style.bn(name="stem_bn")(x)
    x = stack(x, WIDE_STAGES, partial(residual_unit, unit=WIDE_UNIT, style=style, shortcut=not plain))
    x = keras.layers.AveragePooling2D(WIDE_POOL, name="head_pool")(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    return model_from(inputs, style.dense(classes)(x), "wide_plain" if plain else "wide_resnet")


def add_arguments(parser):
    parser.add_argument("--arch", choices=("cifar", "wide"), default="cifar",
                        help="cifar: the 6n+2 network of He et al.; wide: the 64-512 filter post-activation "
                             f"network (default {WIDE_EPOCHS} epochs)")
    parser.add_argument("--unit", choices=tuple(UNITS), default="e", help="residual unit (He et al. 2016, Fig. 4)")
    parser.add_argument("--plain", action="store_true", help="remove every shortcut: the plain twin")
    parser.add_argument("--stack-n", type=cli.stack_n, default=STACK_N, metavar="N",
                        help="units per stage of --arch cifar; depth = 6n+2")


def resolve(args):
    """The article's 20 epochs for --arch wide unless --epochs says otherwise."""
    return {"epochs": WIDE_EPOCHS} if args.arch == "wide" and args.epochs is None else {}


def run_name(config):
    if config.arch == "wide":
        return "wide_plain" if config.plain else "wide_resnet"
    return f"{'plain' if config.plain else 'resnet'}{depth(config.stack_n)}_{config.unit}"


def build_model(config, classes):
    style = Style(weight_decay=config.weight_decay)
    if config.arch == "wide":
        return wide_resnet(classes, style, config.plain)
    return resnet(config.stack_n, UNITS[config.unit], classes, style, config.plain, name=run_name(config))


FAMILY = Family(__doc__, add_arguments, run_name, build_model, resolve)

if __name__ == "__main__":
    common.main(FAMILY)

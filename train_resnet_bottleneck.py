"""Train the bottleneck ResNet-50/101/152 of He et al. 2015, adapted to 32x32 CIFAR images.

Paper: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), Table 1. CIFAR adaptation (as the article does): a 3x3 stem convolution to 64
channels and no pooling; four stages of bottleneck units (widths 64/128/256/512, outputs 4x that) whose
first unit has stride 2 (32 -> 16 -> 8 -> 4 -> 2), the 1x1 projection reading the raw unit input; each
unit is conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN-ReLU, then the addition (ReLU before addition).

    python train_resnet_bottleneck.py --depth 50          # 23,593,098 parameters
    python train_resnet_bottleneck.py --depth 101         # 42,663,562
    python train_resnet_bottleneck.py --depth 152         # 58,376,330: the paper's [3, 8, 36, 3]

the article's ResNet-152 code puts 4 units, not 8, in the second stage (57,246,858 parameters):
that network is not ResNet-152; this is. No CIFAR accuracy was published for these ImageNet-shaped
networks, and none has been measured here yet.
"""
from functools import partial

import common
from resnet_cifar import recipe
from resnet_cifar.families import Family
from resnet_cifar.units import Style, Unit, bn_relu_gap_head, model_from, residual_unit, stack

STEM_FILTERS = 64
WIDTHS = (64, 128, 256, 512)  # bottleneck widths; each unit outputs EXPANSION * width
EXPANSION = 4
UNITS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # He et al. 2015, Table 1
BOTTLENECK = Unit("conv1 bn relu conv3 bn relu conv1 bn relu")  # ReLU before addition (form c)


def stages(depth):
    """(filters, units, stride, width) per stage: every stage starts with stride 2 on CIFAR."""
    return [(EXPANSION * width, units, 2, width) for width, units in zip(WIDTHS, UNITS_PER_STAGE[depth])]


def bottleneck_resnet(depth, classes=10, style=Style()):
    inputs, x = recipe.image_input()
    x = style.conv(STEM_FILTERS, 3, name="stem_conv")(x)
    x = stack(x, stages(depth), partial(residual_unit, unit=BOTTLENECK, style=style))
    outputs = bn_relu_gap_head(x, classes, style)
    return model_from(inputs, outputs, f"resnet{depth}")


def add_arguments(parser):
    parser.add_argument("--depth", type=int, choices=sorted(UNITS_PER_STAGE), default=50,
                        help="units per stage: 50 = [3, 4, 6, 3], 101 = [3, 4, 23, 3], 152 = [3, 8, 36, 3]")


def run_name(config):
    return f"resnet{config.depth}"


def build_model(config, classes):
    return bottleneck_resnet(config.depth, classes, Style(weight_decay=config.weight_decay))


FAMILY = Family(__doc__, add_arguments, run_name, build_model)

if __name__ == "__main__":
    common.main(FAMILY)

"""The 6n+2 CIFAR network of He et al. 2015 (§4.2), which train_resnet32.py and train_resnet_variants.py both
train: a 3x3 stem to 16 channels, three stages of n residual units with 16, 32 and 64 filters (feature maps
32x32, 16x16, 8x8; the first unit of stages 2 and 3 halves them), BN-ReLU, global average pooling, softmax.
Any unit of He et al. 2016 Fig. 4 (units.UNITS), with or without its shortcuts (the plain twin).
"""
from functools import partial

from . import recipe
from .units import UNITS, Style, bn_relu_gap_head, model_from, residual_unit, stack

STEM_FILTERS = 16
STAGE_FILTERS = (16, 32, 64)  # He et al. 2015, §4.2
STACK_N = 5  # depth = 6n + 2 = 32


def depth(stack_n):
    return 6 * stack_n + 2


def stages(stack_n):
    """(filters, units, stride) per stage."""
    return [(filters, stack_n, 1 if i == 0 else 2) for i, filters in enumerate(STAGE_FILTERS)]


def resnet(stack_n=STACK_N, unit=UNITS["e"], classes=10, style=Style(), plain=False, name=None):
    """The 6n+2 network with `unit` in every stage (the plain twin has no shortcut)."""
    inputs, x = recipe.image_input()
    x = style.conv(STEM_FILTERS, 3, name="stem_conv")(x)
    x = stack(x, stages(stack_n), partial(residual_unit, unit=unit, style=style, shortcut=not plain))
    outputs = bn_relu_gap_head(x, classes, style)
    return model_from(inputs, outputs, name or f"resnet{depth(stack_n)}")

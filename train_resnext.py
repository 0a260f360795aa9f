"""Train ResNeXt on CIFAR: ResNeXt-29 (the paper's CIFAR network) or a ResNeXt-50 adapted to CIFAR.

Paper: S. Xie, R. Girshick, P. Dollar, Z. Tu, K. He, "Aggregated Residual Transformations for Deep
Neural Networks", CVPR 2017 (arXiv:1611.05431), §5.3 and Table 7.

    python train_resnext.py                                   # ResNeXt-29 8x64d, 34,484,170 parameters
    python train_resnext.py --cardinality 16                  # ResNeXt-29 16x64d, 68,255,690 parameters
    python train_resnext.py --depth 50                        # ResNeXt-50 32x4d on CIFAR
    python train_resnext.py --depth 50 --cardinality 4 --bottleneck-width 128   # the article's C = 4
    python train_resnext.py --impl split                      # same network, split-transform-merge form

A unit is conv1x1-BN-ReLU, a 3x3 convolution in C groups of width d, BN-ReLU, conv1x1-BN, the addition,
ReLU (post-activation, as in the paper); convolutions have no bias. ResNeXt-29: a 3x3 stem to 64 channels
(BN-ReLU), three stages of three units with outputs 256/512/1024, the group width doubling per stage,
stride 2 opening stages 2 and 3, global average pooling, softmax. ResNeXt-50 here: the same unit in the
[3, 4, 6, 3] layout of the bottleneck ResNets adapted to CIFAR (train_resnet_bottleneck.py): outputs
256-2048, every stage opening with stride 2.

Two implementations of one function, with equal parameter counts:
  --impl grouped  Conv2D(groups=C): one layer per unit, the fast form;
  --impl split    split-transform-merge (the paper's Fig. 3b): C paths, each with its own 1x1 and 3x3
                  convolutions (BN-ReLU after each) reading the whole unit input, concatenated, then the 1x1
                  transition. No Lambda or slicing layer is needed, so the saved model reloads safely.
Recipe defaults follow the paper's CIFAR training (§5.3): weight decay 5e-4, 300 epochs, learning rate
0.1 divided by 10 at epochs 150 and 225; --recipe resnet uses this project's common ResNet recipe.
Published (paper, CIFAR-10 test error; not measured here): ResNeXt-29 8x64d 3.65 %, 16x64d 3.58 %.
"""
from functools import partial

import common
from resnet_cifar import recipe
from resnet_cifar.errors import UsageError
from resnet_cifar.families import Family
from resnet_cifar.units import Style, Unit, model_from, residual_unit, stack

STEM_FILTERS = 64
UNIT = Unit("conv1 bn relu conv3 bn relu conv1 bn", after_add="relu", projection_bn=True)
LAYOUTS = {  # depth: (units per stage, first stage's output, stride opening stage 1, default (C, d))
    29: ((3, 3, 3), 256, 1, (8, 64)),  # Xie et al. 2017, §5.3
    50: ((3, 4, 6, 3), 256, 2, (32, 4)),  # Table 1's ResNeXt-50 32x4d, strided like the CIFAR ResNet-50
}
# Xie et al. 2017, §5.3: CIFAR training recipe.
RESNEXT_RECIPE = {"epochs": 300, "weight_decay": 5e-4, "lr_schedule": recipe.parse_lr_schedule("0:0.1,150:0.01,225:0.001")}


def stages(depth, cardinality, width):
    """(filters, units, stride, grouped width) per stage: outputs and group widths double per stage."""
    units, first_output, first_stride, _ = LAYOUTS[depth]
    return [(first_output * 2**s, n, first_stride if s == 0 else 2, cardinality * width * 2**s)
            for s, n in enumerate(units)]


def split_unit(x, filters, strides, name, width, cardinality, style):
    """Split-transform-merge: C paths of conv1x1 -> conv3x3 (width/C channels each), concatenated, then the
    1x1 transition; the same function as the grouped unit (copy_grouped_weights maps one onto the other)."""
    import keras
    d = width // cardinality
    paths = []
    for g in range(1, cardinality + 1):
        y = style.conv(d, 1, strides=strides, name=f"{name}_path{g}_conv1")(x)
        y = keras.layers.Activation("relu", name=f"{name}_path{g}_relu1")(style.bn(name=f"{name}_path{g}_bn1")(y))
        y = style.conv(d, 3, name=f"{name}_path{g}_conv2")(y)
        y = keras.layers.Activation("relu", name=f"{name}_path{g}_relu2")(style.bn(name=f"{name}_path{g}_bn2")(y))
        paths.append(y)
    y = keras.layers.Concatenate(name=f"{name}_concat")(paths) if cardinality > 1 else paths[0]
    y = style.bn(name=f"{name}_bn3")(style.conv(filters, 1, name=f"{name}_conv3")(y))
    skip = x
    if strides != 1 or x.shape[-1] != filters:
        skip = style.bn(name=f"{name}_projection_bn")(style.conv(filters, 1, strides, name=f"{name}_projection")(x))
    y = keras.layers.Add(name=f"{name}_add")([y, skip])
    return keras.layers.Activation("relu", name=f"{name}_post1_relu")(y)


def resnext(depth=29, cardinality=8, width=64, impl="grouped", classes=10, style=Style(use_bias=False)):
    import keras
    if impl == "grouped":
        unit_fn = partial(residual_unit, unit=UNIT, style=style, groups=cardinality)
    else:
        unit_fn = partial(split_unit, cardinality=cardinality, style=style)
    inputs, x = recipe.image_input()
    x = style.conv(STEM_FILTERS, 3, name="stem_conv")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(style.bn(name="stem_bn")(x))
    x = stack(x, stages(depth, cardinality, width), unit_fn)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    return model_from(inputs, style.dense(classes)(x), f"resnext{depth}_{cardinality}x{width}d_{impl}")


def copy_grouped_weights(grouped, split, cardinality):
    """Loads a grouped-form model's weights into the split form of the same network."""
    for layer in split.layers:
        if "_path" not in layer.name:
            if layer.weights:
                layer.set_weights(grouped.get_layer(layer.name).get_weights())
            continue
        unit, path_layer = layer.name.split("_path")
        g, kind = path_layer.split("_")
        g = int(g) - 1
        source = grouped.get_layer(f"{unit}_{kind}")
        if not source.weights:
            continue
        d = source.get_weights()[0].shape[-1] // cardinality  # kernels and BN vectors end in the channel axis
        part = slice(g * d, (g + 1) * d)
        layer.set_weights([w[..., part] for w in source.get_weights()])


def add_arguments(parser):
    parser.add_argument("--depth", type=int, choices=sorted(LAYOUTS), default=29)
    parser.add_argument("--cardinality", type=int, metavar="C", help="groups C (default: 8 for 29, 32 for 50)")
    widths = parser.add_mutually_exclusive_group()
    widths.add_argument("--width", type=int, metavar="d", help="width d of each group in the first stage "
                                                               "(default: 64 for 29, 4 for 50)")
    widths.add_argument("--bottleneck-width", type=int, metavar="W",
                        help="or the first stage's grouped width as a whole, W = C * d (the article's)")
    parser.add_argument("--impl", choices=("grouped", "split"), default="grouped",
                        help="grouped: Conv2D(groups=C); split: C explicit paths, concatenated")
    parser.add_argument("--recipe", choices=("resnext", "resnet"), default="resnext",
                        help="defaults of --epochs/--weight-decay/--lr-schedule: resnext: Xie et al. 2017 "
                             "(300 epochs, wd 5e-4, 0.1 / 10 at 150 and 225); resnet: the common recipe")


def resolve(args):
    """C and d from the flags or the depth's defaults; the paper's recipe unless --recipe resnet."""
    default_c, default_d = LAYOUTS[args.depth][3]
    cardinality = default_c if args.cardinality is None else args.cardinality
    if cardinality < 1:
        raise UsageError(f"--cardinality must be at least 1 (got {cardinality})")
    width = default_d if args.width is None else args.width
    if args.bottleneck_width is not None:
        if args.bottleneck_width < 1 or args.bottleneck_width % cardinality:
            divisors = [c for c in range(1, args.bottleneck_width + 1) if args.bottleneck_width % c == 0]
            raise UsageError(
                f"--cardinality {cardinality} does not divide --bottleneck-width {args.bottleneck_width} "
                f"into equal groups (choose C from {', '.join(map(str, divisors)) or 'none'})")
        width = args.bottleneck_width // cardinality
    if width < 1:
        raise UsageError(f"--width must be at least 1 (got {width})")
    resolved = {"cardinality": cardinality, "width": width}
    if args.recipe == "resnext":
        resolved.update({key: value for key, value in RESNEXT_RECIPE.items() if getattr(args, key) is None})
    return resolved


def run_name(config):
    recipe_tag = "" if config.recipe == "resnext" else f"_{config.recipe}recipe"
    return f"resnext{config.depth}_{config.cardinality}x{config.width}d_{config.impl}{recipe_tag}"


def build_model(config, classes):
    return resnext(config.depth, config.cardinality, config.width, config.impl, classes,
                   Style(weight_decay=config.weight_decay, use_bias=False))


FAMILY = Family(__doc__, add_arguments, run_name, build_model, resolve)

if __name__ == "__main__":
    common.main(FAMILY)

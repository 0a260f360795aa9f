"""Every network of docs/architectures.md against its exact parameter counts."""
import numpy as np
import pytest

from resnet_cifar import outputs
import train_resnet32
import train_resnet_bottleneck
import train_resnet_v2
import train_resnet_variants
import train_resnext
from conftest import build, parse, run_script

# (script module, arguments, total, trainable, non-trainable): docs/architectures.md's tables, CIFAR-10 unless noted.
MODEL_LIST = [
    (train_resnet32, [], 470_218, 467_946, 2_272),
    (train_resnet32, ["--model", "resnet34"], 416_458, 414_186, 2_272),
    (train_resnet32, ["--stack-n", "3"], 274_442, 273_066, 1_376),
    (train_resnet32, ["--stack-n", "9"], 861_770, 857_706, 4_064),
    (train_resnet32, ["--dataset", "cifar100"], 476_068, 473_796, 2_272),
    *[(train_resnet_variants, ["--unit", u], 470_410, 468_042, 2_368) for u in ("a", "b", "c", "d", "d-v2")],
    *[(train_resnet_variants, ["--unit", u], 470_218, 467_946, 2_272) for u in ("e", "e-v2")],
    (train_resnet_variants, ["--unit", "e", "--plain"], 467_562, 465_290, 2_272),
    # section 4 gives "about 15.6 M (plain: about 15.4 M)"; these are our builds' exact figures
    (train_resnet_variants, ["--arch", "wide"], 15_619_978, 15_607_562, 12_416),
    (train_resnet_variants, ["--arch", "wide", "--plain"], 15_447_050, 15_434_634, 12_416),
    (train_resnet_bottleneck, ["--depth", "50"], 23_593_098, 23_543_690, 49_408),
    (train_resnet_bottleneck, ["--depth", "101"], 42_663_562, 42_561_930, 101_632),
    (train_resnet_bottleneck, ["--depth", "152"], 58_376_330, 58_228_618, 147_712),
    (train_resnet_v2, ["--version", "1", "--depth", "20"], 274_442, 273_066, 1_376),
    (train_resnet_v2, ["--version", "1", "--depth", "32"], 470_218, 467_946, 2_272),
    (train_resnet_v2, ["--version", "1", "--depth", "44"], 665_994, 662_826, 3_168),
    (train_resnet_v2, ["--version", "1", "--depth", "56"], 861_770, 857_706, 4_064),
    (train_resnet_v2, ["--version", "1", "--depth", "110"], 1_742_762, 1_734_666, 8_096),
    (train_resnet_v2, ["--version", "2", "--depth", "56"], 1_673_738, 1_663_338, 10_400),
    (train_resnet_v2, ["--version", "2", "--depth", "110"], 3_323_210, 3_302_442, 20_768),
    (train_resnet_v2, ["--version", "2", "--depth", "164"], 4_972_682, 4_941_546, 31_136),
    # section 3b: the pre-activation paper's own networks (ResNet-1001 is built in its own test below)
    (train_resnet_v2, ["--layout", "paper", "--depth", "164"], 1_740_042, 1_715_818, 24_224),
    # docs/architectures.md §5: "an independent build of the grouped form with bias-free convolutions gave ..."
    (train_resnext, ["--cardinality", "8", "--width", "64"], 34_484_170, None, None),
    (train_resnext, ["--cardinality", "16", "--width", "64"], 68_255_690, None, None),
]


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("module, argv, total, trainable, non_trainable", MODEL_LIST,
                         ids=[f"{m.__name__}{''.join(a)}" for m, a, *_ in MODEL_LIST])
def test_parameter_counts(module, argv, total, trainable, non_trainable):
    model = build(module, argv)
    assert model.count_params() == total
    if trainable is not None:
        assert trainable_count(model) == trainable
        assert model.count_params() - trainable_count(model) == non_trainable
    assert model.output_shape == (None, 100 if "cifar100" in argv else 10)


def test_resnext_within_one_percent_of_the_paper():
    for cardinality, paper in ((8, 34.4e6), (16, 68.1e6)):
        count = build(train_resnext, ["--cardinality", str(cardinality)]).count_params()
        assert abs(count - paper) / paper < 0.01


def test_summary_flag_prints_keras_table():
    """--summary through the command line, once (every family's count is checked in-process above)."""
    result = run_script("train_resnet32.py", "--summary")
    assert result.returncode == 0, result.stderr
    assert "Total params: 470,218" in result.stdout


def random_images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3)).astype("float32")


def randomize_batchnorm(model, seed=1):
    """BN statistics away from their initial values, so that equal outputs mean something."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "bn" in layer.name:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])


def test_spelled_out_and_compact_resnet32_are_one_network():
    compact = train_resnet32.resnet(5)
    spelled = train_resnet32.resnet32_spelled_out()
    assert [(l.name, type(l)) for l in compact.layers] == [(l.name, type(l)) for l in spelled.layers]
    assert [w.shape for w in compact.weights] == [w.shape for w in spelled.weights]
    randomize_batchnorm(compact)
    spelled.set_weights(compact.get_weights())
    x = random_images()
    np.testing.assert_allclose(compact.predict(x, verbose=0), spelled.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unit", ["d", "e"])
def test_v2_projection_reads_raw_input(unit):
    activated = build(train_resnet_variants, ["--unit", unit, "--stack-n", "1"])
    raw = build(train_resnet_variants, ["--unit", f"{unit}-v2", "--stack-n", "1"])
    assert activated.count_params() == raw.count_params()
    randomize_batchnorm(activated)
    raw.set_weights(activated.get_weights())
    x = random_images()
    difference = np.abs(activated.predict(x, verbose=0) - raw.predict(x, verbose=0)).max()
    assert difference > 1e-4
    # the difference is the projection's source and nothing else
    projection = "stage2_unit1_projection"
    assert activated.get_layer(projection).input.name != raw.get_layer(projection).input.name


@pytest.mark.slow
def test_resnext_split_and_grouped_are_one_function():
    # in float64, so that the check measures the two forms and not float32 summation order (in float32 the
    # outputs once differed by 1.3e-4 relative after 29 layers of randomized BatchNorm)
    import keras
    keras.mixed_precision.set_global_policy("float64")
    try:
        grouped = train_resnext.resnext(29, cardinality=4, width=4, impl="grouped")
        split = train_resnext.resnext(29, cardinality=4, width=4, impl="split")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert grouped.count_params() == split.count_params()
    randomize_batchnorm(grouped)
    train_resnext.copy_grouped_weights(grouped, split, cardinality=4)
    x = random_images()
    np.testing.assert_allclose(grouped.predict(x, verbose=0), split.predict(x, verbose=0), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_resnext_split_and_grouped_parameter_counts_match_at_full_size():
    for depth, c, d in ((29, 8, 64), (50, 4, 32)):
        assert (train_resnext.resnext(depth, c, d, "grouped").count_params()
                == train_resnext.resnext(depth, c, d, "split").count_params())


@pytest.mark.parametrize("extension", [".h5", ".keras"])
def test_resnext_split_form_saves_and_reloads_safely(tmp_path, extension):
    import keras
    split = train_resnext.resnext(29, cardinality=2, width=2, impl="split")
    randomize_batchnorm(split)
    path = str(tmp_path / f"split{extension}")
    outputs.atomic_write(path, split.save)
    reloaded = keras.models.load_model(path, compile=False, safe_mode=True)
    x = random_images()
    np.testing.assert_array_equal(split.predict(x, verbose=0), reloaded.predict(x, verbose=0))
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in reloaded.layers)


@pytest.fixture
def deep_recursion():
    """What devices.configure_backend sets (workarounds.RECURSION_LIMIT) for every script: Keras walks a 3,000-layer graph recursively."""
    import sys

    from resnet_cifar import workarounds
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, workarounds.RECURSION_LIMIT))
    yield
    sys.setrecursionlimit(before)


@pytest.mark.slow  # minutes: Keras walks 3,000 layers to save and to load
def test_paper_resnet1001_builds_counts_saves_and_reloads(tmp_path, deep_recursion):
    """Over 3,000 layers: built, counted, saved (.h5 and .keras) and reloaded once each, in one test."""
    import keras

    from resnet_cifar import checkpoints
    model = build(train_resnet_v2, ["--layout", "paper", "--depth", "1001"])
    assert len(model.layers) > 3000
    assert (model.count_params(), trainable_count(model)) == (10_551_978, 10_402_762)
    assert model.count_params() - trainable_count(model) == 149_216
    paths = [str(tmp_path / f"resnet1001{extension}") for extension in (".h5", ".keras")]
    checkpoints.save_model(model, *paths)  # one conversion to Keras's own classes, both files
    for path in paths:  # the same layers and weights (predicting would trace all 3,000 layers: minutes)
        reloaded = keras.models.load_model(path, compile=False)
        assert reloaded.count_params() == 10_551_978
        assert [layer.name for layer in reloaded.layers] == [layer.name for layer in model.layers]
        for a, b in zip(reloaded.weights, model.weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_names_keep_the_layouts_apart():
    assert train_resnet_v2.run_name(parse(train_resnet_v2, ["--layout", "paper", "--depth", "164"])) == \
        "resnet164_v2_paper"
    assert train_resnet_v2.run_name(parse(train_resnet_v2, ["--depth", "164"])) == "resnet164_v2"


def test_paper_layout_units():
    """He et al. 2016's unit: bottleneck widths 16/32/64, outputs 4x, each stage's projection reading the
    unit's first BN-ReLU, stride 2 on the first 1x1 convolution of stages 2 and 3."""
    model = build(train_resnet_v2, ["--layout", "paper", "--depth", "20"])
    for stage, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        unit = f"stage{stage}_unit1"
        conv1, conv3 = model.get_layer(f"{unit}_conv1"), model.get_layer(f"{unit}_conv3")
        assert conv1.filters == width and conv1.kernel_size == (1, 1) and conv1.strides == (stride, stride)
        assert model.get_layer(f"{unit}_conv2").kernel_size == (3, 3) and conv3.filters == 4 * width
        projection = model.get_layer(f"{unit}_projection")
        assert projection.strides == (stride, stride) and projection.filters == 4 * width
        assert projection.input.name == model.get_layer(f"{unit}_relu1").output.name
    assert model.get_layer("head_pool").__class__.__name__ == "GlobalAveragePooling2D"

"""What docs/ and the README say, checked: every experiment file parses and each of its rows passes its script's
own parser; the ResNeXt recipe and the Keras example's settings (docs/recipe.md); --lr-scale, --precision auto,
--runs-per-gpu and compare.py's seed groups."""
import glob
import os

import pytest

import reproduce
from resnet_cifar import statistics, sweep_jobs
import train_resnet32
import train_resnet_v2
import train_resnext
from conftest import ROOT, build, parse

EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.toml")))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[os.path.basename(p) for p in EXPERIMENTS])
def test_every_experiment_file_parses_and_its_rows_pass_their_scripts_parser(path, tmp_path):
    experiment = reproduce.load_experiment(path)
    runs = [reproduce.Run(row, seed, [], str(tmp_path)) for seed in experiment["seeds"] for row in experiment["rows"]]
    assert len({run.name for run in runs}) == len(runs)  # every row and seed its own run
    for row in experiment["rows"]:  # each published figure says which statistic it is
        assert row["published"] is None or row["published"]["statistic"] in statistics.STATISTICS


def test_the_experiment_files_are_the_six_the_docs_list():
    with open(os.path.join(ROOT, "docs", "reproduce.md")) as f:
        docs = f.read()
    assert len(EXPERIMENTS) == 6 and all(f"`{os.path.basename(p)}`" in docs for p in EXPERIMENTS)


@pytest.mark.parametrize("argv, epochs, decay, schedule", [
    ([], 300, 5e-4, ((0, 0.1), (150, 0.01), (225, 0.001))),  # Xie et al. 2017's CIFAR recipe
    (["--recipe", "resnet"], 200, 1e-4, ((0, 0.1), (81, 0.01), (122, 0.001))),  # the common one
])
def test_the_resnext_recipe(argv, epochs, decay, schedule):
    config = parse(train_resnext, argv)
    assert (config.epochs, config.weight_decay, tuple(config.lr_schedule)) == (epochs, decay, schedule)


@pytest.mark.parametrize("version, depth", [("1", "20"), ("2", "56")])
def test_the_keras_example_keeps_its_own_settings(version, depth):
    """BatchNormalization's defaults (momentum 0.99, epsilon 1e-3), no weight decay on the Dense layer,
    AveragePooling2D(8) and Flatten before it."""
    model = build(train_resnet_v2, ["--version", version, "--depth", depth])
    norms = [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert norms and all(n.momentum == 0.99 and n.epsilon == 1e-3 for n in norms)
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert all(c.kernel_regularizer is not None and c.kernel_regularizer.l2 == pytest.approx(1e-4) for c in convs)
    head = [type(layer).__name__ for layer in model.layers[-3:]]
    assert head == ["AveragePooling2D", "Flatten", "Dense"] and model.layers[-3].pool_size == (8, 8)
    assert model.layers[-1].kernel_regularizer is None


def test_lr_scale_multiplies_every_rate():
    config = parse(train_resnet32, ["--lr-schedule", "0:0.1,3:0.01", "--lr-scale", "2"])
    assert tuple(config.lr_schedule) == ((0, 0.2), (3, 0.02)) and config.lr_scale == 2


@pytest.mark.parametrize("backend, bfloat16, gpu, chosen", [
    ("tensorflow", True, False, "mixed_bfloat16"),  # the measured case: a CPU with bfloat16 instructions
    ("tensorflow", False, False, "float32"),
    ("tensorflow", True, True, "float32"),
    ("jax", True, False, "float32"),
    ("torch", True, False, "float32"),
])
def test_precision_auto(monkeypatch, backend, bfloat16, gpu, chosen):
    from resnet_cifar import devices
    monkeypatch.setattr(devices, "cpu_has_bfloat16", lambda: bfloat16)
    monkeypatch.setattr(devices, "nvidia_gpu_present", lambda: gpu)
    assert devices.resolve_precision("auto", backend) == chosen
    assert devices.resolve_precision("float32", backend) == "float32"  # an explicit choice stays


def test_runs_per_gpu_shares_each_gpu():
    envs = [sweep_jobs.gpu_env(slot, 2, 2) for slot in range(4)]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["0", "1", "0", "1"]
    assert all(env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45"
               and env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" for env in envs)
    assert sweep_jobs.gpu_env(1, 2, 1) == {"CUDA_VISIBLE_DEVICES": "1"} and sweep_jobs.gpu_env(0, 0, 1) == {}


def test_compare_groups_runs_that_differ_only_in_their_seed():
    def run(name, **config):
        return {"name": name, "config": {"model": "resnet20_e", "lr_schedule": "0:0.1", **config}, "history": []}
    runs = [run("a0", seed=0, run_name="a0"), run("b0", seed=0, lr_schedule="0:0.2", run_name="b0"),
            run("a1", seed=1, run_name="a1", command="x", keras="3.15"), {"name": "alone", "config": None,
                                                                         "history": []}]
    groups = statistics.group_by_seed(runs)
    assert [(first, [r["name"] for r in members]) for first, members in groups] == [
        ("a0", ["a0", "a1"]), ("b0", ["b0"]), ("alone", ["alone"])]

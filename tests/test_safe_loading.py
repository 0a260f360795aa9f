"""--evaluate loads a user-given model file: hostile files are refused before anything in them runs
(checkpoints.load_model_safely). Each payload would create a marker file when run; the tests first show
that it does run when loaded carelessly (safe_mode=False), then that --evaluate refuses it."""
import json
import os
import zipfile

import keras
import numpy as np
import pytest

from resnet_cifar import checkpoints
import train_resnet32
from conftest import assert_refused, run_script


def lambda_model(marker):
    """A small functional model whose Lambda layer writes `marker` whenever it is called."""
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Lambda(lambda t: (__import__("pathlib").Path(marker).touch(), t)[1], name="payload")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


@pytest.mark.parametrize("extension", [".keras", ".h5"])
def test_model_with_a_lambda_is_refused(cifar_dir, tmp_path, extension):
    marker = tmp_path / "pwned"
    path = tmp_path / f"hostile{extension}"
    lambda_model(str(marker)).save(path)
    marker.unlink()  # building the model ran the Lambda once
    keras.models.load_model(path, safe_mode=False, compile=False)  # the payload is live: loading it unsafely ...
    assert marker.exists()  # ... runs it
    marker.unlink()
    line = assert_refused(run_script("train_resnet32.py", "--data-dir", cifar_dir, "--evaluate", path),
                          str(path), "refusing to load", "Lambda")
    assert "trust" in line
    assert not marker.exists()


def test_keras_archive_naming_a_module_function_is_refused(cifar_dir, tmp_path):
    """A .keras whose config.json names os.system with a command, as CVE-2025-1550's archives did."""
    marker = tmp_path / "pwned"
    honest = tmp_path / "honest.keras"
    train_resnet32.resnet(1).save(honest)
    config = json.loads(zipfile.ZipFile(honest).read("config.json"))
    config["config"]["layers"].insert(1, {"module": "os", "class_name": "system", "registered_name": "system",
                                          "config": f"touch {marker}", "name": "payload"})
    path = tmp_path / "hostile.keras"
    with zipfile.ZipFile(honest) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = json.dumps(config).encode() if item.filename == "config.json" else source.read(item.filename)
            target.writestr(item, data)
    assert_refused(run_script("train_resnet32.py", "--data-dir", cifar_dir, "--evaluate", path),
                   str(path), "refusing to load", "os.system")
    assert not marker.exists()


def test_not_a_model_file(cifar_dir, tmp_path):
    garbage = tmp_path / "model.keras"
    garbage.write_bytes(os.urandom(1000))
    assert_refused(run_script("train_resnet32.py", "--data-dir", cifar_dir, "--evaluate", garbage),
                   str(garbage), "cannot load")
    other = tmp_path / "model.pkl"
    other.write_bytes(b"x")
    assert_refused(run_script("train_resnet32.py", "--data-dir", cifar_dir, "--evaluate", other), ".h5 or .keras")


@pytest.mark.slow
def test_every_network_of_the_project_passes_the_check(tmp_path):
    """The check refuses nothing this project saves (every layer kind, mixed precision included)."""
    import train_resnet_v2
    import train_resnet_variants
    import train_resnext
    from conftest import build
    networks = [build(train_resnet_variants, ["--unit", "b", "--stack-n", "1"]),
                build(train_resnet_variants, ["--arch", "wide"]),
                build(train_resnet_v2, ["--version", "1", "--depth", "8"]),
                build(train_resnext, ["--cardinality", "2", "--width", "2", "--impl", "split"])]
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        networks.append(train_resnet32.resnet(1))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    for i, model in enumerate(networks):
        for extension in (".h5", ".keras"):
            path = str(tmp_path / f"model{i}{extension}")
            checkpoints.save_model(model, path)
            assert checkpoints.unsafe_entries(checkpoints._model_config(path)) == []
            reloaded = checkpoints.load_model_safely(path)
            np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5,
                                       atol=1e-6)

"""The modules stay import-safe: importing any of them starts no framework, so bad input is reported before
TensorFlow prints its start-up lines (README "Bad input")."""
import subprocess
import sys

from conftest import ROOT

MODULES = ["common", "cifar_data", "units", "batch_norm", "training", "checkpoints", "outputs", "devices",
           "distributed", "errors", "bench", "compare", "train_resnet32", "train_resnet_variants",
           "train_resnet_bottleneck", "train_resnet_v2", "train_resnext"]
FRAMEWORKS = ["keras", "tensorflow", "jax", "torch"]

BLOCKED_IMPORT = f"""
import sys
sys.path.insert(0, {ROOT!r})
for name in {FRAMEWORKS!r}:
    sys.modules[name] = None  # `import keras` now raises ImportError
for module in {MODULES!r}:
    __import__(module)
print("imported", len({MODULES!r}))
"""


def test_every_module_imports_without_a_framework():
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"imported {len(MODULES)}"

"""The modules stay import-safe: importing any of them starts no framework, so bad input is reported before
TensorFlow prints its start-up lines (README "Bad input")."""
import glob
import os
import subprocess
import sys

from conftest import ROOT

MODULES = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "*.py")))
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


def test_no_code_changes_args_after_parsing():
    """The parsed namespace is only read: settings are resolved once into an immutable RunConfig."""
    import glob
    import re
    assignment = re.compile(r"\bargs\.\w+\s*(=(?!=)|\+=|-=)|setattr\(\s*args\b")
    offenders = []
    for path in sorted(glob.glob(f"{ROOT}/*.py")):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if assignment.search(line):
                    offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_run_config_is_immutable():
    import dataclasses

    import pytest

    import train_resnet32
    from conftest import parse
    config = parse(train_resnet32, ["--stack-n", "3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    assert config.stack_n == 3 and config.saved()["stack_n"] == 3

"""The modules stay import-safe: importing any of them starts no framework, so bad input is reported before
TensorFlow prints its start-up lines (README "Bad input")."""
import glob
import os
import subprocess
import sys

from conftest import ROOT

ROOT_FILES = sorted(os.path.basename(path) for path in glob.glob(os.path.join(ROOT, "*.py")))
PACKAGE = sorted(glob.glob(os.path.join(ROOT, "resnet_cifar", "*.py")))
MODULES = [name[:-3] for name in ROOT_FILES] + [
    "resnet_cifar." + os.path.basename(path)[:-3] for path in PACKAGE if not path.endswith("__init__.py")]
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
    for path in sorted(glob.glob(f"{ROOT}/*.py") + PACKAGE):
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


def test_the_root_holds_what_a_person_runs():
    """At most 10 .py files at the root: the family scripts (exactly the registry's), common.py and the tools."""
    from resnet_cifar import families
    assert len(ROOT_FILES) <= 10, ROOT_FILES
    assert sorted(name for name in ROOT_FILES if name.startswith("train_")) == sorted(families.SCRIPTS)
    assert set(ROOT_FILES) - set(families.SCRIPTS) == {"common.py", "reproduce.py", "compare.py", "bench.py"}


def test_no_module_imports_a_family_script():
    """Scripts never import scripts, and neither does the library or a tool (tools read a family through
    families.load)."""
    import ast
    offenders = []
    for path in [os.path.join(ROOT, name) for name in ROOT_FILES] + PACKAGE:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                names = [getattr(arg, "value", "") for arg in node.args[:1]]
            offenders += [f"{os.path.relpath(path, ROOT)}: {name}" for name in names
                          if isinstance(name, str) and name.split(".")[-1].startswith("train_")]
    assert not offenders, offenders


def test_every_family_script_defines_its_family():
    from resnet_cifar import families
    for script in families.SCRIPTS:
        family = families.load(script)
        assert isinstance(family, families.Family) and family.description.startswith(("Train", "Compare")), script


def test_every_entry_point_answers_help():
    """Each script and tool prints its help and exits 0 (bench.py with and without a mode)."""
    from conftest import run_script
    from resnet_cifar import families
    for argv in [[script, "--help"] for script in families.SCRIPTS] + [
            ["reproduce.py", "--help"], ["compare.py", "--help"], ["bench.py", "--help"], ["bench.py"],
            ["bench.py", "profile", "--help"], ["bench.py", "versus-checkout", "--help"]]:
        result = run_script(*argv)
        assert result.returncode == 0 and "usage" in (result.stdout + result.stderr).lower(), (argv, result.stderr)

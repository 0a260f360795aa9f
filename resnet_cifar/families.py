"""The family scripts: the one list of them, and how a tool reads a family's definition without running it.

A family script (train_*.py at the repository root) ends with

    FAMILY = Family(__doc__, add_arguments, run_name, build_model, resolve)
    if __name__ == "__main__":
        common.main(FAMILY)

reproduce.py, bench.py and the tests take the scripts from SCRIPTS and their definitions from `load`, which
executes the script's file as a definition (runpy, never as __main__ and never through `import`): no module
imports a script, and a script never imports another (what two families share lives in this package).
"""
import functools
import os
import runpy
from typing import Callable, NamedTuple, Optional

from .errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_resnet32.py", "train_resnet_variants.py", "train_resnet_bottleneck.py", "train_resnet_v2.py",
           "train_resnext.py")


class Family(NamedTuple):
    description: str  # the script's docstring: --help shows it
    add_arguments: Callable  # add_arguments(parser): the family's own flags (depth, unit type, ...)
    run_name: Callable  # run_name(config) -> the model part of the default run name, e.g. "resnet32_e"
    build_model: Callable  # build_model(config, classes) -> the Keras model
    resolve: Optional[Callable] = None  # resolve(args) -> the family's resolved values (a dict); UsageError


def script_path(script):
    """The path of a family script given as 'train_resnet32.py', 'train_resnet32' or a path to one; UsageError
    naming the scripts for anything else."""
    name = os.path.splitext(os.path.basename(str(script)))[0] + ".py"
    if name not in SCRIPTS:
        raise UsageError(f"no family script {script!r}: one of {', '.join(SCRIPTS)}")
    return os.path.join(ROOT, name)


@functools.cache
def load(script):
    """The Family a script defines (its FAMILY), read without running its main."""
    path = script_path(script)
    return runpy.run_path(path, run_name="resnet_cifar.family")["FAMILY"]

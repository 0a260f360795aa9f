import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from resnet_cifar import cifar_data  # noqa: E402
from resnet_cifar import cli  # noqa: E402
from resnet_cifar import recipe  # noqa: E402
from cifar_fixture import write_cifar  # noqa: E402

# Makes `import tensorflow` fail, to show that a JAX or PyTorch run never needs TensorFlow.
NO_TENSORFLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_tensorflow")


def run_script(script, *args, backend=None, block_tensorflow=False, timeout=900):
    env = dict(os.environ)
    if backend:
        env["KERAS_BACKEND"] = backend
    if block_tensorflow:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [NO_TENSORFLOW, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def parse(module, argv):
    """A family script's RunConfig for these flags, as the script itself builds it."""
    return cli.parse(argv, module.FAMILY)


def build(module, argv):
    config = parse(module, argv)
    return module.build_model(config, cifar_data.DATASETS[config.dataset].classes)


def compile_for(model, config, steps_per_epoch):
    """The scripts' compile (recipe.compile_model) with `config`'s schedule and steps per execution."""
    recipe.compile_model(model, config.lr_schedule, steps_per_epoch, config.steps_per_execution)


def assert_refused(result, *words):
    """Exit code 2, one line on stderr (`prog: error: ...`) holding every word, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].split(": ")[1] == "error"
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def free_ports(n):
    """n TCP ports free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_script(script, *args, backend=None):
    """A script running in the background, its output piped."""
    env = {**os.environ, **({"KERAS_BACKEND": backend} if backend else {})}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def history_rows(path):
    """How many epochs a history CSV holds so far (0 while it does not exist)."""
    return max(len(path.read_text().splitlines()) - 1, 0) if path.exists() else 0


def wait_until(process, ready, timeout=300, poll=0.05):
    """Polls ready() until it holds, the process ends or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(poll)


def final_fields(stdout):
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("final: "), last
    return dict(item.split("=", 1) for item in last[len("final: "):].split())


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """CIFAR-10 in the official folder layout: 5 x 64 training images, 100 test images."""
    return write_cifar(str(tmp_path_factory.mktemp("cifar10")), per_file=64, test_images=100)


@pytest.fixture(scope="session")
def cifar_tar_dir(tmp_path_factory):
    """The same format as cifar-10-python.tar.gz only."""
    return write_cifar(str(tmp_path_factory.mktemp("cifar10tar")), per_file=20, test_images=30, seed=1, tar=True)


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp("cifar100")), "cifar100", per_file=100, test_images=50)


EPOCHS = 3
TINY_RUN = ["--stack-n", "1", "--batch-size", "32", "--epochs", EPOCHS, "--lr-schedule", "0:0.05,2:0.02",
            "--run-name", "resnet8_e_cifar10"]


@pytest.fixture(scope="session", params=["tensorflow", "jax", "torch"])
def trained(request, cifar_dir, tmp_path_factory):
    """One real run per backend; the JAX and PyTorch runs have TensorFlow blocked, so they prove they need none.
    Once per test session, whatever the number of pytest-xdist workers: the first worker to need a backend's run
    makes it in the folder the workers share, under a file lock; the others read it (tests only read it)."""
    import json

    from filelock import FileLock
    backend = request.param
    shared = tmp_path_factory.getbasetemp()  # this session's; under xdist, each worker's folder is in one per session
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    out = shared / f"run_{backend}"
    with FileLock(str(shared / f"run_{backend}.lock")):
        record = out / "result.json"
        if not record.exists():
            result = run_script("train_resnet32.py", "--data-dir", cifar_dir, *TINY_RUN,
                                "--log-dir", out / "logs", "--checkpoint-dir", out / "checkpoints",
                                backend=backend, block_tensorflow=backend != "tensorflow")
            assert result.returncode == 0, result.stderr[-3000:]
            record.write_text(json.dumps({"args": [], "returncode": result.returncode, "stdout": result.stdout,
                                          "stderr": result.stderr}))
        result = subprocess.CompletedProcess(**json.loads(record.read_text()))
    return backend, out, result



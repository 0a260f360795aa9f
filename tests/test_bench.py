"""bench.py runs and prints its figures (it is never timed here: speed is read from its output)."""
import re

import pytest

from conftest import run_script


@pytest.mark.slow
def test_bench_prints_a_machine_readable_line_per_configuration():
    result = run_script("bench.py", "model", "train_resnet32.py", "--stack-n", "1", "--batch-size", "8", "16",
                        "--precision", "float32", "--batch-norm", "auto", "keras",
                        "--steps", "2", "--warmup", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    assert len(lines) == 4
    # the default backend here is TensorFlow on a CPU: the scripts' class is the fused one
    for line, (batch, bn) in zip(lines, [(b, n) for b in ("8", "16")
                                          for n in ("FusedBatchNormalization", "BatchNormalization")]):
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        assert fields["model"] == "resnet8" and fields["batch"] == batch and fields["precision"] == "float32"
        assert fields["bn"] == bn
        assert float(fields["images_per_s"]) > 0 and float(fields["step_ms"]) > 0 and fields["params"] == "78666"
    assert re.search(r"^\| resnet8 \| tensorflow \| cpu \| float32 \| 16 \|", result.stdout, re.M)


def test_bench_refuses_an_unknown_script():
    result = run_script("bench.py", "model", "train_nothing.py")
    assert result.returncode == 2 and "no family script" in result.stderr


def test_overhead_mode_prints_one_line_per_configuration():
    result = run_script("bench.py", "overhead", "--steps-per-execution", "1", "2", "--steps", "8", "--warmup", "2",
                        "--repeats", "1", "--batch-size", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("OVERHEAD ")]
    assert [(f["loop"], f["spe"]) for f in (dict(i.split("=", 1) for i in line.split()[1:]) for line in lines)] == \
        [("keras", "1"), ("ours", "1"), ("ours", "2")]
    for line in lines:
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        assert fields["backend"] == "tensorflow" and fields["device"] == "cpu"
        assert re.fullmatch(r"\S+_\((AMX|AVX512-BF16|AVX-512|AVX2)?,?_?\d+_cores\)", fields["cpu"]), fields["cpu"]
        assert float(fields["us_per_step"]) > 0 and fields["batch"] == "16"


def test_bench_needs_a_mode_and_the_article_script_path():
    result = run_script("bench.py", "train_resnet32.py")
    assert result.returncode == 2 and "model, overhead, versus-article" in result.stderr
    result = run_script("bench.py", "versus-article", "data")
    assert result.returncode == 2 and "--article-script" in result.stderr and "Traceback" not in result.stderr

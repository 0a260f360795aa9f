#!/usr/bin/env bash
# The fixed cost before ResNet-32's first training step on TensorFlow/CPU, back to back: commit 10cb1ff (before
# the start-up work of docs/performance.md), d92a805 (one trace per step) and this checkout, each measured by
# this checkout's profile_epoch.py (`--fixed-only`: process start to the first step done), ROUNDS rounds
# alternated. One PROFILE line per run; run on an idle machine.
#   bash results/startup_cpu.sh DATA_DIR [ROUNDS]     # DATA_DIR holds cifar-10-batches-py/
# It needs a checkout of the root-module layout (profile_epoch.py at the root, up to 8d31f8f); since the
# resnet_cifar package, `python bench.py versus-checkout DATA_DIR OTHER_CHECKOUT` compares whole runs instead.
# OLD_PYTHONPATH (optional): a folder put first on the two older commits' PYTHONPATH, holding what their
# requirements install and this checkout's do not: ml_dtypes 0.7.0 (requirements.txt excludes it), e.g.
#   pip download --no-deps ml_dtypes==0.7.0 -d W && python -m zipfile -e W/ml_dtypes-0.7.0-*.whl OLD
set -euo pipefail
DATA=$(realpath "${1:?usage: bash results/startup_cpu.sh DATA_DIR [ROUNDS]}")
ROUNDS=${2:-3}
cd "$(dirname "$0")/.."
HERE=$(pwd)
WORK=$(mktemp -d)
trap 'for c in 10cb1ff d92a805; do git -C "$HERE" worktree remove --force "$WORK/$c" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
for commit in 10cb1ff d92a805; do
  git worktree add --detach --force "$WORK/$commit" "$commit" >/dev/null 2>&1
  cp profile_epoch.py "$WORK/$commit/"
done
echo "host CPU: $(python -c 'import devices; print(devices.cpu_model())')"
for round in $(seq "$ROUNDS"); do
  for where in "$WORK/10cb1ff" "$WORK/d92a805" "$HERE"; do
    label=$([ "$where" = "$HERE" ] && echo "this checkout ($(git rev-parse --short HEAD))" || basename "$where")
    old=$([ "$where" = "$HERE" ] && echo "" || echo "${OLD_PYTHONPATH:-}")
    version=$(cd "$where" && PYTHONPATH="$old" python -c 'import ml_dtypes; print(ml_dtypes.__version__)')
    (cd "$where" && PYTHONPATH="$old" python -c "import sys, profile_epoch; profile_epoch.profile(sys.argv[1:])" \
      "$DATA" --fixed-only 2>/dev/null | grep '^PROFILE' | sed "s|^|round=$round code=${label// /_} ml_dtypes=$version |")
  done
done

#!/bin/bash
# Maximum resident memory of --evaluate on PyTorch over the full test set, the largest network of each family
# (issue: "PyTorch for real"). Each network is saved untrained (random weights: the memory and the time do not
# depend on them), then evaluated under /usr/bin/time -v.
# Usage: bash results/torch_cpu/eval_memory.sh DATA_DIR MODEL_DIR [NAME ...]   (NAMEs: a part of the list below)
set -u
data=$1; models=$2; shift 2
mkdir -p "$models"
export KERAS_BACKEND=torch
while read -r name script flags; do
  [ $# -eq 0 ] || [[ " $* " == *" $name "* ]] || continue
  model=$models/$name.keras
  [ -f "$model" ] || python - "$script" "$model" $flags <<'PY' > /dev/null 2>&1
import importlib, os, sys
sys.path.insert(0, "tests")
from conftest import build
import checkpoints, devices
script, out, *argv = sys.argv[1:]
devices.configure_backend()
checkpoints.save_model(build(importlib.import_module(os.path.splitext(script)[0]), argv), out)
PY
  batch=$(python -c "
import sys; sys.path.insert(0, 'tests')
import devices, training; from checkpoints import load_model_safely
devices.configure_backend()
print(training.eval_batch_size(load_model_safely('$model')))" 2>/dev/null | tail -1)
  /usr/bin/time -v python "$script" $flags --data-dir "$data" --evaluate "$model" > "$models/$name.out" 2> "$models/$name.err"
  echo "$name ($script $flags): eval batch $batch; $(grep -E 'Maximum resident' "$models/$name.err" | sed 's/^\s*//'); wall $(grep -E 'Elapsed' "$models/$name.err" | sed 's/.*: //'); $(grep '^final:' "$models/$name.out" || tail -n 1 "$models/$name.err")"
done <<'LIST'
resnext29_8x64d train_resnext.py --depth 29 --cardinality 8 --width 64
wide train_resnet_variants.py --arch wide
resnet152 train_resnet_bottleneck.py --depth 152
resnet1001 train_resnet_v2.py --layout paper --depth 1001
resnet110 train_resnet32.py --stack-n 18
resnext29_16x64d train_resnext.py --depth 29 --cardinality 16 --width 64
LIST

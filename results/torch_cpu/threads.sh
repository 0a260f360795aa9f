#!/bin/bash
# torch CPU threads on the idle machine: ResNet-20, batch 128, float32; ABAB
cd "$(dirname "$0")/../.."
for round in 1 2; do
  for t in 1 2; do
    echo "== round $round OMP_NUM_THREADS=$t"
    OMP_NUM_THREADS=$t KERAS_BACKEND=torch python bench.py model train_resnet32.py --stack-n 3 --batch-size 128 --steps 8 --warmup 4 --repeats 2 2>&1 | grep -v -E "^(I0000|WARNING: All|To enable)" | tail -4
  done
done

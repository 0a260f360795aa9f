#!/usr/bin/env bash
# The CPU runs behind results/README.md, in order: 2-core CPU (AVX512-BF16), TensorFlow backend.
# Data: the JPEG-derived CIFAR-10 copy, rebuilt with: python ../shared/data/cifar10_batches.py data
# Short runs (10,000 training images, 6 epochs, ResNet-20): comparisons, not the published accuracies.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON=(--data-dir data --train-limit 10000 --stack-n 3 --epochs 6 --lr-schedule 0:0.1,4:0.01 --log-dir results/logs)
for unit in a b c d e; do
  python train_resnet_variants.py --unit "$unit" --precision mixed_bfloat16 "${COMMON[@]}"
done
python train_resnet_variants.py --unit a --plain --precision mixed_bfloat16 "${COMMON[@]}"
python train_resnet_variants.py --unit e --precision float32 --run-name resnet20_e_float32_cifar10 "${COMMON[@]}"
python compare.py resnet20_a_cifar10 resnet20_b_cifar10 resnet20_c_cifar10 resnet20_d_cifar10 resnet20_e_cifar10 \
  --log-dir results/logs --zoom 6 --out results/units_cpu.png > results/units_cpu.md
python compare.py resnet20_a_cifar10 plain20_a_cifar10 --log-dir results/logs --zoom 6 \
  --out results/plain_vs_resnet_cpu.png > results/plain_vs_resnet_cpu.md
python compare.py resnet20_e_cifar10 resnet20_e_float32_cifar10 --log-dir results/logs --zoom 6 \
  --out results/precision_cpu.png > results/precision_cpu.md

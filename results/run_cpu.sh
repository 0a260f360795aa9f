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
# After fused BatchNormalization and the tf.data pipeline (the training path of results/performance_cpu.md):
# mixed precision against float32 once more, same settings, seeds 0 and 1.
for seed in 0 1; do
  suffix=$([ "$seed" = 0 ] && echo "" || echo "_seed$seed")
  python train_resnet_variants.py --unit e --precision mixed_bfloat16 --seed "$seed" \
    --run-name "resnet20_e_fused_bf16${suffix}_cifar10" "${COMMON[@]}"
  python train_resnet_variants.py --unit e --precision float32 --seed "$seed" \
    --run-name "resnet20_e_fused_float32${suffix}_cifar10" "${COMMON[@]}"
done
python compare.py resnet20_e_fused_bf16_cifar10 resnet20_e_fused_float32_cifar10 resnet20_e_fused_bf16_seed1_cifar10 \
  resnet20_e_fused_float32_seed1_cifar10 --log-dir results/logs --zoom 6 \
  --out results/precision_fused_cpu.png > results/precision_fused_cpu.md

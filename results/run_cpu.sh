#!/usr/bin/env bash
# The CPU runs behind results/README.md, in order: 2-core CPU (AVX512-BF16), TensorFlow backend.
# Data: the JPEG-derived CIFAR-10 copy, rebuilt with: the JPEG copy's converter (docs/fidelity.md, "Data")
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
# mixed precision against float32 once more, same settings, seeds 0 to 4 (2 to 4 added in a later session).
for seed in 0 1 2 3 4; do
  suffix=$([ "$seed" = 0 ] && echo "" || echo "_seed$seed")
  python train_resnet_variants.py --unit e --precision mixed_bfloat16 --seed "$seed" \
    --run-name "resnet20_e_fused_bf16${suffix}_cifar10" "${COMMON[@]}"
  python train_resnet_variants.py --unit e --precision float32 --seed "$seed" \
    --run-name "resnet20_e_fused_float32${suffix}_cifar10" "${COMMON[@]}"
done
python compare.py resnet20_e_fused_bf16_cifar10 resnet20_e_fused_float32_cifar10 resnet20_e_fused_bf16_seed1_cifar10 \
  resnet20_e_fused_float32_seed1_cifar10 --log-dir results/logs --zoom 6 \
  --out results/precision_fused_cpu.png > results/precision_fused_cpu.md
# The same pairs over 15 epochs, seeds 0 to 2 (results/README.md, "Precision over several seeds").
LONGER=(--data-dir data --train-limit 10000 --stack-n 3 --epochs 15 --lr-schedule 0:0.1,8:0.01,12:0.001 --log-dir results/logs)
for seed in 0 1 2; do
  for precision in mixed_bfloat16 float32; do
    short=$([ "$precision" = float32 ] && echo float32 || echo bf16)
    python train_resnet_variants.py --unit e --precision "$precision" --seed "$seed" \
      --run-name "resnet20_e_15ep_${short}_seed${seed}_cifar10" "${LONGER[@]}"
  done
done
python compare.py resnet20_e_15ep_{bf16,float32}_seed0_cifar10 resnet20_e_15ep_{bf16,float32}_seed1_cifar10 \
  resnet20_e_15ep_{bf16,float32}_seed2_cifar10 --log-dir results/logs --zoom 8 \
  --out results/precision_15ep_cpu.png > results/precision_15ep_cpu.md

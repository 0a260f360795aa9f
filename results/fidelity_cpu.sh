#!/usr/bin/env bash
# The fidelity protocol of results/fidelity_cpu.md: our ResNet-20 (unit e) and the article's recipe
# (article_recipe.py, Keras 2 / tf-keras, ImageDataGenerator) on the same data, the same
# schedule and seeds: full 50,000 training images, the 10,000 test images evaluated after every epoch,
# batch 128, float32, TensorFlow on the CPU. One run at a time (each uses both cores).
#   bash results/fidelity_cpu.sh DATA_DIR ARTICLE_RECIPE   # DATA_DIR holds cifar-10-batches-py/, e.g. from
#                                              # the JPEG copy's converter (docs/fidelity.md, "Data")
# Needs: pip install -r requirements.txt, and for the article recipe tf-keras matching TensorFlow plus scipy.
set -euo pipefail
DATA=${1:?usage: bash results/fidelity_cpu.sh DATA_DIR ARTICLE_RECIPE}
cd "$(dirname "$0")/.."
ARTICLE_RECIPE=${2:?usage: bash results/fidelity_cpu.sh DATA_DIR ARTICLE_RECIPE (the article's Keras 2 script, docs/fidelity.md)}
SHORT=(--stack-n 3 --epochs 10 --lr-schedule 0:0.1,5:0.01,8:0.001)
# Ours with the paper's pad-and-crop (augmentation.py). The runs named fidelity_r20_10ep_seedS_cifar10 in
# results/logs are ours before it (RandomTranslation over +-4 pixels rounded; commit 10cb1ff of this repository).
for seed in 0 1; do
  python train_resnet32.py --data-dir "$DATA" "${SHORT[@]}" --seed "$seed" \
    --run-name "fidelity_crop_r20_10ep_seed${seed}_cifar10" --log-dir results/logs
done
# The article recipe with ImageDataGenerator's default bilinear shifts (sub-pixel: blurred training images), then
# with whole-pixel shifts (--interpolation-order 0).
for seed in 0 1; do
  mkdir -p "results/logs/seedrecipe_r20_10ep_seed${seed}" "results/logs/seedrecipe_nearest_r20_10ep_seed${seed}"
  python "$ARTICLE_RECIPE" "$DATA" "${SHORT[@]}" --seed "$seed" \
    --history "results/logs/seedrecipe_r20_10ep_seed${seed}/history.csv"
  python "$ARTICLE_RECIPE" "$DATA" "${SHORT[@]}" --seed "$seed" --interpolation-order 0 \
    --history "results/logs/seedrecipe_nearest_r20_10ep_seed${seed}/history.csv"
done
python train_resnet32.py --data-dir "$DATA" --stack-n 3 --epochs 30 --lr-schedule 0:0.1,15:0.01,23:0.001 --seed 0 \
  --run-name fidelity_r20_30ep_seed0_cifar10 --log-dir results/logs
# Tables and figures (compare.py reads our log folders and the article recipe's history.csv alike).
python compare.py fidelity_crop_r20_10ep_seed0_cifar10 fidelity_r20_10ep_seed0_cifar10 seedrecipe_r20_10ep_seed0 \
  seedrecipe_nearest_r20_10ep_seed0 fidelity_crop_r20_10ep_seed1_cifar10 fidelity_r20_10ep_seed1_cifar10 \
  seedrecipe_r20_10ep_seed1 seedrecipe_nearest_r20_10ep_seed1 --log-dir results/logs --zoom 10 \
  --out results/fidelity_10ep_cpu.png > results/fidelity_10ep_cpu_table.md
python compare.py fidelity_r20_30ep_seed0_cifar10 --log-dir results/logs --zoom 30 \
  --out results/fidelity_30ep_cpu.png > results/fidelity_30ep_cpu_table.md

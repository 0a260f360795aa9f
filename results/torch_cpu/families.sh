#!/bin/bash
# Every family script on PyTorch (issue: "PyTorch for real"): a 2-epoch run on 1,024 images, --evaluate of its
# .h5 and .keras, and the same run killed with kill -9 once its first epoch is saved, then --resume'd; the
# resumed history must equal the uninterrupted one. Usage: bash results/torch_cpu/families.sh DATA_DIR OUT_DIR
set -u
data=$1; out=$2
mkdir -p "$out"
export KERAS_BACKEND=torch
common="--data-dir $data --train-limit 1024 --epochs 2 --checkpoint-dir $out/checkpoints --log-dir $out/logs"
while read -r script flags; do
  name=$(basename "$script" .py)
  echo "== $script $flags"
  python "$script" $flags $common --run-name "${name}_straight" > "$out/$name.train.log" 2>&1
  echo "train exit $?: $(grep '^final:' "$out/$name.train.log")"
  for ext in h5 keras; do
    python "$script" $flags --data-dir "$data" --evaluate "$out/checkpoints/${name}_straight.$ext" 2>&1 | grep -E "^final:|: error:" | sed "s/^/evaluate .$ext: /"
  done
  python "$script" $flags $common --run-name "${name}_killed" > "$out/$name.killed.log" 2>&1 &
  pid=$!
  csv="$out/checkpoints/${name}_killed.csv"
  until [ "$(tail -n +2 "$csv" 2>/dev/null | wc -l)" -ge 1 ] || ! kill -0 $pid 2>/dev/null; do sleep 0.5; done
  kill -9 $pid; wait $pid 2>/dev/null
  echo "killed after $(tail -n +2 "$csv" | wc -l) epoch(s)"
  python "$script" $flags $common --run-name "${name}_killed" --resume > "$out/$name.resumed.log" 2>&1
  echo "resume exit $?: $(grep '^final:' "$out/$name.resumed.log")"
  python - "$out/checkpoints/${name}_straight.csv" "$csv" <<'PY'
import csv, sys
a, b = ([{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(p))] for p in sys.argv[1:])
diff = max(abs(float(x[k]) - float(y[k])) / max(abs(float(x[k])), 1e-12) for x, y in zip(a, b) for k in x)
print(f"resumed history == uninterrupted: {a == b} (bit for bit; largest relative difference {diff:.1e}; "
      f"{len(a)} and {len(b)} epochs; losses {[r['loss'] for r in b]})")
PY
done <<'LIST'
train_resnet32.py --stack-n 1
train_resnet_variants.py --stack-n 1
train_resnet_bottleneck.py --depth 50
train_resnet_v2.py --depth 11
train_resnext.py --cardinality 2 --width 4
LIST

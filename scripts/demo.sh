#!/usr/bin/env bash
# The main job on the embedded data, end to end (about a minute on 2 CPU cores after the first install):
#   1. meta-train a CMW-Net on digits-pmd (PMD Type-I 35% + asymmetric 30% label noise),
#   2. inspect it (config, families, weighting curves -> PNG),
#   3. apply it frozen to *differently* biased digits (asymmetric 40% noise + a 3x long tail) with a timm model,
#   4. run the plain ERM baseline through the same pipeline and compare.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
CMW=.venv/bin/cmw-transfer
OUT=${1:-runs/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

echo "== 1. meta-train on digits-pmd -> $OUT/net"
"$CMW" metatrain --src digits-pmd --out "$OUT/net" --quiet --json --overwrite >"$OUT/metatrain.json"

echo "== 2. inspect"
"$CMW" inspect --weights "$OUT/net" --plot "$OUT/net/curves.png"

echo "== 3./4. apply to digits (asym:0.4, imbalance 3): frozen CMW-Net vs plain ERM"
target=(--dataset digits --noise asym:0.4 --imbalance 3 --model test_resnet --epochs 30 --warmup-epochs 5
        --batch-size 64 --lr 0.05 --workers 0 --seed 0 --no-progress --json --overwrite)
"$CMW" apply --weights "$OUT/net" "${target[@]}" --out "$OUT/apply-cmw" >"$OUT/apply-cmw.json" 2>"$OUT/apply-cmw.log"
"$CMW" apply --weighting none "${target[@]}" --out "$OUT/apply-erm" >"$OUT/apply-erm.json" 2>"$OUT/apply-erm.log"

.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
meta = json.load(open(f"{out}/metatrain.json"))["final"]
print(f"meta-train: clean-vs-noisy AUC of the learned weights {meta['clean_noisy_auc']:.3f}, "
      f"source test top-1 {meta['test_top1']:.1f}")
print(f"{'target run':<12}{'top-1':>8}{'many':>8}{'medium':>8}")
for name in ("erm", "cmw"):
    final = json.load(open(f"{out}/apply-{name}.json"))["final"]
    print(f"{name:<12}{final['test_top1']:>8.2f}{final['test_many_top1']:>8.2f}{final['test_medium_top1']:>8.2f}")
PY

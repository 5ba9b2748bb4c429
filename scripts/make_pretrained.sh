#!/usr/bin/env bash
# Regenerate the nets shipped in pretrained/ (one thread, fixed seeds): bit-exact on the same machine; on another
# CPU the labels are identical and the nets agree within the tolerances stated in tests/test_pretrained.py.
#   bash scripts/make_pretrained.sh                     # all three, about a minute on 2 cores
#   bash scripts/make_pretrained.sh cmwnet-digits-pmd   # just one
# PRETRAINED_DIR=DIR writes elsewhere (the tests check that a regenerated net equals the shipped one).
set -euo pipefail
cd "$(dirname "$0")/.."
CMW=${CMW:-.venv/bin/cmw-transfer}
dest=${PRETRAINED_DIR:-pretrained}
wanted=("$@")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

make_net() {  # NAME, then metatrain options
  local name=$1
  shift
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then return; fi
  $CMW metatrain --src digits-pmd --out "$tmp/$name" --device cpu --seed 0 --quiet "$@" >/dev/null
  rm -rf "$dest/$name.new"
  mkdir -p "$dest/$name.new"
  cp "$tmp/$name"/{model.safetensors,config.json,README.md,curves.png,metrics.jsonl} "$dest/$name.new/"
  rm -rf "${dest:?}/$name"
  mv "$dest/$name.new" "$dest/$name"
  echo "$dest/$name: $(sha256sum "$dest/$name/model.safetensors" | cut -c1-16)"
}

make_net cmwnet-digits-pmd --method cmwnet
make_net cmwnet-sl-digits-pmd --method cmwnet-sl --mixup-alpha 1.0
make_net mwnet-digits-pmd --method mwnet

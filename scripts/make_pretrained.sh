#!/usr/bin/env bash
# Regenerate the nets shipped in pretrained/ (one thread, fixed seeds): bit-exact on the same machine; on another
# CPU the labels are identical and the nets agree within the tolerances stated in tests/test_pretrained.py.
#   bash scripts/make_pretrained.sh                     # all five: the digits nets in about a minute on 2 cores,
#                                                       # the Fashion-MNIST nets about 10 minutes each (one thread)
#   bash scripts/make_pretrained.sh cmwnet-digits-pmd   # just one
# The Fashion-MNIST nets need the original files (apt-get install -y dataset-fashion-mnist, or CMW_DATA_DIR); without
# them they are skipped with a note, unless named explicitly (then the missing files are an error).
# PRETRAINED_DIR=DIR writes elsewhere (the tests check that a regenerated net equals the shipped one);
# EXTRA_ARGS="--epochs 1" passes options to every metatrain (the tests' shortened recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
CMW=${CMW:-.venv/bin/cmw-transfer}
dest=${PRETRAINED_DIR:-pretrained}
wanted=("$@")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

make_net() {  # NAME, SOURCE, then metatrain options
  local name=$1 src=$2
  shift 2
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then return; fi
  if [ ${#wanted[@]} -eq 0 ] && [ "$src" = fashion-mnist-pmd ] && \
      ! $CMW data --dataset fashion-mnist --json >/dev/null 2>&1; then
    echo "$name: skipped (no Fashion-MNIST files: apt-get install -y dataset-fashion-mnist)" >&2
    return
  fi
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of options
  $CMW metatrain --src "$src" --out "$tmp/$name" --device cpu --seed 0 --quiet "$@" ${EXTRA_ARGS:-} >/dev/null
  rm -rf "$dest/$name.new"
  mkdir -p "$dest/$name.new"
  cp "$tmp/$name"/{model.safetensors,config.json,README.md,curves.png,metrics.jsonl} "$dest/$name.new/"
  rm -rf "${dest:?}/$name"
  mv "$dest/$name.new" "$dest/$name"
  echo "$dest/$name: $(sha256sum "$dest/$name/model.safetensors" | cut -c1-16)"
}

make_net cmwnet-digits-pmd digits-pmd --method cmwnet
make_net cmwnet-sl-digits-pmd digits-pmd --method cmwnet-sl --mixup-alpha 1.0
make_net mwnet-digits-pmd digits-pmd --method mwnet
make_net cmwnet-fashion-mnist-pmd fashion-mnist-pmd --method cmwnet
make_net mwnet-fashion-mnist-pmd fashion-mnist-pmd --method mwnet
